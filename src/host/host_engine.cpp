// The host transport: the protocol of docs/protocol.md over POSIX shared memory, one process
// per rank. Plain loops; it is the portable default, the debugging tool, and the transport the
// machines without a GPU test.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/engine.hpp"
#include "core/output_batch.hpp"
#include "core/shm_segments.hpp"
#include "epx/error.hpp"
#include "host/host_comm.hpp"
#include "plan/numerics.hpp"
#include "plan/routing.hpp"
#include "plan/source_plan.hpp"

namespace epx::detail {
namespace {

using plan::SlotMeta;
using plan::WorkspaceLayout;

// Row bytes of a token tensor ([rows, H] bf16 or fp8).
int64_t row_bytes_of(const TensorView& x) {
  return x.size(1) * static_cast<int64_t>(element_size(x.dtype));
}

class HostEngine final : public Engine {
 public:
  explicit HostEngine(const EngineContext& context)
      : context_(context),
        layout_(workspace_layout(context.config, context.comm.num_ranks())),
        rank_(context.comm.rank()),
        num_ranks_(context.comm.num_ranks()),
        segments_(buffer_name(context), rank_, num_ranks_,
                  static_cast<size_t>(layout_.total_bytes()), context.setup,
                  context.config.timeout_seconds) {
    if (context.config.low_latency_max_tokens > 0) {
      low_latency_ = make_host_low_latency(context_, segments_,
                                           low_latency_layout(context.config, num_ranks_, layout_));
    }
  }

  Device device() const override { return Device::cpu(); }
  LowLatencyEngine& low_latency() override {
    return low_latency_ ? *low_latency_ : Engine::low_latency();
  }
  void synchronize(void*) override {}
  void abort(const plan::OpFingerprint&, void*) override { segments_.abort(); }
  void poison(void*) override { segments_.poison(); }

  DispatchResult dispatch(const DispatchInputs& in, const DispatchOptions& options,
                          const Handle* cached, const plan::OpFingerprint& op, void*) override {
    const int64_t num_tokens = in.x.size(0);
    plan::SourcePlan source_plan;
    Handle handle;
    if (cached) {
      handle = *cached;
    } else {
      const bool is64 = in.topk_idx.dtype == DType::kInt64;
      source_plan = plan::plan_source(is64 ? nullptr : in.topk_idx.ptr<int32_t>(),
                                      is64 ? in.topk_idx.ptr<int64_t>() : nullptr, num_tokens,
                                      layout_.num_topk, layout_.num_experts, num_ranks_);
      handle = make_source_handle(in, options, source_plan);
    }
    const int32_t channels = (in.weights.defined() ? plan::kChannelWeights : 0) |
                             (in.aux.defined() ? plan::kChannelAux : 0);

    segments_.barrier(cached ? "cached-dispatch/entry" : "dispatch/entry", &op);
    const bool routing_ok = cached || source_plan.status == plan::kRoutingOk;
    if (!cached) write_headers(source_plan, channels);
    if (routing_ok) stage_tokens(handle, in.x, in.x_scales, in.weights, in.aux, true);
    segments_.barrier(cached ? "cached-dispatch/exit" : "dispatch/exit");

    if (!cached) {
      read_headers(channels);
      fill_receive_handle(handle, options);
    }
    return receive_tokens(handle, in);
  }

