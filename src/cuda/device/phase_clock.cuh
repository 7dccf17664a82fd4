// Device side of the phase clock (cuda/phase_clock.hpp): mark_phase stamps the global timer in
// thread 0 of each block when built with EPX_PHASE_CLOCK, and is empty otherwise. The stamps
// live in the one translation unit that defines EPX_PHASE_CLOCK_STORAGE (dispatch_kernels.cu).
#pragma once

#include "cuda/device/device_primitives.cuh"
#include "cuda/kernels/kernels.hpp"

namespace epx::cuda {

#if defined(EPX_PHASE_CLOCK) && defined(EPX_PHASE_CLOCK_STORAGE)
__device__ uint64_t phase_clock_stamps[kClockBlocks * kMarkCount];
__device__ __forceinline__ void mark_phase(PhaseMark mark) {
  if (threadIdx.x == 0 && blockIdx.x < kClockBlocks) {
    phase_clock_stamps[blockIdx.x * kMarkCount + mark] = global_timer_ns();
  }
}
#else
__device__ __forceinline__ void mark_phase(PhaseMark) {}
#endif

}  // namespace epx::cuda
