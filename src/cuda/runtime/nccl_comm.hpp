// CUDA transport over NCCL: a communicator (created by epx from a unique id, or the caller's)
// on one CUDA device per rank; workspaces are NCCL symmetric windows (nccl_workspace.cpp).
#pragma once

#include <nccl.h>

#include <chrono>

#include "cuda/runtime/cuda_comm.hpp"

namespace epx::detail {

struct NcclCommState final : CudaCommState {
  ncclComm_t comm = nullptr;
  bool owned = false;        // created by epx (destroyed with the last Comm copy)
  bool nonblocking = false;  // created by epx in NCCL's non-blocking mode: calls are polled
  Transport transport() const override { return Transport::kNccl; }
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
  ~NcclCommState() override;
};

// Waits until `comm`'s last call has completed (non-blocking mode: ncclInProgress until then),
// at most until `deadline`; raises kTimeout naming `rank` and `step`, or kTransport with NCCL's
// error. A blocking communicator has completed every call already.
void wait_for_nccl(ncclComm_t comm, std::chrono::steady_clock::time_point deadline, int rank,
                   const char* step, double timeout_seconds);

}  // namespace epx::detail
