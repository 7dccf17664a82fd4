// Combine and combine_backward on the device; their row sums and products are those of
// cuda/device/row_sums.cuh (the numerics of plan/numerics.hpp).
#include "cuda/device/chained_launch.hpp"
#include "cuda/device/device_primitives.cuh"
#include "cuda/device/operation_sync.cuh"
#include "cuda/device/padding.cuh"
#include "cuda/device/row_sums.cuh"
#include "cuda/kernels/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {
namespace {

constexpr int kThreads = kBlockThreads;

// Reduce: the expert-side sum of expanded rows (expand, reduce at expert), Terms at a time;
// otherwise rows are copied (compact, or reduce at source). Separate instantiations keep each
// path's registers to itself (together they spilled).
template <int Vec, bool Reduce, int Terms, int Span>
__global__ void __launch_bounds__(kThreads) combine_send_kernel(CombineSendParams p) {
  chain_start();
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_topk = layout.num_topk;
  const int64_t hidden = layout.hidden;
  const int rank = p.topo.rank;
  // Written by this rank's dispatch, a kernel before this one: loaded while the entry waits
  // (a round trip fewer after it; the same in the kernels below, docs/performance.md).
  const int64_t num_recv = p.device_counts[0];
  if (!operation_entry(p.topo, kPhaseCombineEntry)) {
    operation_handoff(p.topo, true);
    return;
  }
  const int lane = lane_id();
  constexpr bool reduce = Reduce;
  // Rows split into parts over the warps (device_primitives.cuh); a part of a reduction is a
  // range of elements (bytes / 2), a multiple of 8.
  const RowParts parts = row_parts(num_recv, hidden * 2);
  for (int64_t item = global_warp(); item < num_recv * parts.count; item += total_warps()) {
    const int64_t n = item / parts.count, part = item % parts.count;
    const int32_t g = p.src_token[n];
    const int source = static_cast<int>(g / layout.max_tokens);
    const int64_t token = g % layout.max_tokens;
    char* dst = p.topo.peers[source];
    const int32_t* rows = p.expanded_rows + n * num_topk;
    if constexpr (reduce) {
      auto* out = reinterpret_cast<uint16_t*>(
          layout.row(dst, layout.expert_combine_row_index(rank, token)));
      const int64_t end = min(hidden, (part + 1) * parts.bytes / 2);
      // The token's expanded rows in k order, weighted when weights are given.
      auto term = [&](int k, float& w) -> const uint16_t* {
        const int32_t row = rows[k];
        if (row < 0) return nullptr;
        w = p.weights ? p.weights[row] : 1.0f;
        return p.x + int64_t(row) * hidden;
      };
      // The narrow shape is picked here when a token's terms are spread over the ranks, so
      // most of them are absent on this one.
      constexpr bool kSkipAbsent = Terms == kNarrowTerms;
      sum_row<Vec, Terms, Span, kSkipAbsent, false, false>(
          num_topk, part * parts.bytes / 2, end, lane, term,
          [&](int64_t h, const Chunk<Vec>& sum) { sum.store(out + h); });
    } else if (!p.expand) {
      if (p.stage_own_rows || source != rank) {
        warp_copy_part(layout.row(dst, layout.expert_combine_row_index(rank, token)),
                       reinterpret_cast<const char*>(p.x + n * hidden), hidden * 2, parts, part,
                       lane);
      }
    } else {
      for (int k = 0; k < num_topk; ++k) {
        const int32_t row = rows[k];
        if (row < 0) continue;
        if (p.stage_own_rows || source != rank) {
          warp_copy_part(layout.row(dst, layout.source_combine_row_index(token, k)),
                         reinterpret_cast<const char*>(p.x + int64_t(row) * hidden), hidden * 2,
                         parts, part, lane);
        }
        if (part == 0 && lane == 0 && p.weights) {
          layout.row_weights(dst)[token * num_topk + k] = p.weights[row];
        }
      }
    }
    if (part == 0 && p.scalars) {
      for (int k = lane; k < num_topk; k += kWarpSize) {
        if (p.recv_topk[n * num_topk + k] < 0) continue;
        layout.scalars(dst)[token * num_topk + k] =
            p.expand ? p.scalars[rows[k]] : p.scalars[n * num_topk + k];
      }
    }
  }
  operation_handoff(p.topo, true);  // orders the block's stores before its count
}

template <int Vec, int Terms, int Span>
__global__ void __launch_bounds__(kThreads) combine_reduce_kernel(CombineReduceParams p) {
  chain_start();
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  const int64_t hidden = layout.hidden;
  const int rank = p.topo.rank;
  const int64_t own_first = p.own_x ? p.recv_offsets[rank] : 0;  // this rank's first row in x
  if (!operation_exit_wait(p.topo, kPhaseCombineExit)) return;
  char* local = p.topo.peers[p.topo.rank];
  const int lane = lane_id();
  const RowParts parts = row_parts(p.num_tokens, hidden * 2);
  // The staged rows of token t, in the order they are summed: one per expert rank (reduce at
  // expert) or one per k (reduce at source); -1 where none.
  const int terms = p.at_source ? num_topk : num_ranks;
  for (int64_t item = global_warp(); item < p.num_tokens * parts.count; item += total_warps()) {
    const int64_t t = item / parts.count, part = item % parts.count;
    const int64_t end = min(hidden, (part + 1) * parts.bytes / 2);
    auto term = [&](int i, float& w) -> const uint16_t* {
      const bool present =
          p.at_source ? p.topk32[t * num_topk + i] >= 0 : p.send_slot[t * num_ranks + i] >= 0;
      if (!present) return nullptr;
      w = p.at_source && p.weighted ? layout.row_weights(local)[t * num_topk + i] : 1.0f;
      if (p.own_x) {  // this rank's own expert outputs are read where they are
        const int32_t own_slot = p.send_slot[t * num_ranks + rank];
        if (!p.at_source && i == rank) return p.own_x + (own_first + own_slot) * hidden;
        if (p.at_source && own_slot >= 0) {
          const int32_t row = p.expanded_rows[(own_first + own_slot) * num_topk + i];
          if (row >= 0) return p.own_x + int64_t(row) * hidden;
        }
      }
      const int64_t staged = p.at_source ? layout.source_combine_row_index(t, i)
                                         : layout.expert_combine_row_index(i, t);
      return reinterpret_cast<const uint16_t*>(layout.row(local, staged));
    };
    sum_row<Vec, Terms, Span, false, Terms == kNarrowTerms, false>(
        terms, part * parts.bytes / 2, end, lane, term, [&](int64_t h, Chunk<Vec>& sum) {
          for (const uint16_t* bias : {p.bias0, p.bias1}) {
            if (!bias) continue;
            Chunk<Vec> b;
            b.load(bias + t * hidden + h);
            sum.add(b);
          }
          sum.store(p.y + t * hidden + h);
        });
    if (part == 0 && p.scalars_out) {
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const int64_t i = t * num_topk + k;
        p.scalars_out[i] = p.topk32[i] >= 0 ? layout.scalars(local)[i] : 0.0f;
      }
    }
  }
}

