// Host-side checks of every Buffer input (docs/semantics.md, "Errors"). They run before any
// communication, so a rejected call writes nothing to any peer.
#pragma once

#include <initializer_list>
#include <vector>

#include "epx/buffer.hpp"

namespace epx::detail {

// What one tensor argument must look like. A shape entry of -1 accepts any extent.
struct TensorSpec {
  const char* name;
  std::initializer_list<DType> dtypes;
  std::vector<int64_t> shape;
};

void check_tensor(const TensorView& tensor, const TensorSpec& spec, Device device);
void check_optional_tensor(const TensorView& tensor, const TensorSpec& spec, Device device);

void check_config(const BufferConfig& config, int num_ranks);
// x (and x_scales), weights and aux of `num_tokens` tokens as the buffer takes them.
void check_tokens(const DispatchInputs& in, const BufferConfig& config, Device device,
                  int64_t num_tokens);
void check_dispatch(const DispatchInputs& in, const DispatchOptions& options,
                    const BufferConfig& config, Device device);
void check_cached_dispatch(const DispatchInputs& in, const Handle& handle,
                           const BufferConfig& config, Device device);
void check_handle(const Handle& handle, uint64_t buffer_id, int rank, int num_ranks,
                  const char* operation);
void check_combine(const CombineInputs& in, const Handle& handle, const BufferConfig& config,
                   Device device);
void check_combine_backward(const TensorView& grad_y, const Handle& handle, const TensorView& x,
                            const TensorView& weights, const BufferConfig& config, Device device);

}  // namespace epx::detail

// Host-side checks of the low-latency calls' inputs (docs/semantics.md, "Low-latency mode"),
// in the style of core/validate.hpp; shapes come from the configuration (S_ll, E_l, R, H, K).
namespace epx::detail {

// Part of check_config: S_ll >= 0, and the ids src_info holds fit int32.
void check_low_latency_config(const BufferConfig& config, int num_ranks);
// The mode is on (S_ll > 0).
void check_low_latency_on(const BufferConfig& config, const char* operation);
void check_low_latency_dispatch(const DispatchInputs& in, const BufferConfig& config,
                                Device device);
void check_low_latency_handle(const LowLatencyHandle& handle, uint64_t buffer_id, int rank,
                              int num_ranks, const char* operation);
void check_low_latency_cached(const DispatchInputs& in, const LowLatencyHandle& handle,
                              const BufferConfig& config, Device device);
void check_low_latency_combine(const LowLatencyCombineInputs& in, const BufferConfig& config,
                               int num_ranks, Device device);
void check_low_latency_backward(const TensorView& grad_y, const LowLatencyHandle& handle,
                                const TensorView& x, const TensorView& weights,
                                const BufferConfig& config, int num_ranks, Device device);

}  // namespace epx::detail
