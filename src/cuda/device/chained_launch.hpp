// Chained launches (programmatic dependent launch, sm_90): a kernel of an operation is launched
// so that the GPU may schedule it while the kernel before it on the stream is still running; it
// waits at its first instruction (chain_wait: griddepcontrol.wait) until that kernel has
// finished and its memory is visible, so the stream's order and the memory model are those of
// a plain launch. What goes is the gap between the two kernels (docs/performance.md).
//
// Off when ranks of a thread group share the device: a chained kernel's blocks hold their SMs
// while they wait, and the sharing ranks' spinning kernels need every SM they can get.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace epx::cuda {

// Device side: every kernel launched through launch_chained starts with these two. A kernel
// launched without the attribute passes both at once.
__device__ __forceinline__ void chain_wait() {
  asm volatile("griddepcontrol.wait;" ::: "memory");
}
// Lets the next chained kernel be scheduled now (it still waits for this one to finish).
__device__ __forceinline__ void chain_release() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}
__device__ __forceinline__ void chain_start() {
  chain_wait();
  chain_release();
}

// A launch with at most one launch attribute (null: a plain launch); also the low-latency
// kernels' cooperative launches (cuda/kernels/low_latency_kernels.cu).
template <typename... Params, typename... Args>
void launch_with(void (*kernel)(Params...), int blocks, int threads, size_t smem,
                 cudaStream_t stream, const cudaLaunchAttribute* attribute, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3(threads);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = const_cast<cudaLaunchAttribute*>(attribute);
  config.numAttrs = attribute ? 1 : 0;
  cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
void launch_chained(void (*kernel)(Params...), int blocks, int threads, size_t smem,
                    cudaStream_t stream, bool chained, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  launch_with(kernel, blocks, threads, smem, stream, chained ? &attribute : nullptr,
              std::forward<Args>(args)...);
}

}  // namespace epx::cuda
