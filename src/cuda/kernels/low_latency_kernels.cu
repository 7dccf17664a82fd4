// The low-latency mode on the device (docs/protocol.md, "Low-latency mode"):
//
//   dispatch          every block but the first claims the slots of its tokens' (t, k) (of a
//                     small batch: of its unit, a few k of one token) on the owners' counters
//                     (system-scope atomics through the peer pointers), counts its claims done,
//                     copies each token's row once into every destination row, and hands off; the last of them raises the sent flags. Block 0 raises the
//                     claimed flags once the others' claims are counted, waits for every
//                     source's, settles the round's counts while the rows are still being
//                     stored, and waits for every source's sent flag.
//   combine           the expert side copies what is not in the combine region yet, the last
//                     block raises the ready flags; then every block waits for every owner's and
//                     sums its tokens' rows, pulled from the owners' combine regions.
//   combine_backward  the grad_y rows go the dispatch way to the handle's slots; every block
//                     waits for every source, then computes the expert side's rows.
//
// A combine's and a combine_backward's blocks wait for their own grid's handoff, so they are
// launched cooperatively (co-resident); a dispatch's waiting is done by its block 0 alone, which
// no other block waits for.
// The protocol's words (state, handoff, flags) are cuda/device/low_latency_sync.cuh, the send
// part of the dispatch direction cuda/device/low_latency_send.cuh.
#include <algorithm>
#include <cub/block/block_scan.cuh>

#include "cuda/device/chained_launch.hpp"
#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/device/low_latency_send.cuh"
#include "cuda/device/low_latency_sync.cuh"
#include "cuda/device/row_sums.cuh"
#include "cuda/kernels/low_latency.hpp"

