// A CUDA rank's symmetric workspace: its own base and a device array with every rank's base
// (what the kernels address peers through). Made by the communicator (CudaCommState), freed
// collectively by its destructor.
#pragma once

#include <cstddef>
#include <memory>

#include "core/comm_state.hpp"

namespace epx::detail {

class PeerWorkspace {
 public:
  virtual ~PeerWorkspace() = default;
  char* local() const { return local_; }
  char* const* device_peers() const { return peers_; }  // [R] in device memory

 protected:
  char* local_ = nullptr;
  char** peers_ = nullptr;
};

// The state behind a CUDA Comm: the rank's device, and how its workspace is made.
struct CudaCommState : CommState {
  int device = 0;
  Transport transport() const override { return Transport::kCuda; }
  // A zeroed workspace of `bytes` on every rank (collective: every rank calls it in turn).
  virtual std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes) = 0;
};

}  // namespace epx::detail
