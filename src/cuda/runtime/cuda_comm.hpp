// The state behind a CUDA Comm, whatever joins the ranks (an NCCL communicator: nccl_comm.hpp;
// the threads of one process: thread_comm.hpp): the rank's device, and how a zeroed symmetric
// workspace is made on every rank.
#pragma once

#include <cstddef>
#include <memory>

#include "core/comm_state.hpp"
#include "cuda/runtime/peer_workspace.hpp"

namespace epx::detail {

struct CudaCommState : CommState {
  int device = 0;
  Transport transport() const override { return Transport::kCuda; }
  // Collective: every rank calls it for each buffer, in the same order, with the same bytes.
  // The device `device` is current when it is called.
  virtual std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes) = 0;
};

}  // namespace epx::detail