template <int Vec>
__global__ void __launch_bounds__(kThreads) backward_kernel(BackwardParams p) {
  chain_start();
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  const int64_t hidden = layout.hidden;
  const int64_t num_recv = p.device_counts[0];
  if (!operation_exit_wait(p.topo, kPhaseBackwardExit)) return;
  char* local = p.topo.peers[p.topo.rank];
  const int lane = lane_id();
  for (int64_t n = global_warp(); n < num_recv; n += total_warps()) {
    const int s = plan::source_of_received(p.recv_offsets, num_ranks, n);
    const int64_t slot = n - p.recv_offsets[s];
    const auto* grad = p.own_grad_y && s == p.topo.rank
                           ? p.own_grad_y + int64_t(p.src_token[n] - s * layout.max_tokens) * hidden
                           : reinterpret_cast<const uint16_t*>(
                                 layout.row(local, layout.dispatch_row_index(s, slot)));
    const int32_t* rows = p.expanded_rows + n * num_topk;
    // One (token, k) at a time keeps registers bounded for any K; grad_y stays in L1/L2.
    for (int k = 0; k < num_topk; ++k) {
      const int32_t row = rows[k];
      if (row < 0) continue;
      if (k + 1 < num_topk && rows[k + 1] >= 0) {
        // The next x row is asked into L2 (a line per lane) while this one is processed:
        // 4% faster at 4096 tokens (docs/performance.md).
        const char* next = reinterpret_cast<const char*>(p.x + int64_t(rows[k + 1]) * hidden);
        for (int64_t b = int64_t(lane) * 128; b < hidden * 2; b += kWarpSize * 128) {
          prefetch_l2(next + b);
        }
      }
      const float dot = scale_and_dot_row<Vec>(grad, p.x + int64_t(row) * hidden, p.weights[row],
                                               p.grad_x + int64_t(row) * hidden, hidden, lane);
      if (lane == 0) p.grad_weights[row] = dot;
    }
  }
  write_padding({.tokens_per_expert = p.tokens_per_expert,
                 .expert_offsets = p.expert_offsets,
                 .local_experts = layout.local_experts(),
                 .x = reinterpret_cast<char*>(p.grad_x),
                 .row_bytes = hidden * 2,
                 .weights = p.grad_weights,
                 .zero_x = true});
}

