// What kernels record for the host. An error: the first thread to claim the device `failed`
// flag writes the record into host-mapped memory (plain stores; no atomics on host memory), and
// later kernels skip their work until the host has raised the error and cleared the flag.
// The phase clock (host side: cuda/kernels/kernels.hpp): mark_phase stamps the global timer in
// thread 0 of each block when built with EPX_PHASE_CLOCK, and is empty otherwise. The stamps
// live in the one translation unit that defines EPX_PHASE_CLOCK_STORAGE (dispatch_kernels.cu).
#pragma once

#include "cuda/device/device_primitives.cuh"
#include "cuda/kernels/kernels.hpp"

namespace epx::cuda {

__device__ __forceinline__ void record_error(const Topology& topo, int32_t code, int32_t phase,
                                             int32_t peer, int32_t value = 0, uint64_t expected = 0,
                                             uint64_t seen = 0) {
  if (atomicCAS(topo.failed, 0, 1) != 0) return;
  volatile DeviceStatus* status = topo.status;
  status->phase = phase;
  status->peer = peer;
  status->value = value;
  status->expected = expected;
  status->seen = seen;
  __threadfence_system();
  status->code = code;
  __threadfence_system();
}

// Stamps `mark` into the stamps at `stamps` (phase_clock_stamps_on_device; null: nothing is
// stamped), from any translation unit.
#ifdef EPX_PHASE_CLOCK
__device__ __forceinline__ void mark_phase_into(uint64_t* stamps, PhaseMark mark) {
  if (stamps && threadIdx.x == 0 && blockIdx.x < kClockBlocks) {
    stamps[blockIdx.x * kMarkCount + mark] = global_timer_ns();
  }
}
#else
__device__ __forceinline__ void mark_phase_into(uint64_t*, PhaseMark) {}
#endif

// The same into the stamps themselves, in the translation unit that holds them.
#if defined(EPX_PHASE_CLOCK) && defined(EPX_PHASE_CLOCK_STORAGE)
__device__ uint64_t phase_clock_stamps[kClockBlocks * kMarkCount];
__device__ __forceinline__ void mark_phase(PhaseMark mark) {
  mark_phase_into(phase_clock_stamps, mark);
}
#else
__device__ __forceinline__ void mark_phase(PhaseMark) {}
#endif

}  // namespace epx::cuda