namespace epx::cuda {
namespace {

constexpr int kThreads = kBlockThreads;

// The first part of a combine's or combine_backward's shared memory: an [E_l + 1] prefix, rounded
// up to an even count of int32 (what follows is 8-byte aligned).
__host__ __device__ __forceinline__ int padded_experts(const plan::LowLatencyLayout& layout) {
  return (layout.local_experts() + 2) / 2 * 2;
}

// The wait part of a dispatch (cached or not), one block: every source's claimed flag, then the
// round's counts (a routing dispatch's from the counters, reset for the next round; past the
// region: an error, clamped) into the counts view and the handle, and the scalars of rows past
// them cleared where this half's last round had rows; then every source's sent flag. It runs in
// block 0 of the send launch, beside the blocks that store the rows, or alone in the wait launch
// of a call that returned a hook. A thread per expert settles its expert: the rows a round drops
// per expert are few, and a warp per expert cost 16 dependent iterations for 256 experts
// (docs/performance.md). Longer runs of rows to clear (a half's first round, which knows nothing
// of its rows and clears them all, or a batch much smaller than the last) go to a list the warps
// clear a row per lane: a thread's stores, a row of its own expert each, took ~208 us for a first
// round of 256 experts x 256 rows. No thread reads this rank's own flags: its claims are before
// this block's count of them, or before the wait launch by stream order, and its rows before the
// next kernel by the grid's end.
constexpr int kThreadClearRows = 16;  // longer runs go to the warps' list
constexpr int kListedRuns = 512;      // the list's length (runs past it stay with their thread)

__device__ void settle_dispatch(const LowLatencyDispatchParams& p, uint64_t epoch, int32_t phase) {
  const LowLatencyContext& c = p.ll;
  const plan::LowLatencyRegions& at = c.regions;
  __shared__ int64_t runs[kListedRuns][2];  // [first, end) rows to clear
  __shared__ int listed;
  if (threadIdx.x == 0) listed = 0;
  bool ok;
  (void)low_latency_wait(c, plan::LowLatencyFlag::kClaimed, epoch, phase, ok, true, 0);
  __syncthreads();  // the sources' claims are done (and `listed` is 0)
  char* local = c.topo.peers[c.topo.rank];
  const int64_t capacity = at.expert_rows;
  const bool routing = p.rows.kind == plan::kKindDispatch;
  int32_t* old_counts = c.old_counts + c.half * at.local_experts;
  volatile int32_t* counters = plan::region<int32_t>(local, at.counters);
  int32_t* counts_view = plan::region<int32_t>(local, at.counts);
  float* weights = plan::region<float>(local, at.recv_weights);
  float* aux = plan::region<float>(local, at.recv_aux);
  int32_t* src_info = plan::region<int32_t>(local, at.src_info);
  auto clear = [&](int64_t row) {  // a row past the counts: no weight, no aux, no source
    weights[row] = 0.0f;
    aux[row] = 0.0f;
    src_info[row] = -1;
  };
  for (int e = threadIdx.x; e < at.local_experts; e += blockDim.x) {
    const int32_t old = old_counts[e];
    int32_t count;
    if (routing) {
      count = counters[e];
      counters[e] = 0;
    } else {
      count = p.counts[e];
    }
    if (count > capacity) {
      low_latency_error(c, kDeviceLowLatencyOverflow, phase, c.topo.rank, e, capacity, count);
      count = static_cast<int32_t>(capacity);
    }
    old_counts[e] = count;
    counts_view[e] = count;
    if (routing) p.counts[e] = count;
    const int64_t first = e * capacity + count, end = e * capacity + old;
    if (end - first > kThreadClearRows) {
      const int slot = atomicAdd(&listed, 1);
      if (slot < kListedRuns) {
        runs[slot][0] = first;
        runs[slot][1] = end;
        continue;
      }
    }
    for (int64_t row = first; row < end; ++row) clear(row);
  }
  __syncthreads();
  const int num_runs = min(listed, kListedRuns), lane = lane_id();
  for (int i = warp_in_block(); i < num_runs; i += kBlockWarps) {
    for (int64_t row = runs[i][0] + lane; row < runs[i][1]; row += kWarpSize) clear(row);
  }
  mark_phase_into(c.clock, kMarkLlSettled);
  if (ok) (void)low_latency_wait(c, plan::LowLatencyFlag::kSent, epoch, phase, ok, true, 0);
  if (threadIdx.x == 0) c.scratch->state = plan::kStateDispatched;
}

// The tags of this rank's dispatch-direction flags of the round, once its claims are done.
__device__ __forceinline__ uint32_t dispatch_tags(const LowLatencyContext& c, uint64_t epoch) {
  return c.tags | (c.scratch->bad_routing == epoch ? uint32_t(plan::kTagBadRouting) : 0u);
}

// Block 0 of a send launch: waits (bounded) for the sending blocks' claims, raises this rank's
// claimed flags in the peers, then settles the round (a launch with the wait part) or leaves
// the state for the wait launch.
__device__ void count_claims(const LowLatencyDispatchParams& p, uint64_t epoch, int32_t phase) {
  const LowLatencyContext& c = p.ll;
  __shared__ int counted;
  if (threadIdx.x == 0) {
    uint32_t* counter = &c.scratch->blocks_claimed;
    const uint32_t blocks = gridDim.x - 1;
    const uint64_t start = global_timer_ns();
    uint32_t seen;
    counted = 1;
    while ((seen = load_acquire_gpu(counter)) < blocks) {
      if (global_timer_ns() - start > c.topo.timeout_ns) {
        low_latency_error(c, kDeviceTimeout, phase, c.topo.rank, 0, blocks, seen);
        counted = 0;
        break;
      }
      __nanosleep(32);
    }
    if (counted) *counter = 0;
  }
  __syncthreads();
  if (!counted) return;
  mark_phase_into(c.clock, kMarkLlCounted);
  low_latency_publish(c, plan::LowLatencyFlag::kClaimed, epoch, dispatch_tags(c, epoch), 0, true);
  if (p.wait) {
    settle_dispatch(p, epoch, phase + 1);
  } else if (threadIdx.x == 0) {
    c.scratch->state = plan::kStateDispatchSent;
  }
}

__global__ void __launch_bounds__(kThreads)
    low_latency_dispatch_kernel(LowLatencyDispatchParams p) {
  const LowLatencyContext& c = p.ll;
  mark_phase_into(c.clock, kMarkLlStart);
  const int32_t phase = plan::low_latency_send_phase(p.rows.kind);
  const SendBlocks blocks = send_blocks(1);
  const int64_t first = p.send ? first_entry(c, p.rows, blocks) : -2;
  if (p.send) prefetch_first_rows(p.rows, c.layout.num_topk, blocks);
  const uint64_t epoch = c.scratch->round + 1;
  if (!low_latency_enter(c, plan::low_latency_step(false, !p.send), phase + (p.send ? 0 : 1))) {
    return;
  }
  mark_phase_into(c.clock, kMarkLlEntered);
  if (!p.send) {
    settle_dispatch(p, epoch, phase + 1);
    return;
  }
  if (blockIdx.x == 0) {
    count_claims(p, epoch, phase);
    return;
  }
  if (p.rows.unit_topk > 0) {
    send_unit(c, p.rows, first, phase, blocks, &c.scratch->blocks_claimed);
  } else {
    send_rows(c, p.rows, first, phase, blocks, &c.scratch->blocks_claimed);
  }
  mark_phase_into(c.clock, kMarkLlSent);
  // The rows are before the next kernel by the grid's end; the peers learn of them from the
  // last block's sent flags (none to raise alone).
  if (c.layout.num_ranks == 1) return;
  const bool last = low_latency_last_block(&c.scratch->blocks_sent, blocks.count);
  mark_phase_into(c.clock, kMarkLlHandedOff);
  if (!last) return;
  mark_phase_into(c.clock, kMarkLlPublishing);
  low_latency_publish(c, plan::LowLatencyFlag::kSent, epoch, dispatch_tags(c, epoch), 0, true);
}

// The exclusive prefix of `counts` [E_l] into prefix [E_l + 1] (shared memory), the block.
__device__ void block_prefix(const int32_t* counts, int local_experts, int32_t* prefix) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage storage;
  __shared__ int running;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int base = 0; base < local_experts; base += kThreads) {
    const int e = base + threadIdx.x;
    int start = 0, total = 0;
    Scan(storage).ExclusiveSum(e < local_experts ? counts[e] : 0, start, total);
    if (e < local_experts) prefix[e] = running + start;
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) prefix[local_experts] = running;
  __syncthreads();
}

