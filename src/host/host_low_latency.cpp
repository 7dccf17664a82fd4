// The low-latency protocol of docs/protocol.md over the host transport's shared-memory
// workspaces, in plain loops: slots are claimed with atomics on the owners' counters
// (std::atomic_ref on shared memory, so row order inside an expert is by arrival), flags are
// raised with releases and read with acquires, every wait is bounded by the timeout.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "core/output_batch.hpp"
#include "epx/error.hpp"
#include "host/host_comm.hpp"
#include "plan/low_latency_layout.hpp"
#include "plan/numerics.hpp"

namespace epx::detail {
namespace {

template <typename T>
std::atomic_ref<T> atomic(T& value) {
  return std::atomic_ref<T>(value);
}

// Raises `flag` to `value` (flags only grow; each line has this rank as its one writer).
void publish(uint64_t* flag, uint64_t value) {
  std::atomic_ref<uint64_t> word(*flag);
  uint64_t seen = word.load(std::memory_order_relaxed);
  while (seen < value && !word.compare_exchange_weak(seen, value, std::memory_order_release)) {
  }
}

int64_t row_bytes_of(const TensorView& x) {
  return x.size(1) * static_cast<int64_t>(element_size(x.dtype));
}

Tensor view(void* data, DType dtype, std::vector<int64_t> shape) {
  return Tensor{TensorView(data, dtype, std::move(shape), Device::cpu()), nullptr};
}

class HostLowLatency final : public LowLatencyEngine {
 public:
  HostLowLatency(const EngineContext& context, const ShmSegments& segments,
                 const plan::LowLatencyLayout& layout)
      : LowLatencyEngine(layout),
        context_(context),
        segments_(segments),
        rank_(segments.rank()),
        num_ranks_(segments.num_ranks()) {
    // Unknown before a half's first round: everything past its counts is cleared then.
    for (auto& counts : old_counts_) counts.assign(layout_.local_experts(), layout_.expert_rows());
  }

  Tensor combine_input() override {
    return view(layout_.combine_rows(local()), DType::kBFloat16,
                {layout_.local_experts(), layout_.expert_rows(), layout_.hidden});
  }

 protected:
  LowLatencyDispatchResult send_dispatch(const DispatchInputs& in, const LowLatencyHandle* cached,
                                         int half, bool wait, void*) override {
    const uint32_t kind = cached ? plan::kKindCached : plan::kKindDispatch;
    enter(kind, false);
    LowLatencyHandle handle =
        cached ? *cached : new_handle(context_, in.x.size(0), Device::cpu(), nullptr);
    pending_ = Pending{.kind = kind,
                       .half = half,
                       .tags = dispatch_tags(in, kind, half),
                       .counts = handle.counts.ptr<int32_t>()};
    send_rows(in, handle, half, !cached);
    publish_to_peers(/*ready=*/false,
                     pending_.tags | (pending_.bad_value ? plan::kTagBadRouting : 0u));
    state_ = plan::kStateDispatchSent;
    LowLatencyDispatchResult result = receive_views(local(), half, in, handle, Device::cpu());
    if (wait) wait_part(nullptr);
    return result;
  }

