// A CUDA rank's symmetric workspace: its own base and a device array with every rank's base
// (all the kernels know of peers). Made collectively by the communicator
// (CudaCommState::open_workspace) and freed collectively by its destructor, so every rank
// creates and destroys its workspaces in the same order. Implementations: an NCCL symmetric
// window (nccl_workspace.cpp), a thread group's cudaMalloc (thread_workspace.cpp).
#pragma once

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
