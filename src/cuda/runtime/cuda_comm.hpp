// The state behind a CUDA Comm, whatever joins the ranks (an NCCL communicator: nccl_comm.hpp;
// processes sharing workspaces through CUDA IPC: ipc_comm.hpp; the threads of one process:
// thread_comm.hpp): the rank's device, and how a zeroed symmetric workspace is made on every
// rank.
#pragma once

#include <cstddef>
#include <memory>

#include "core/comm_state.hpp"
#include "core/setup_record.hpp"
#include "cuda/runtime/peer_workspace.hpp"

namespace epx::detail {

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