  LowLatencyCombineResult send_combine(const LowLatencyCombineInputs& in,
                                       const LowLatencyHandle& handle, int half, bool wait,
                                       void*) override {
    enter(plan::kKindCombine, false);
    char* ws = local();
    const bool weights_in_recv =
        in.weights.defined() && in.weights.data == layout_.recv_weights(ws, half);
    LowLatencyCombineResult result;
    OutputBatch outputs;
    const int64_t num_tokens = handle.num_tokens;
    outputs.add(&result.x, DType::kBFloat16, {num_tokens, layout_.hidden});
    if (in.scalars.defined()) {
      outputs.add(&result.scalars, DType::kFloat32, {num_tokens, layout_.num_topk});
    }
    outputs.allocate(*context_.allocator, Device::cpu(), nullptr);
    // The expert side: its rows (unless they were written into the combine region itself), its
    // weights (unless they are the dispatch's), its scalars, into the combine region.
    const bool copy_x = in.x.data != layout_.combine_rows(ws);
    const int64_t hidden = layout_.hidden;
    for_each_row(handle.counts.ptr<int32_t>(), [&](int64_t row) {
      if (copy_x) {
        std::memcpy(layout_.combine_rows(ws) + row * hidden, in.x.ptr<uint16_t>() + row * hidden,
                    static_cast<size_t>(hidden) * 2);
      }
      if (in.weights.defined() && !weights_in_recv) {
        layout_.combine_weights(ws)[row] = in.weights.ptr<float>()[row];
      }
      if (in.scalars.defined()) layout_.combine_scalars(ws)[row] = in.scalars.ptr<float>()[row];
    });
    const uint32_t tags = combine_tags(in, half);
    publish_to_peers(/*ready=*/true, tags | (weights_in_recv ? plan::kTagWeightsInRecv : 0u));
    state_ = plan::kStateCombineSent;
    pending_ = Pending{.kind = plan::kKindCombine,
                       .half = half,
                       .tags = tags,
                       .topk = handle.topk_idx.ptr<int32_t>(),
                       .slots = handle.slots.ptr<int32_t>(),
                       .num_tokens = num_tokens,
                       .y = result.x.ptr<uint16_t>(),
                       .scalars = result.scalars.ptr<float>()};
    if (wait) wait_part(nullptr);
    return result;
  }

  CombineBackwardResult run_combine_backward(const TensorView& grad_y,
                                             const LowLatencyHandle& handle, const TensorView& x,
                                             const TensorView& weights, int half, void*) override {
    enter(plan::kKindBackward, false);
    CombineBackwardResult result;
    OutputBatch outputs;
    const int32_t local_experts = layout_.local_experts();
    const int64_t hidden = layout_.hidden, rows = layout_.expert_rows();
    outputs.add(&result.grad_x, DType::kBFloat16, {local_experts, rows, hidden});
    outputs.add(&result.grad_weights, DType::kFloat32, {local_experts, rows});
    outputs.allocate(*context_.allocator, Device::cpu(), nullptr);
    DispatchInputs rows_in;
    rows_in.x = grad_y;
    pending_ = Pending{.kind = plan::kKindBackward,
                       .half = half,
                       .tags = dispatch_tags(rows_in, plan::kKindBackward, half),
                       .counts = handle.counts.ptr<int32_t>()};
    send_rows(rows_in, handle, half, false);
    publish_to_peers(/*ready=*/false, pending_.tags);
    state_ = plan::kStateDispatchSent;
    wait_part(nullptr);
    // The expert side, from the grad_y rows that arrived in the receive region.
    auto* grad_x = result.grad_x.ptr<uint16_t>();
    auto* grad_w = result.grad_weights.ptr<float>();
    std::memset(grad_x, 0, static_cast<size_t>(layout_.rows() * hidden) * 2);
    std::memset(grad_w, 0, static_cast<size_t>(layout_.rows()) * 4);
    const auto* received = reinterpret_cast<const uint16_t*>(layout_.recv_rows(local(), half));
    for_each_row(handle.counts.ptr<int32_t>(), [&](int64_t row) {
      const uint16_t* g = received + row * hidden;
      const uint16_t* x_row = x.ptr<uint16_t>() + row * hidden;
      const float w = weights.ptr<float>()[row];
      float dot = 0.0f;
      for (int64_t h = 0; h < hidden; ++h) {
        const float grad = plan::bf16_bits_to_float(g[h]);
        grad_x[row * hidden + h] = plan::scaled_gradient_bits(w, grad);
        dot = plan::accumulate_weighted(dot, grad, plan::bf16_bits_to_float(x_row[h]));
      }
      grad_w[row] = dot;
    });
    return result;
  }

