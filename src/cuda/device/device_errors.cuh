// Recording an error from a kernel: the first thread to claim the device `failed` flag writes
// the record into host-mapped memory (plain stores; no atomics on host memory), and later
// kernels skip their work until the host has raised the error and cleared the flag.
#pragma once

#include "cuda/kernels/kernels.hpp"

namespace epx::cuda {

__device__ __forceinline__ void record_error(const Topology& topo, int32_t code, int32_t phase,
                                             int32_t peer, int32_t value = 0,
                                             uint64_t expected = 0, uint64_t seen = 0) {
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

}  // namespace epx::cuda
