#include "cuda/runtime/thread_comm.hpp"

#include "cuda/runtime/cuda_check.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx {

Comm Comm::cuda_threads(const ThreadGroup& group, int rank, int cuda_device) {
  EPX_CHECK(group.state() != nullptr, kInvalidArgument, "the thread group is empty");
  EPX_CHECK(rank >= 0 && rank < group.num_ranks(), kInvalidArgument,
            "rank " << rank << " is outside [0, " << group.num_ranks() << ")");
  int num_devices = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  EPX_CHECK(cuda_device >= 0 && cuda_device < num_devices, kInvalidArgument,
            "rank " << rank << ": CUDA device " << cuda_device << " does not exist (" << num_devices
                    << " visible)");
  EPX_CUDA_CHECK(cudaSetDevice(cuda_device));
  // The device's default pool (cudaMallocAsync, e.g. a caller's inputs) otherwise gives memory
  // back at every synchronisation; unmapping may wait for the whole device, where the other
  // ranks' kernels wait for this rank. The pool keeps its memory instead. (epx's own default
  // allocator has a pool of its own that keeps its memory: src/cuda/runtime/cuda_allocator.cpp.)
  cudaMemPool_t pool;
  EPX_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, cuda_device));
  uint64_t keep = UINT64_MAX;
  EPX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  auto state = std::make_shared<detail::ThreadCommState>();
  state->group = group.state();
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = group.num_ranks();
  return Comm(std::move(state));
}

}  // namespace epx