// The region row of the n-th real row of the experts (prefix from block_prefix).
__device__ __forceinline__ int64_t real_row(const int32_t* prefix, int local_experts, int64_t n,
                                            int64_t expert_rows) {
  int lo = 0, hi = local_experts;  // the last e with prefix[e] <= n
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (prefix[mid] <= n) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo * expert_rows + (n - prefix[lo]);
}

// The expert side of a combine: what is not in the combine region yet goes there, row for row.
__device__ void copy_expert_side(const LowLatencyCombineParams& p, int32_t* prefix) {
  const LowLatencyContext& c = p.ll;
  const plan::LowLatencyRegions& at = c.regions;
  const int local_experts = at.local_experts;
  block_prefix(p.counts, local_experts, prefix);
  char* local = c.topo.peers[c.topo.rank];
  char* rows = plan::region<char>(local, at.combine_rows);
  float* weights = plan::region<float>(local, at.combine_weights);
  float* scalars = plan::region<float>(local, at.combine_scalars);
  const int64_t row_bytes = c.layout.hidden * 2, total = prefix[local_experts];
  const RowParts parts = row_parts(total, row_bytes);
  const int lane = lane_id();
  for (int64_t item = global_warp(); item < total * parts.count; item += total_warps()) {
    const int64_t n = item / parts.count, part = item % parts.count;
    const int64_t row = real_row(prefix, local_experts, n, at.expert_rows);
    if (p.x) {
      warp_copy_part(rows + row * row_bytes, reinterpret_cast<const char*>(p.x) + row * row_bytes,
                     row_bytes, parts, part, lane);
    }
    if (part != 0 || lane != 0) continue;
    if (p.weights) weights[row] = p.weights[row];
    if (p.scalars) scalars[row] = p.scalars[row];
  }
}

// The last of the blocks to get here (no fence: what it does next, advancing the round, orders
// after nothing the others stored; they read the round counter at their start).
__device__ __forceinline__ bool last_to_finish(uint32_t* counter) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(counter, 1u) == gridDim.x - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  return last != 0;
}

// Where a combine reads an owner's rows, weights and scalars (its combine region, or its
// receive region for weights the dispatch delivered).
struct OwnerRegions {
  const uint16_t* rows;
  const float* weights;
  const float* scalars;
};

