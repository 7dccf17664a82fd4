// CUDA helpers for the GPU tests and the demo (compiled only with CUDA): device copies for the
// scenario, a poisoned allocator, the unique id handed from rank 0 to the others through a file,
// and a GPU count taken in a child process (a parent that initialises CUDA cannot fork ranks).
#pragma once

#include <memory>
#include <string>

#include "common/scenario.hpp"
#include "epx/comm.hpp"

namespace epx::testing {

DeviceOps cuda_device_ops(int device, void* stream);
std::shared_ptr<Allocator> poisoned_cuda_allocator();

// Rank 0 makes an NCCL unique id and writes it to `path`; the other ranks wait for the file
// (bounded by timeout_seconds) and read it.
UniqueId share_unique_id(int rank, const std::string& path, double timeout_seconds = 60);

// CUDA devices visible, counted in a forked child so this process stays CUDA-free.
int count_cuda_devices();

}  // namespace epx::testing