  void wait_part(void*) override {
    if (pending_.kind == plan::kKindCombine) {
      enter(plan::kKindCombine, true);
      wait_combine();
      ++round_;
      state_ = plan::kStateIdle;
      return;
    }
    enter(pending_.kind, true);
    const int32_t phase = plan::low_latency_send_phase(pending_.kind) + 1;
    if (pending_.bad_value != 0) {
      raise({.kind = LowLatencyFailure::kBadRouting,
             .phase = phase,
             .peer = rank_,
             .value = pending_.bad_value});
    }
    wait_for_peers(false, phase);
    char* ws = local();
    const int32_t local_experts = layout_.local_experts();
    std::vector<int32_t> counts(local_experts);
    for (int32_t e = 0; e < local_experts; ++e) {
      if (pending_.kind != plan::kKindDispatch) {
        counts[e] = pending_.counts[e];
        continue;
      }
      // Every source's claims are done (their flags were acquired above): the counter of this
      // round is final, and is reset for the next one.
      counts[e] = atomic(layout_.counters(ws)[e]).exchange(0, std::memory_order_relaxed);
    }
    if (pending_.kind != plan::kKindBackward) settle_counts(counts, phase);
    state_ = plan::kStateDispatched;
  }

  void publish_failed(void*) override {
    for (int p = 0; p < num_ranks_; ++p) {
      atomic(*layout_.failed_flag(segments_.payload(p), rank_)).store(1, std::memory_order_release);
    }
  }

 private:
  // What the wait part of the last send needs.
  struct Pending {
    uint32_t kind = plan::kKindDispatch;
    int half = 0;
    uint32_t tags = 0;              // this rank's flag tags, which the peers' must match
    int64_t bad_value = 0;          // dispatch: an invalid topk_idx value this rank passed (or 0)
    int32_t* counts = nullptr;      // dispatch: the handle's counts (written; cached: read)
    const int32_t* topk = nullptr;  // combine: the handle's routing, slots, tokens, outputs
    const int32_t* slots = nullptr;
    int64_t num_tokens = 0;
    uint16_t* y = nullptr;
    float* scalars = nullptr;
  };

  char* local() const { return segments_.payload(rank_); }

  // The state word: a part out of turn is dropped and raises (which fails the mode and tells
  // the peers: LowLatencyEngine).
  void enter(uint32_t kind, bool wait_part) {
    const plan::LowLatencyStep step = plan::low_latency_step(kind == plan::kKindCombine, wait_part);
    if (state_ == step.before) return;
    raise({.kind = LowLatencyFailure::kOrder,
           .phase = plan::low_latency_send_phase(kind) + (wait_part ? 1 : 0),
           .peer = rank_,
           .value = state_});
  }

  [[noreturn]] void raise(const LowLatencyFailure& failure) const {
    raise_low_latency_failure(failure, rank_, layout_, context_.config.timeout_seconds);
  }

  // Every (t, k) with a local expert somewhere: its row (and scales, weights, aux, src_info)
  // into its slot of the owner's region. `routing`: slots are claimed from the owners'
  // counters and the handle is filled; else they come from the handle.
  void send_rows(const DispatchInputs& in, const LowLatencyHandle& handle, int half, bool routing) {
    const int32_t num_topk = layout_.num_topk, local_experts = layout_.local_experts();
    const int64_t num_tokens = handle.num_tokens, row_bytes = row_bytes_of(in.x);
    const int64_t scales = in.x_scales.defined() ? layout_.scales_per_row() : 0;
    auto* topk = handle.topk_idx.ptr<int32_t>();
    auto* slots = handle.slots.ptr<int32_t>();
    for (int64_t i = 0; i < num_tokens * num_topk; ++i) {
      const int64_t t = i / num_topk;
      const int32_t k = static_cast<int32_t>(i % num_topk);
      if (routing) {
        const int64_t e = in.topk_idx.dtype == DType::kInt64 ? in.topk_idx.ptr<int64_t>()[i]
                                                             : in.topk_idx.ptr<int32_t>()[i];
        const bool valid = e >= -1 && e < layout_.num_experts;
        if (!valid && pending_.bad_value == 0) pending_.bad_value = e;
        topk[i] = valid ? static_cast<int32_t>(e) : -1;
      }
      const int32_t e = topk[i];
      if (e < 0) {
        if (routing) slots[i] = -1;
        continue;
      }
      const int owner = e / local_experts;
      const int32_t local_expert = e % local_experts;
      char* ws = segments_.payload(owner);
      int32_t slot = slots[i];
      if (routing) {
        slot = atomic(layout_.counters(ws)[local_expert]).fetch_add(1, std::memory_order_relaxed);
        // Past the region (tokens naming one expert twice): dropped; the owner raises.
        if (slot >= layout_.expert_rows()) slot = -1;
        slots[i] = slot;
      }
      if (slot < 0) continue;
      const int64_t row = layout_.row_index(local_expert, slot);
      std::memcpy(layout_.recv_rows(ws, half) + row * row_bytes,
                  in.x.ptr<const char>() + t * row_bytes, static_cast<size_t>(row_bytes));
      if (scales) {
        std::memcpy(layout_.recv_scales(ws, half) + row * scales,
                    in.x_scales.ptr<float>() + t * scales, static_cast<size_t>(scales) * 4);
      }
      if (in.weights.defined()) layout_.recv_weights(ws, half)[row] = in.weights.ptr<float>()[i];
      if (in.aux.defined()) layout_.recv_aux(ws, half)[row] = in.aux.ptr<float>()[i];
      layout_.src_info(ws, half)[row] = layout_.source_id(rank_, t, k);
    }
  }