template <int Vec, int Terms, int Span>
__global__ void __launch_bounds__(kThreads) low_latency_combine_kernel(LowLatencyCombineParams p) {
  extern __shared__ int32_t smem[];  // prefix [E_l + 1], then (8-aligned) the owners' regions [R]
  const LowLatencyContext& c = p.ll;
  const plan::LowLatencyLayout& layout = c.layout;
  const plan::LowLatencyRegions& at = c.regions;
  const int local_experts = at.local_experts, num_topk = layout.num_topk;
  const int64_t hidden = layout.hidden;
  const int32_t phase = plan::low_latency_send_phase(plan::kKindCombine);
  mark_phase_into(c.clock, kMarkLlCombineStart);
  const int lane = lane_id();
  // Lane k's entry (t, k) of the warp's first token, loaded with the state word rather than
  // after the waits (this rank's handle, written by the dispatch before this kernel): the sum of
  // a decode batch's one token per warp then starts one round trip sooner.
  const RowParts parts = row_parts(p.num_tokens, hidden * 2);
  const int64_t first_token = global_warp() / parts.count;
  const bool prefetched = p.wait && first_token < p.num_tokens && lane < num_topk;
  int32_t first_e = -1, first_slot = -1;
  if (prefetched) {
    first_e = p.topk32[first_token * num_topk + lane];
    first_slot = p.slots[first_token * num_topk + lane];
  }
  const uint64_t epoch = c.scratch->round + 1;
  if (!low_latency_enter(c, plan::low_latency_step(true, !p.send), phase + (p.send ? 0 : 1))) {
    return;
  }
  mark_phase_into(c.clock, kMarkLlCombineEntered);
  const uint32_t ready_tags = c.tags | (p.weights_in_recv ? uint32_t(plan::kTagWeightsInRecv) : 0u);
  if (p.send) {
    if (p.x || p.weights || p.scalars) {
      copy_expert_side(p, smem);
      if (low_latency_last_block(&c.scratch->blocks_sent, gridDim.x)) {
        if (!p.wait && threadIdx.x == 0) c.scratch->state = plan::kStateCombineSent;
        // This rank's own line is read by this grid's blocks only (the wait launch's order
        // after this one is the stream's).
        low_latency_publish(c, plan::LowLatencyFlag::kReady, epoch, ready_tags, 0, !p.wait);
      }
    } else if (blockIdx.x == 0) {
      // Nothing to copy: the rows are where the sources read them (earlier kernels wrote
      // them, and the release is cumulative over those); no reader reads this rank's own line.
      if (!p.wait && threadIdx.x == 0) c.scratch->state = plan::kStateCombineSent;
      low_latency_publish(c, plan::LowLatencyFlag::kReady, epoch, ready_tags, 0, true);
    }
    if (!p.wait) return;
  }
  // Every block waits for every owner; for this rank only when this grid copied its expert side
  // (then its last block publishes): zero-copy rows, or the send kernel before this (the
  // hook's) one, are ordered before this kernel by the stream.
  OwnerRegions* owners = reinterpret_cast<OwnerRegions*>(smem + padded_experts(c.layout));
  const bool own_ordered = !p.send || !(p.x || p.weights || p.scalars);
  bool ok;
  const uint32_t theirs =
      low_latency_wait(c, plan::LowLatencyFlag::kReady, epoch, phase + 1, ok, own_ordered, ready_tags);
  if (threadIdx.x < layout.num_ranks) {
    char* ws = c.topo.peers[threadIdx.x];
    owners[threadIdx.x] = {
        plan::region<uint16_t>(ws, at.combine_rows),
        plan::region<float>(
            ws, (theirs & plan::kTagWeightsInRecv) ? at.recv_weights : at.combine_weights),
        plan::region<float>(ws, at.combine_scalars)};
  }
  const bool all_ok = __syncthreads_and(ok) != 0;
  mark_phase_into(c.clock, kMarkLlCombineWaited);
  if (all_ok) {
    for (int64_t item = global_warp(); item < p.num_tokens * parts.count; item += total_warps()) {
      const int64_t t = item / parts.count, part = item % parts.count;
      const int64_t end = min(hidden, (part + 1) * parts.bytes / 2);
      // Entry (t, k): the expert and the slot the row took.
      auto entry = [&](int k, int32_t& e, int32_t& slot) {
        if (prefetched && t == first_token && k == lane) {
          e = first_e;
          slot = first_slot;
        } else {
          e = p.topk32[t * num_topk + k];
          slot = p.slots[t * num_topk + k];
        }
      };
      // Term k: the row (t, k) took on its owner, weighted by the owner's weight of it.
      auto term = [&](int k, const float*& w) -> const uint16_t* {
        int32_t e, slot;
        entry(k, e, slot);
        if (e < 0 || slot < 0) return nullptr;
        const OwnerRegions& owner = owners[e / local_experts];
        const int64_t row = (e % local_experts) * at.expert_rows + slot;
        w = p.weighted ? owner.weights + row : nullptr;
        return owner.rows + row * hidden;
      };
      sum_row<Vec, Terms, Span, false, Terms == kNarrowTerms, true>(
          num_topk, part * parts.bytes / 2, end, lane, term,
          [&](int64_t h, const Chunk<Vec>& sum) { sum.store(p.y + t * hidden + h); });
      if (part != 0 || !p.scalars_out) continue;
      for (int k = lane; k < num_topk; k += kWarpSize) {
        int32_t e, slot;
        entry(k, e, slot);
        p.scalars_out[t * num_topk + k] =
            e < 0 || slot < 0
                ? 0.0f
                : owners[e / local_experts].scalars[(e % local_experts) * at.expert_rows + slot];
      }
    }
  }
  mark_phase_into(c.clock, kMarkLlCombineSummed);
  if (last_to_finish(&c.scratch->blocks_done) && threadIdx.x == 0) {
    c.scratch->round = epoch;
    c.scratch->state = plan::kStateIdle;
  }
  mark_phase_into(c.clock, kMarkLlCombineFinished);
}

