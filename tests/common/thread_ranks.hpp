// Ranks as threads of one process (ThreadGroup, Comm::cuda_threads) for the GPU tests and
// bench_gpu: R ranks on a single GPU, or spread over the visible ones.
// The calling process stays CUDA-free (a process that has initialised CUDA cannot fork rank
// processes afterwards): the threads run in one forked child.
#pragma once

#include <cuda_runtime.h>

#include <barrier>
#include <functional>
#include <string>

#include "common/cuda_device_ops.hpp"
#include "epx/comm.hpp"

namespace epx::testing {

// Where the ranks run: all on device 0, or rank r on device r % (visible devices).
enum class Placement { kOneGpu, kSpread };

// A rank thread's context.
struct ThreadRank {
  int rank;
  int num_ranks;
  int device;
  int ranks_on_device;  // ranks sharing this rank's device (their blocks must all fit)
  cudaStream_t stream;
  Comm comm;
  // Set when EPX_TEST_ALIGN_RANKS=1: ops().before_operation waits for every rank. For runs
  // under compute-sanitizer: there, eight ranks that reach an operation at different times
  // (each first checks the previous one against the reference on the host) time out in it
  // every time; lined up they pass
  // (tests/gpu/logs/2026-11-29-h200x1-stress-cc2470e.log); presumably the tool holds a rank's
  // CUDA calls while a peer's kernel spins waiting for that rank.
  std::barrier<>* align = nullptr;
  DeviceOps ops() const;
};

// Runs fn on `num_ranks` threads of one forked child (a ThreadGroup with `group_timeout`);
// "" when every rank returned "", else one line per failing rank. The child is killed after
// `timeout_seconds`, so a deadlock fails the test instead of hanging it.
std::string run_threads(int num_ranks, Placement placement, double group_timeout,
                        const std::function<std::string(const ThreadRank&)>& fn,
                        double timeout_seconds);

}  // namespace epx::testing
