// The CUDA transport's low-latency mode (cuda_low_latency.cpp): every LL call as one launch of
// cuda/kernels/low_latency.hpp's kernels (two with a hook), its outputs views into the
// workspace or one allocation per call. CudaEngine (cuda_engine.cpp) owns it and hands it the
// errors its kernels recorded in LL phases.
#pragma once

#include <functional>
#include <optional>

#include "core/engine.hpp"
#include "core/low_latency_engine.hpp"
#include "cuda/kernels/low_latency.hpp"
#include "cuda/runtime/device_memory.hpp"

namespace epx::detail {

class CudaLowLatency final : public LowLatencyEngine {
 public:
  // What it reads of its engine at each call: the kernels' topology and this rank's own
  // workspace (which exists only once every rank has set up).
  struct EngineLinks {
    std::function<cuda::Topology()> topology;
    std::function<char*()> local_workspace;
  };
  // Made before the engine opens its workspace: the scratch is allocated (and set) on the
  // current device while nothing can wait for this rank yet.
  CudaLowLatency(const EngineContext& context, const plan::LowLatencyLayout& layout, int device,
                 int num_blocks, EngineLinks links);

  Tensor combine_input() override;
  // An error a kernel recorded in an LL phase (the engine cleared the record): fails the mode
  // and raises it.
  [[noreturn]] void raise_device_error(const cuda::DeviceStatus& status);

 protected:
  LowLatencyDispatchResult send_dispatch(const DispatchInputs& in, const LowLatencyHandle* cached,
                                         int half, bool wait, void* stream) override;
  LowLatencyCombineResult send_combine(const LowLatencyCombineInputs& in,
                                       const LowLatencyHandle& handle, int half, bool wait,
                                       void* stream) override;
  CombineBackwardResult run_combine_backward(const TensorView& grad_y,
                                             const LowLatencyHandle& handle, const TensorView& x,
                                             const TensorView& weights, int half,
                                             void* stream) override;
  void wait_part(void* stream) override;
  void publish_failed(void* stream) override;

 private:
  cuda::LowLatencyContext kernel_context(int half, uint32_t tags) const;
  Tensor view(void* data, DType dtype, std::vector<int64_t> shape) const;

  const EngineContext& context_;
  int device_;
  int num_blocks_;
  EngineLinks links_;
  DeviceArray<cuda::LowLatencyScratch> scratch_;
  DeviceArray<int32_t> old_counts_;  // [2][E_l], see cuda::LowLatencyContext
  uint64_t* clock_;                  // the phase clock's stamps (null: not compiled in)
  // The wait part a hook left due: of a dispatch or of a combine.
  std::optional<cuda::LowLatencyDispatchParams> pending_dispatch_;
  std::optional<cuda::LowLatencyCombineParams> pending_combine_;
};

}  // namespace epx::detail