template <int Vec>
__global__ void __launch_bounds__(kThreads)
    low_latency_backward_kernel(LowLatencyBackwardParams p) {
  extern __shared__ int32_t prefix[];  // [E_l + 1]
  const LowLatencyContext& c = p.ll;
  const plan::LowLatencyLayout& layout = c.layout;
  const int32_t phase = plan::low_latency_send_phase(plan::kKindBackward);
  const uint64_t epoch = c.scratch->round + 1;
  const SendBlocks blocks = send_blocks(0);
  const int64_t first = first_entry(c, p.rows, blocks);
  if (!low_latency_enter(c, plan::low_latency_step(false, false), phase)) return;
  send_rows(c, p.rows, first, phase, blocks, nullptr);
  if (low_latency_last_block(&c.scratch->blocks_sent, gridDim.x)) {
    low_latency_publish(c, plan::LowLatencyFlag::kSent, epoch, c.tags);
  }
  // Every block waits for every source (its own grid's last block among them).
  bool ok;
  (void)low_latency_wait(c, plan::LowLatencyFlag::kSent, epoch, phase + 1, ok, false, 0);
  if (__syncthreads_and(ok) != 0) {
    const int local_experts = c.regions.local_experts;
    const int64_t hidden = layout.hidden, expert_rows = c.regions.expert_rows;
    block_prefix(p.counts, local_experts, prefix);
    const auto* grads =
        plan::region<const uint16_t>(c.topo.peers[c.topo.rank], c.regions.recv_rows);
    const int lane = lane_id();
    for (int64_t n = global_warp(); n < prefix[local_experts]; n += total_warps()) {
      const int64_t row = real_row(prefix, local_experts, n, expert_rows);
      const float dot =
          scale_and_dot_row<Vec>(grads + row * hidden, p.x + row * hidden, p.weights[row],
                                 p.grad_x + row * hidden, hidden, lane);
      if (lane == 0) p.grad_weights[row] = dot;
    }
    // The rows past the counts are 0.
    for (int64_t row = global_warp(); row < layout.rows(); row += total_warps()) {
      const int e = static_cast<int>(row / expert_rows);
      if (row % expert_rows < prefix[e + 1] - prefix[e]) continue;
      warp_zero(p.grad_x + row * hidden, hidden * 2, lane);
      if (lane == 0) p.grad_weights[row] = 0.0f;
    }
  }
  if (last_to_finish(&c.scratch->blocks_done) && threadIdx.x == 0) {
    c.scratch->state = plan::kStateDispatched;
  }
}

__global__ void low_latency_fail_kernel(LowLatencyContext c) {
  const int peer = threadIdx.x;
  if (peer >= c.layout.num_ranks) return;
  *static_cast<volatile uint64_t*>(c.layout.failed_flag(c.topo.peers[peer], c.topo.rank)) = 1;
  __threadfence_system();
}

// Every instantiation, with the conditions under which each is picked: the launchers pick from
// these tables and load_low_latency_kernels loads exactly them (docs/decisions.md: lazy loading).
struct CombineVariant {
  int vec;
  bool wide;
  void (*kernel)(LowLatencyCombineParams);
};
constexpr CombineVariant kCombineVariants[] = {
    {8, true, low_latency_combine_kernel<8, kWideTerms, kWideSpan>},
    {8, false, low_latency_combine_kernel<8, kNarrowTerms, kNarrowSpan>},
    {1, false, low_latency_combine_kernel<1, kNarrowTerms, kNarrowSpan>},
};
struct BackwardVariant {
  int vec;
  void (*kernel)(LowLatencyBackwardParams);
};
constexpr BackwardVariant kBackwardVariants[] = {{8, low_latency_backward_kernel<8>},
                                                 {1, low_latency_backward_kernel<1>}};