  void publish_to_peers(bool ready, uint32_t tags) {
    const uint64_t value = plan::low_latency_flag(round_ + 1, tags);
    for (int p = 0; p < num_ranks_; ++p) {
      char* ws = segments_.payload(p);
      publish(ready ? layout_.ready_flag(ws, rank_) : layout_.sent_flag(ws, rank_), value);
    }
  }

  // Waits for every peer's sent (or ready) flag of this round and checks its tags; returns the
  // tags each peer wrote.
  std::vector<uint32_t> wait_for_peers(bool ready, int32_t phase) {
    const uint64_t epoch = round_ + 1;
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(context_.config.timeout_seconds));
    std::vector<uint32_t> tags(num_ranks_);
    for (int p = 0; p < num_ranks_; ++p) {
      uint64_t* flag = ready ? layout_.ready_flag(local(), p) : layout_.sent_flag(local(), p);
      uint64_t seen = atomic(*flag).load(std::memory_order_acquire);
      for (int spins = 0; plan::low_latency_epoch(seen) < epoch; ++spins) {
        // A peer that failed sets its failed flag after any flag it did publish: the flag is
        // read again after it, so a flag that arrived is never overruled.
        if (atomic(*layout_.failed_flag(local(), p)).load(std::memory_order_acquire) != 0) {
          seen = atomic(*flag).load(std::memory_order_acquire);
          if (plan::low_latency_epoch(seen) >= epoch) break;
          raise({.kind = LowLatencyFailure::kPeerDropped, .phase = phase, .peer = p});
        }
        if (std::chrono::steady_clock::now() > deadline) {
          raise({.kind = LowLatencyFailure::kTimeout,
                 .phase = phase,
                 .peer = p,
                 .expected = epoch,
                 .seen = plan::low_latency_epoch(seen)});
        }
        // Spin briefly, then give the core away (CI machines run many ranks on two cores).
        if (spins < 64) {
          std::this_thread::yield();
        } else {
          std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        seen = atomic(*flag).load(std::memory_order_acquire);
      }
      tags[p] = plan::low_latency_tags(seen);
      check_tags(tags[p], p, phase, !ready);
    }
    return tags;
  }

  void check_tags(uint32_t theirs, int peer, int32_t phase, bool dispatch) const {
    if (dispatch && (theirs & plan::kTagBadRouting)) {
      raise({.kind = LowLatencyFailure::kBadRouting, .phase = phase, .peer = peer});
    }
    if (!plan::low_latency_tags_agree(pending_.tags, theirs, dispatch)) {
      raise({.kind = LowLatencyFailure::kMismatch,
             .phase = phase,
             .peer = peer,
             .expected = pending_.tags,
             .seen = theirs});
    }
  }

