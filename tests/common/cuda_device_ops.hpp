// CUDA helpers for the GPU tests and the demo (compiled only with CUDA): device copies for the
// scenario, a poisoned allocator, the unique id handed from rank 0 to the others through a file,
// and a GPU count taken in a child process (a parent that initialises CUDA cannot fork ranks).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>

#include "common/scenario.hpp"
#include "epx/buffer.hpp"
#include "epx/comm.hpp"

namespace epx::testing {

DeviceOps cuda_device_ops(int device, void* stream);
std::shared_ptr<Allocator> poisoned_cuda_allocator();

// Rank 0 makes an NCCL unique id and writes it to `path`; the other ranks wait for the file
// (bounded by timeout_seconds) and read it.
UniqueId share_unique_id(int rank, const std::string& path, double timeout_seconds = 60);

// CUDA devices visible, counted in a forked child so this process stays CUDA-free.
int count_cuda_devices();

// Raises epx::Error(kTransport) naming `what` when a CUDA call failed.
void check_cuda(cudaError_t status, const char* what);

// A tiny routing dispatch (kTinyTokens tokens) for the error and timeout tests: its inputs on
// `device`, uploaded on `stream`; topk_idx[0][1] = bad_expert when that is non-zero.
constexpr int64_t kTinyTokens = 4;
struct TinyInputs {
  std::shared_ptr<void> x, topk;
  DispatchInputs view;
};
TinyInputs tiny_inputs(const Buffer& buffer, int rank, int64_t bad_expert, int device,
                       void* stream);

// How the rank processes of a GPU test or benchmark are joined: NCCL (one GPU per rank, the
// unique id rank 0 writes to a file) or CUDA IPC (rank r on GPU r % visible GPUs, so any number
// of ranks runs on one GPU; the rendezvous names the shared-memory segments).
enum class GpuTransport { kNccl, kIpc };
const char* to_string(GpuTransport transport);

// What a rank process needs: its device, a stream and its communicator.
struct RankContext {
  int rank;
  int device;
  cudaStream_t stream;
  Comm comm;
  DeviceOps ops() const { return cuda_device_ops(device, stream); }
};
// `rendezvous`: a unique name (unique_name(), multi_process.hpp); NCCL puts its id file in /tmp.
RankContext open_rank(GpuTransport transport, int rank, int num_ranks,
                      const std::string& rendezvous);

}  // namespace epx::testing
