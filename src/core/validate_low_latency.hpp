// Host-side checks of the low-latency calls' inputs (docs/semantics.md, "Low-latency mode"),
// in the style of core/validate.hpp; shapes come from the configuration (S_ll, E_l, R, H, K).
#pragma once

#include "epx/buffer.hpp"

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