  // The round's counts into the counts view (and a routing dispatch's handle); weights, aux
  // and src_info cleared past them (0, 0, -1) where an earlier round of this half had rows.
  void settle_counts(std::vector<int32_t>& counts, int32_t phase) {
    char* ws = local();
    const int half = pending_.half;
    const int64_t capacity = layout_.expert_rows();
    int32_t overflowing = -1;
    for (int32_t e = 0; e < layout_.local_experts(); ++e) {
      if (counts[e] > capacity && overflowing < 0) overflowing = e;
      const int32_t count = std::min<int32_t>(counts[e], static_cast<int32_t>(capacity));
      for (int64_t slot = count; slot < old_counts_[half][e]; ++slot) {
        const int64_t row = layout_.row_index(e, slot);
        layout_.recv_weights(ws, half)[row] = 0.0f;
        layout_.recv_aux(ws, half)[row] = 0.0f;
        layout_.src_info(ws, half)[row] = -1;
      }
      old_counts_[half][e] = count;
      layout_.counts(ws, half)[e] = count;
      if (pending_.kind == plan::kKindDispatch) pending_.counts[e] = count;
    }
    if (overflowing >= 0) {
      raise({.kind = LowLatencyFailure::kOverflow,
             .phase = phase,
             .peer = rank_,
             .value = overflowing,
             .seen = static_cast<uint64_t>(counts[overflowing])});
    }
  }

  void wait_combine() {
    const std::vector<uint32_t> tags =
        wait_for_peers(true, plan::low_latency_send_phase(plan::kKindCombine) + 1);
    const int32_t num_topk = layout_.num_topk, local_experts = layout_.local_experts();
    const int64_t hidden = layout_.hidden;
    const int half = pending_.half;
    const bool weighted = pending_.tags & plan::kTagWeights;
    std::vector<float> acc(static_cast<size_t>(hidden));
    for (int64_t t = 0; t < pending_.num_tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int32_t k = 0; k < num_topk; ++k) {
        const int64_t i = t * num_topk + k;
        const int32_t e = pending_.topk[i], slot = pending_.slots[i];
        const bool present = e >= 0 && slot >= 0;
        const int owner = present ? e / local_experts : 0;
        char* ws = segments_.payload(owner);
        const int64_t row = present ? layout_.row_index(e % local_experts, slot) : 0;
        if (pending_.scalars)
          pending_.scalars[i] = present ? layout_.combine_scalars(ws)[row] : 0.0f;
        if (!present) continue;
        const uint16_t* x = layout_.combine_rows(ws) + row * hidden;
        const float w = !weighted ? 1.0f
                        : (tags[owner] & plan::kTagWeightsInRecv)
                            ? layout_.recv_weights(ws, half)[row]
                            : layout_.combine_weights(ws)[row];
        for (int64_t h = 0; h < hidden; ++h) {
          const float value = plan::bf16_bits_to_float(x[h]);
          acc[h] = weighted ? plan::accumulate_weighted(acc[h], w, value)
                            : plan::accumulate(acc[h], value);
        }
      }
      for (int64_t h = 0; h < hidden; ++h) {
        pending_.y[t * hidden + h] = plan::float_to_bf16_bits(acc[h]);
      }
    }
  }

  // fn(row) for every real row of every local expert (rows [0, counts[e]) of expert e).
  template <typename Fn>
  void for_each_row(const int32_t* counts, Fn&& fn) const {
    for (int32_t e = 0; e < layout_.local_experts(); ++e) {
      for (int64_t slot = 0; slot < counts[e]; ++slot) fn(layout_.row_index(e, slot));
    }
  }

  const EngineContext& context_;
  const ShmSegments& segments_;
  int32_t rank_;
  int32_t num_ranks_;
  uint64_t round_ = 0;                 // combines finished: round n's flags carry epoch n + 1
  uint32_t state_ = plan::kStateIdle;  // plan::LowLatencyState
  Pending pending_;
  std::vector<int32_t> old_counts_[2];  // per half: the counts its last round left
};

}  // namespace

std::unique_ptr<LowLatencyEngine> make_host_low_latency(const EngineContext& context,
                                                        const ShmSegments& segments,
                                                        const plan::LowLatencyLayout& layout) {
  return std::make_unique<HostLowLatency>(context, segments, layout);
}

}  // namespace epx::detail
