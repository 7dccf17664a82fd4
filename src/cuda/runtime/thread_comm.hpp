// CUDA transport for ranks that are threads of one process (Comm::cuda_threads): the ranks of
// a ThreadGroup meet in its rendezvous to exchange their workspaces (thread_workspace.cpp).
#pragma once

#include <memory>

#include "core/thread_group.hpp"
#include "cuda/runtime/cuda_comm.hpp"

namespace epx::detail {

struct ThreadCommState final : CudaCommState {
  std::shared_ptr<ThreadGroupState> group;
  Transport transport() const override { return Transport::kCudaThreads; }
  // The rendezvous waits are bounded by the group's timeout.
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
};

}  // namespace epx::detail
