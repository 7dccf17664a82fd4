// The state behind a CUDA Comm, whatever joins the ranks (an NCCL communicator: nccl_comm.cpp;
// processes sharing workspaces through CUDA IPC: ipc_comm.cpp; the threads of one process:
// thread_comm.cpp): the rank's device, and how a zeroed symmetric workspace is made on every
// rank.
#pragma once

#include <cstddef>
#include <memory>

#include "core/engine.hpp"
#include "core/setup_record.hpp"

// A CUDA rank's symmetric workspace: its own base and a device array with every rank's base
// (all the kernels know of peers). Made collectively by the communicator
// (CudaCommState::open_workspace) and freed collectively by its destructor, so every rank
// creates and destroys its workspaces in the same order. Implementations: an NCCL symmetric
// window (nccl_comm.cpp), a thread group's cudaMalloc (thread_comm.cpp), IPC-shared memory
// (ipc_comm.cpp).
namespace epx::detail {

class PeerWorkspace {
 public:
  virtual ~PeerWorkspace() = default;
  char* local() const { return local_; }
  char* const* device_peers() const { return peers_; }  // [R] in device memory
  // Another rank of the group runs on this rank's device (a thread group on one GPU).
  bool shares_device() const { return shares_device_; }

 protected:
  char* local_ = nullptr;
  char** peers_ = nullptr;
  bool shares_device_ = false;
};

}  // namespace epx::detail

namespace epx::detail {

// Makes `cuda_device` current for `rank` (kInvalidArgument naming the rank when it does not
// exist): the first step of Comm::ipc, Comm::cuda_threads and Comm::nccl (defined in
// thread_comm.cpp).
void use_cuda_device(int rank, int cuda_device);

struct CudaCommState : CommState {
  int device = 0;
  // Collective: every rank calls it for each buffer, in the same order. Each rank states its
  // `record`; when a peer's differs, every rank raises kInvalidArgument naming both ranks and
  // the fields. Every wait for a peer is bounded by `timeout_seconds` (kTimeout naming the
  // rank and step). The device `device` is current when it is called.
  virtual std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                        double timeout_seconds) = 0;
};

}  // namespace epx::detail