// Every instantiation of the combine kernels, with the conditions under which each is picked:
// the launchers pick from these tables and load_combine_kernels loads exactly them, so a kernel
// cannot be launched without having been loaded first (docs/decisions.md: lazy loading).
// `vec`: 8-element chunks or one element per lane; `wide`: the 8 x 2 sum shape (vec 8 only).
struct SendVariant {
  int vec;
  bool reduce;  // expanded, reduced at the expert (else rows are forwarded)
  bool wide;
  void (*kernel)(CombineSendParams);
};
constexpr SendVariant kSendVariants[] = {
    {8, true, true, combine_send_kernel<8, true, kWideTerms, kWideSpan>},
    {8, true, false, combine_send_kernel<8, true, kNarrowTerms, kNarrowSpan>},
    {8, false, false, combine_send_kernel<8, false, kNarrowTerms, kNarrowSpan>},
    {1, true, false, combine_send_kernel<1, true, kNarrowTerms, kNarrowSpan>},
    {1, false, false, combine_send_kernel<1, false, kNarrowTerms, kNarrowSpan>},
};

struct ReduceVariant {
  int vec;
  bool wide;
  void (*kernel)(CombineReduceParams);
};
constexpr ReduceVariant kReduceVariants[] = {
    {8, true, combine_reduce_kernel<8, kWideTerms, kWideSpan>},
    {8, false, combine_reduce_kernel<8, kNarrowTerms, kNarrowSpan>},
    {1, false, combine_reduce_kernel<1, kNarrowTerms, kNarrowSpan>},
};

struct BackwardVariant {
  int vec;
  void (*kernel)(BackwardParams);
};
constexpr BackwardVariant kBackwardVariants[] = {{8, backward_kernel<8>}, {1, backward_kernel<1>}};

}  // namespace

void load_combine_kernels() {
  for (const auto& v : kSendVariants) load_functions({reinterpret_cast<const void*>(v.kernel)});
  for (const auto& v : kReduceVariants) load_functions({reinterpret_cast<const void*>(v.kernel)});
  for (const auto& v : kBackwardVariants) load_functions({reinterpret_cast<const void*>(v.kernel)});
}

void launch_combine_send(const CombineSendParams& params, cudaStream_t stream) {
  const plan::WorkspaceLayout& layout = params.topo.layout;
  const bool reduce = params.expand && !params.at_source;
  const int vec = vector_width(layout.hidden, {params.x});
  const bool wide =
      reduce && wide_sums(vec, RowTerms::kTopkAtExpert, layout.num_topk, layout.num_ranks);
  const SendVariant& variant = pick_variant(kSendVariants, [&](const SendVariant& v) {
    return v.vec == vec && v.reduce == reduce && v.wide == wide;
  });
  launch_chained(variant.kernel, params.num_blocks, kThreads, 0, stream, params.topo.chained,
                 params);
}

void launch_combine_reduce(const CombineReduceParams& params, cudaStream_t stream) {
  const plan::WorkspaceLayout& layout = params.topo.layout;
  const int vec = vector_width(layout.hidden, {params.bias0, params.bias1, params.y, params.own_x});
  const RowTerms terms = params.at_source ? RowTerms::kTopkAtSource : RowTerms::kRanks;
  const bool wide = wide_sums(vec, terms, layout.num_topk, layout.num_ranks);
  const ReduceVariant& variant = pick_variant(
      kReduceVariants, [&](const ReduceVariant& v) { return v.vec == vec && v.wide == wide; });
  launch_chained(variant.kernel, params.num_blocks, kThreads, 0, stream, params.topo.chained,
                 params);
}

void launch_backward(const BackwardParams& params, cudaStream_t stream) {
  const int vec =
      vector_width(params.topo.layout.hidden, {params.x, params.grad_x, params.own_grad_y});
  const BackwardVariant& variant =
      pick_variant(kBackwardVariants, [&](const BackwardVariant& v) { return v.vec == vec; });
  launch_chained(variant.kernel, params.num_blocks, kThreads, 0, stream, params.topo.chained,
                 params);
}

}  // namespace epx::cuda