// Cooperative: every block resident at once (the launch fails rather than deadlock when they
// cannot be).
template <typename Params>
void launch(void (*kernel)(Params), int blocks, bool cooperative, size_t smem, cudaStream_t stream,
            const Params& params) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeCooperative;
  attribute.val.cooperative = 1;
  launch_with(kernel, blocks, kThreads, smem, stream, cooperative ? &attribute : nullptr, params);
}

}  // namespace

// [padded E_l + 1] a prefix, then a combine's owners [R].
size_t low_latency_smem_bytes(const plan::LowLatencyLayout& layout) {
  return static_cast<size_t>(padded_experts(layout)) * sizeof(int32_t) +
         layout.num_ranks * sizeof(OwnerRegions);
}

void load_low_latency_kernels() {
  load_functions({reinterpret_cast<const void*>(low_latency_dispatch_kernel),
                  reinterpret_cast<const void*>(low_latency_fail_kernel)});
  for (const auto& v : kCombineVariants) load_functions({reinterpret_cast<const void*>(v.kernel)});
  for (const auto& v : kBackwardVariants) load_functions({reinterpret_cast<const void*>(v.kernel)});
}

void launch_low_latency_dispatch(const LowLatencyDispatchParams& params, cudaStream_t stream) {
  // A send launch: block 0 and sending blocks. Where the tokens' K entries fit in the Buffer's
  // SMs in units of a divisor of K (the smallest such, below K), a block per unit; else a block
  // per token, up to the SMs. Blocks without a token are not launched: at 1-32 tokens they cost
  // 0.4-0.8 us (docs/performance.md).
  const int64_t senders_max = std::max(params.ll.num_blocks, 2) - 1;
  const int num_topk = params.ll.layout.num_topk;
  const int64_t entries = params.rows.num_tokens * num_topk;
  LowLatencyDispatchParams p = params;
  int64_t senders = std::clamp<int64_t>(params.rows.num_tokens, 1, senders_max);
  for (int unit = 1; params.send && entries > 0 && unit < num_topk; ++unit) {
    if (num_topk % unit == 0 && entries / unit <= senders_max) {
      p.rows.unit_topk = unit;
      senders = entries / unit;
      break;
    }
  }
  // A block's one token (no more tokens than sending blocks) through shared memory and the
  // bulk-copy unit, where it fits.
  p.rows.bulk_rows = params.send && p.rows.unit_topk == 0 && params.rows.num_tokens <= senders &&
                     (params.rows.alignment_bits() & 15) == 0 && params.rows.row_bytes > 0 &&
                     params.rows.row_bytes <= kBulkRowBytes;
  const size_t smem = p.rows.bulk_rows ? static_cast<size_t>(params.rows.row_bytes) : 0;
  launch(low_latency_dispatch_kernel, params.send ? static_cast<int>(senders) + 1 : 1, false, smem,
         stream, p);
}

void launch_low_latency_combine(const LowLatencyCombineParams& params, cudaStream_t stream) {
  const plan::LowLatencyLayout& layout = params.ll.layout;
  const int vec = vector_width(layout.hidden, {params.y});
  const bool wide = wide_sums(vec, RowTerms::kTopkAtSource, layout.num_topk, layout.num_ranks);
  const CombineVariant& variant = pick_variant(
      kCombineVariants, [&](const CombineVariant& v) { return v.vec == vec && v.wide == wide; });
  launch(variant.kernel, params.ll.num_blocks, params.send && params.wait,
         low_latency_smem_bytes(layout), stream, params);
}

void launch_low_latency_backward(const LowLatencyBackwardParams& params, cudaStream_t stream) {
  const int vec = vector_width(params.ll.layout.hidden, {params.x, params.grad_x});
  const BackwardVariant& variant =
      pick_variant(kBackwardVariants, [&](const BackwardVariant& v) { return v.vec == vec; });
  launch(variant.kernel, params.ll.num_blocks, true, low_latency_smem_bytes(params.ll.layout),
         stream, params);
}

void launch_low_latency_fail(const LowLatencyContext& context, cudaStream_t stream) {
  const int threads = ((context.layout.num_ranks + 31) / 32) * 32;
  low_latency_fail_kernel<<<1, threads, 0, stream>>>(context);
}

}  // namespace epx::cuda