  CombineResult combine(const CombineInputs& in, const Handle& handle, ReduceAt reduce_at,
                        const plan::OpFingerprint& op, void*) override {
    const bool at_source = handle.expand && reduce_at == ReduceAt::kSource;
    const int64_t hidden = layout_.hidden;
    const int32_t num_topk = layout_.num_topk;
    const bool weighted = in.weights.defined();

    segments_.barrier("combine/entry", &op);
    const int64_t num_recv = received_tokens(handle);
    const auto* src_token = handle.src_token.ptr<int32_t>();
    const auto* expanded_rows = handle.expanded_rows.ptr<int32_t>();
    const auto* recv_topk = handle.recv_topk_idx.ptr<int32_t>();
    const auto* x = in.x.ptr<uint16_t>();
    const auto* weights = in.weights.ptr<float>();
    std::vector<float> acc(static_cast<size_t>(hidden));
    for (int64_t n = 0; n < num_recv; ++n) {
      const int32_t source = src_token[n] / static_cast<int32_t>(layout_.max_tokens);
      const int64_t token = src_token[n] % layout_.max_tokens;
      char* dst = segments_.payload(source);
      const int32_t* rows_of_token = expanded_rows + n * num_topk;
      if (!handle.expand) {
        std::memcpy(layout_.row(dst, layout_.expert_combine_row_index(rank_, token)),
                    x + n * hidden, static_cast<size_t>(hidden) * 2);
      } else if (!at_source) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int32_t k = 0; k < num_topk; ++k) {
          const int32_t row = rows_of_token[k];
          if (row < 0) continue;
          const uint16_t* x_row = x + int64_t(row) * hidden;
          for (int64_t h = 0; h < hidden; ++h) {
            const float value = plan::bf16_bits_to_float(x_row[h]);
            acc[h] = weighted ? plan::accumulate_weighted(acc[h], weights[row], value)
                              : plan::accumulate(acc[h], value);
          }
        }
        auto* out = reinterpret_cast<uint16_t*>(
            layout_.row(dst, layout_.expert_combine_row_index(rank_, token)));
        for (int64_t h = 0; h < hidden; ++h) out[h] = plan::float_to_bf16_bits(acc[h]);
      } else {
        for (int32_t k = 0; k < num_topk; ++k) {
          const int32_t row = rows_of_token[k];
          if (row < 0) continue;
          std::memcpy(layout_.row(dst, layout_.source_combine_row_index(token, k)),
                      x + int64_t(row) * hidden, static_cast<size_t>(hidden) * 2);
          if (weighted) layout_.row_weights(dst)[token * num_topk + k] = weights[row];
        }
      }
      if (in.scalars.defined()) {
        const auto* scalars = in.scalars.ptr<float>();
        for (int32_t k = 0; k < num_topk; ++k) {
          if (recv_topk[n * num_topk + k] < 0) continue;
          layout_.scalars(dst)[token * num_topk + k] =
              handle.expand ? scalars[rows_of_token[k]] : scalars[n * num_topk + k];
        }
      }
    }
    segments_.barrier("combine/exit");

    CombineResult result;
    const int64_t num_tokens = handle.num_tokens;
    OutputBatch outputs;
    outputs.add(&result.x, DType::kBFloat16, {num_tokens, hidden});
    if (in.scalars.defined()) outputs.add(&result.scalars, DType::kFloat32, {num_tokens, num_topk});
    outputs.allocate(*context_.allocator, Device::cpu(), nullptr);
    auto* y = result.x.ptr<uint16_t>();
    const auto* send_slot = handle.send_slot.ptr<int32_t>();
    const auto* topk = handle.topk_idx.ptr<int32_t>();
    char* local = segments_.payload(rank_);
    const auto* bias0 = in.bias0.ptr<uint16_t>();
    const auto* bias1 = in.bias1.ptr<uint16_t>();
    for (int64_t t = 0; t < num_tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (!at_source) {
        for (int32_t r = 0; r < num_ranks_; ++r) {
          if (send_slot[t * num_ranks_ + r] < 0) continue;
          const auto* row = reinterpret_cast<const uint16_t*>(
              layout_.row(local, layout_.expert_combine_row_index(r, t)));
          for (int64_t h = 0; h < hidden; ++h) {
            acc[h] = plan::accumulate(acc[h], plan::bf16_bits_to_float(row[h]));
          }
        }
      } else {
        for (int32_t k = 0; k < num_topk; ++k) {
          if (topk[t * num_topk + k] < 0) continue;
          const auto* row = reinterpret_cast<const uint16_t*>(
              layout_.row(local, layout_.source_combine_row_index(t, k)));
          const float w = layout_.row_weights(local)[t * num_topk + k];
          for (int64_t h = 0; h < hidden; ++h) {
            const float value = plan::bf16_bits_to_float(row[h]);
            acc[h] = weighted ? plan::accumulate_weighted(acc[h], w, value)
                              : plan::accumulate(acc[h], value);
          }
        }
      }
      for (const uint16_t* bias : {bias0, bias1}) {
        if (!bias) continue;
        for (int64_t h = 0; h < hidden; ++h) {
          acc[h] = plan::accumulate(acc[h], plan::bf16_bits_to_float(bias[t * hidden + h]));
        }
      }
      for (int64_t h = 0; h < hidden; ++h) y[t * hidden + h] = plan::float_to_bf16_bits(acc[h]);
    }
    if (in.scalars.defined()) {
      auto* out = result.scalars.ptr<float>();
      const float* staged = layout_.scalars(local);
      for (int64_t i = 0; i < num_tokens * num_topk; ++i) out[i] = topk[i] >= 0 ? staged[i] : 0.0f;
    }
    return result;
  }

  CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                         const TensorView& x, const TensorView& weights,
                                         const plan::OpFingerprint& op, void*) override {
    const int64_t hidden = layout_.hidden;
    const int32_t num_topk = layout_.num_topk;
    segments_.barrier("combine-backward/entry", &op);
    stage_tokens(handle, grad_y, TensorView(), TensorView(), TensorView(), false);
    segments_.barrier("combine-backward/exit");

    const int64_t capacity = handle.row_capacity;
    CombineBackwardResult result;
    OutputBatch outputs;
    outputs.add(&result.grad_x, DType::kBFloat16, {capacity, hidden});
    outputs.add(&result.grad_weights, DType::kFloat32, {capacity});
    outputs.allocate(*context_.allocator, Device::cpu(), nullptr);
    auto* grad_x = result.grad_x.ptr<uint16_t>();
    auto* grad_w = result.grad_weights.ptr<float>();
    std::memset(grad_x, 0, static_cast<size_t>(capacity * hidden) * 2);
    std::memset(grad_w, 0, static_cast<size_t>(capacity) * 4);
    const auto* x_rows = x.ptr<uint16_t>();
    const auto* w = weights.ptr<float>();
    const auto* expanded_rows = handle.expanded_rows.ptr<int32_t>();
    for_each_received(handle, [&](int64_t n, int32_t, int32_t, const char* staged_row, SlotMeta) {
      const auto* g = reinterpret_cast<const uint16_t*>(staged_row);
      for (int32_t k = 0; k < num_topk; ++k) {
        const int32_t row = expanded_rows[n * num_topk + k];
        if (row < 0) continue;
        const uint16_t* x_row = x_rows + int64_t(row) * hidden;
        float dot = 0.0f;
        for (int64_t h = 0; h < hidden; ++h) {
          const float grad = plan::bf16_bits_to_float(g[h]);
          grad_x[int64_t(row) * hidden + h] = plan::scaled_gradient_bits(w[row], grad);
          dot = plan::accumulate_weighted(dot, grad, plan::bf16_bits_to_float(x_row[h]));
        }
        grad_w[row] = dot;
      }
    });
    return result;
  }

 private:
  static std::string buffer_name(const EngineContext& context) {
    auto& state = static_cast<HostCommState&>(*context.comm.state());
    return state.name + "-b" + std::to_string(context.setup.buffer_index);
  }

  Tensor allocate(DType dtype, std::vector<int64_t> shape) {
    return context_.allocator->allocate(dtype, shape, Device::cpu(), nullptr);
  }

  Tensor int32_tensor(const std::vector<int32_t>& values, std::vector<int64_t> shape) {
    Tensor tensor = allocate(DType::kInt32, std::move(shape));
    std::copy(values.begin(), values.end(), tensor.ptr<int32_t>());
    return tensor;
  }

  // Real received tokens: N when synced, else the device-count copy (host memory here).
  static int64_t received_tokens(const Handle& handle) {
    return handle.counts_synced ? handle.num_recv_tokens : handle.device_counts.ptr<int64_t>()[0];
  }

  // Source half of a routing dispatch's handle.
  Handle make_source_handle(const DispatchInputs& in, const DispatchOptions& options,
                            const plan::SourcePlan& source_plan) {
    const int32_t num_topk = layout_.num_topk;
    const int64_t num_tokens = source_plan.num_tokens;
    const bool is64 = in.topk_idx.dtype == DType::kInt64;
    Handle handle = new_handle(context_, options, num_tokens);
    handle.send_slot = int32_tensor(source_plan.send_slot, {num_tokens, num_ranks_});
    handle.expert_slot = int32_tensor(source_plan.expert_slot, {num_tokens, num_topk});
    std::vector<int32_t> topk(static_cast<size_t>(num_tokens * num_topk));
    for (size_t i = 0; i < topk.size(); ++i) {
      topk[i] = static_cast<int32_t>(is64 ? in.topk_idx.ptr<int64_t>()[i]
                                          : in.topk_idx.ptr<int32_t>()[i]);
    }
    handle.topk_idx = int32_tensor(topk, {num_tokens, num_topk});
    return handle;
  }

  void write_headers(const plan::SourcePlan& source_plan, int32_t channels) {
    const bool ok = source_plan.status == plan::kRoutingOk;
    const int32_t local_experts = layout_.local_experts();
    for (int32_t r = 0; r < num_ranks_; ++r) {
      char* dst = segments_.payload(r);
      *layout_.header(dst, rank_) =
          plan::SourceHeader{.num_tokens = ok ? source_plan.rank_counts[r] : 0,
                             .status = source_plan.status,
                             .channels = channels,
                             .bad_value = source_plan.bad_value};
      int32_t* counts = layout_.expert_counts(dst, rank_);
      for (int32_t e = 0; e < local_experts; ++e) {
        counts[e] = ok ? source_plan.expert_counts[r * local_experts + e] : 0;
      }
    }
  }

  // Raises on every rank if any source found its routing invalid or sent other channels.
  void read_headers(int32_t channels) {
    char* local = segments_.payload(rank_);
    for (int32_t s = 0; s < num_ranks_; ++s) {
      const plan::SourceHeader& header = *layout_.header(local, s);
      EPX_CHECK(header.status == plan::kRoutingOk, kInvalidRouting,
                "rank " << rank_ << ": dispatch aborted: rank " << s << " passed topk_idx value "
                        << header.bad_value << " outside [-1, " << layout_.num_experts << ")");
    }
    for (int32_t s = 0; s < num_ranks_; ++s) {
      const plan::SourceHeader& header = *layout_.header(local, s);
      EPX_CHECK(
          header.channels == channels, kInvalidArgument,
          "rank " << rank_ << ": rank " << s << " dispatched "
                  << ((header.channels & plan::kChannelWeights) ? "with" : "without")
                  << " weights and " << ((header.channels & plan::kChannelAux) ? "with" : "without")
                  << " aux, this rank " << ((channels & plan::kChannelWeights) ? "with" : "without")
                  << " weights and " << ((channels & plan::kChannelAux) ? "with" : "without")
                  << " aux: every rank must pass the same channels");
    }
  }

  // Writes each token of this rank into the staging slot of every destination (rows, fp8
  // scales and, with `with_meta`, the slot metadata).
  void stage_tokens(const Handle& handle, const TensorView& x, const TensorView& x_scales,
                    const TensorView& weights, const TensorView& aux, bool with_meta) {
    const int32_t num_topk = layout_.num_topk;
    const int32_t local_experts = layout_.local_experts();
    const int64_t row_bytes = row_bytes_of(x);
    const int64_t scales_per_row = x_scales.defined() ? x_scales.size(1) : 0;
    const auto* send_slot = handle.send_slot.ptr<int32_t>();
    const auto* expert_slot = handle.expert_slot.ptr<int32_t>();
    const auto* topk = handle.topk_idx.ptr<int32_t>();
    const auto* rows = x.ptr<const char>();
    for (int64_t t = 0; t < handle.num_tokens; ++t) {
      for (int32_t r = 0; r < num_ranks_; ++r) {
        const int32_t slot = send_slot[t * num_ranks_ + r];
        if (slot < 0) continue;
        char* dst = segments_.payload(r);
        std::memcpy(layout_.row(dst, layout_.dispatch_row_index(rank_, slot)), rows + t * row_bytes,
                    static_cast<size_t>(row_bytes));
        if (scales_per_row > 0) {
          std::memcpy(layout_.row_scales(dst, rank_, slot),
                      x_scales.ptr<float>() + t * scales_per_row,
                      static_cast<size_t>(scales_per_row) * 4);
        }
        if (!with_meta) continue;
        SlotMeta meta{layout_.slot_meta(dst, rank_, slot), num_topk};
        *meta.token() = static_cast<int32_t>(t);
        for (int32_t k = 0; k < num_topk; ++k) {
          const int64_t i = t * num_topk + k;
          const bool here = topk[i] >= 0 && plan::rank_of_expert(topk[i], local_experts) == r;
          meta.local_expert()[k] = here ? plan::local_index_of_expert(topk[i], local_experts) : -1;
          meta.expert_slot()[k] = here ? expert_slot[i] : -1;
          meta.weight()[k] = here && weights.defined() ? weights.ptr<float>()[i] : 0.0f;
          meta.aux()[k] = here && aux.defined() ? aux.ptr<float>()[i] : 0.0f;
        }
      }
    }
  }

  // Receive half of a routing dispatch's handle, from the headers and the slot metadata.
  void fill_receive_handle(Handle& handle, const DispatchOptions& options) {
    const int32_t num_topk = layout_.num_topk;
    const int32_t local_experts = layout_.local_experts();
    char* local = segments_.payload(rank_);
    std::vector<int32_t> recv_counts(num_ranks_), source_expert_counts(num_ranks_ * local_experts);
    for (int32_t s = 0; s < num_ranks_; ++s) {
      recv_counts[s] = layout_.header(local, s)->num_tokens;
      std::copy_n(layout_.expert_counts(local, s), local_experts,
                  source_expert_counts.begin() + s * local_experts);
    }
    std::vector<int32_t> recv_offsets(num_ranks_ + 1), tokens_per_expert(local_experts),
        expert_offsets(local_experts + 1), expert_source_offsets(local_experts * num_ranks_);
    plan::compute_receive_offsets(recv_counts.data(), source_expert_counts.data(), num_ranks_,
                                  local_experts, options.expert_alignment, recv_offsets.data(),
                                  tokens_per_expert.data(), expert_offsets.data(),
                                  expert_source_offsets.data());
    const int64_t num_recv = recv_offsets[num_ranks_];
    const int64_t num_rows = options.expand ? expert_offsets[local_experts] : num_recv;
    handle.recv_token_capacity =
        options.sync_counts ? num_recv
                            : plan::worst_case_compact_rows(num_ranks_, layout_.max_tokens);
    handle.row_capacity = !options.expand       ? handle.recv_token_capacity
                          : options.sync_counts ? num_rows
                                                : plan::worst_case_expanded_rows(
                                                      num_ranks_, layout_.max_tokens, num_topk,
                                                      local_experts, options.expert_alignment);
    if (options.sync_counts) {
      handle.num_recv_tokens = num_recv;
      handle.num_rows = num_rows;
      handle.host_tokens_per_expert.assign(tokens_per_expert.begin(), tokens_per_expert.end());
      handle.host_expert_offsets.assign(expert_offsets.begin(), expert_offsets.end());
    }
    handle.recv_counts = int32_tensor(recv_counts, {num_ranks_});
    handle.recv_offsets = int32_tensor(recv_offsets, {num_ranks_ + 1});
    handle.source_expert_counts = int32_tensor(source_expert_counts, {num_ranks_, local_experts});
    handle.tokens_per_expert = int32_tensor(tokens_per_expert, {local_experts});
    handle.expert_offsets = int32_tensor(expert_offsets, {local_experts + 1});
    handle.expert_source_offsets = int32_tensor(expert_source_offsets, {local_experts, num_ranks_});
    handle.device_counts = allocate(DType::kInt64, {2});
    handle.device_counts.ptr<int64_t>()[0] = num_recv;
    handle.device_counts.ptr<int64_t>()[1] = num_rows;

    const int64_t capacity = handle.recv_token_capacity;
    std::vector<int32_t> src_token(capacity, -1), expanded_rows(capacity * num_topk, -1),
        recv_topk(capacity * num_topk, -1);
    for (int32_t s = 0; s < num_ranks_; ++s) {
      for (int32_t slot = 0; slot < recv_counts[s]; ++slot) {
        const int64_t n = recv_offsets[s] + slot;
        SlotMeta meta{layout_.slot_meta(local, s, slot), num_topk};
        src_token[n] = static_cast<int32_t>(s * layout_.max_tokens + *meta.token());
        for (int32_t k = 0; k < num_topk; ++k) {
          const int32_t e = meta.local_expert()[k];
          recv_topk[n * num_topk + k] = e;
          expanded_rows[n * num_topk + k] =
              e >= 0 ? expert_source_offsets[e * num_ranks_ + s] + meta.expert_slot()[k] : -1;
        }
      }
    }
    handle.src_token = int32_tensor(src_token, {capacity});
    handle.expanded_rows = int32_tensor(expanded_rows, {capacity, num_topk});
    handle.recv_topk_idx = int32_tensor(recv_topk, {capacity, num_topk});
  }

  // Calls fn(n, source, slot, staged row, slot metadata) for every received token n.
  template <typename Fn>
  void for_each_received(const Handle& handle, Fn&& fn) {
    char* local = segments_.payload(rank_);
    const auto* recv_counts = handle.recv_counts.ptr<int32_t>();
    const auto* recv_offsets = handle.recv_offsets.ptr<int32_t>();
    for (int32_t s = 0; s < num_ranks_; ++s) {
      for (int32_t slot = 0; slot < recv_counts[s]; ++slot) {
        fn(int64_t(recv_offsets[s]) + slot, s, slot,
           layout_.row(local, layout_.dispatch_row_index(s, slot)),
           SlotMeta{layout_.slot_meta(local, s, slot), layout_.num_topk});
      }
    }
  }

  // Receive epilogue: places staged tokens into compact or expanded outputs.
  DispatchResult receive_tokens(const Handle& handle, const DispatchInputs& in) {
    const int32_t num_topk = layout_.num_topk;
    const int64_t hidden = layout_.hidden;
    const int64_t row_bytes = row_bytes_of(in.x);
    const int64_t scales_per_row = in.x_scales.defined() ? in.x_scales.size(1) : 0;
    const int64_t capacity = handle.expand ? handle.row_capacity : handle.recv_token_capacity;
    DispatchResult result;
    OutputBatch outputs;
    add_dispatch_outputs(outputs, result, handle, in, hidden, num_topk);
    outputs.allocate(*context_.allocator, Device::cpu(), nullptr);
    if (!handle.expand) {
      std::copy_n(handle.recv_topk_idx.ptr<int32_t>(), capacity * num_topk,
                  result.topk_idx.ptr<int32_t>());
    }
    char* x_out = result.x.ptr<char>();
    float* scales_out = result.x_scales.ptr<float>();
    float* weights_out = result.weights.ptr<float>();
    float* aux_out = result.aux.ptr<float>();
    const auto* expanded_rows = handle.expanded_rows.ptr<int32_t>();
    const auto* recv_topk = handle.recv_topk_idx.ptr<int32_t>();
    char* local = segments_.payload(rank_);

    auto place = [&](int64_t out_row, const char* row, const float* scales) {
      std::memcpy(x_out + out_row * row_bytes, row, static_cast<size_t>(row_bytes));
      if (scales_out) {
        std::memcpy(scales_out + out_row * scales_per_row, scales,
                    static_cast<size_t>(scales_per_row) * 4);
      }
    };
    for_each_received(
        handle, [&](int64_t n, int32_t source, int32_t slot, const char* row, SlotMeta meta) {
          const float* scales = scales_out ? layout_.row_scales(local, source, slot) : nullptr;
          if (!handle.expand) {
            place(n, row, scales);
            for (int32_t k = 0; k < num_topk; ++k) {
              const bool here = recv_topk[n * num_topk + k] >= 0;
              if (weights_out) weights_out[n * num_topk + k] = here ? meta.weight()[k] : 0.0f;
              if (aux_out) aux_out[n * num_topk + k] = here ? meta.aux()[k] : 0.0f;
            }
            return;
          }
          for (int32_t k = 0; k < num_topk; ++k) {
            const int32_t out_row = expanded_rows[n * num_topk + k];
            if (out_row < 0) continue;
            place(out_row, row, scales);
            if (weights_out) weights_out[out_row] = meta.weight()[k];
            if (aux_out) aux_out[out_row] = meta.aux()[k];
          }
        });
    if (handle.expand) {
      const auto* offsets = handle.expert_offsets.ptr<int32_t>();
      const auto* tokens = handle.tokens_per_expert.ptr<int32_t>();
      for (int32_t e = 0; e < layout_.local_experts(); ++e) {
        for (int64_t row = offsets[e] + tokens[e]; row < offsets[e + 1]; ++row) {
          if (weights_out) weights_out[row] = 0.0f;
          if (aux_out) aux_out[row] = 0.0f;
          if (handle.zero_padding) {
            std::memset(x_out + row * row_bytes, 0, static_cast<size_t>(row_bytes));
            if (scales_out) {
              std::memset(scales_out + row * scales_per_row, 0,
                          static_cast<size_t>(scales_per_row) * 4);
            }
          }
        }
      }
    }
    result.handle = handle;
    return result;
  }

  EngineContext context_;
  WorkspaceLayout layout_;
  int32_t rank_;
  int32_t num_ranks_;
  ShmSegments segments_;
  std::unique_ptr<LowLatencyEngine> low_latency_;  // host/host_low_latency.cpp; null when off
};

}  // namespace

std::unique_ptr<Engine> make_host_engine(const EngineContext& context) {
  return std::make_unique<HostEngine>(context);
}

}  // namespace epx::detail

// Comm::host: the host transport's communicator (host_comm.hpp).
namespace epx {

Comm Comm::host(int rank, int num_ranks, const std::string& name) {
  detail::check_segment_ranks_and_name("host", rank, num_ranks, name);
  auto state = std::make_shared<detail::HostCommState>();
  state->rank = rank;
  state->num_ranks = num_ranks;
  state->name = name;
  return Comm(std::move(state));
}

}  // namespace epx
