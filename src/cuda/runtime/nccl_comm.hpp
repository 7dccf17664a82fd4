// CUDA transport over NCCL: a communicator (created by epx from a unique id, or the caller's)
// on one CUDA device per rank; workspaces are NCCL symmetric windows (nccl_workspace.cpp).
#pragma once

#include <nccl.h>

#include "cuda/runtime/cuda_comm.hpp"

namespace epx::detail {

struct NcclCommState final : CudaCommState {
  ncclComm_t comm = nullptr;
  bool owned = false;  // created by epx (destroyed with the last Comm copy)
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes) override;
  ~NcclCommState() override;
};

}  // namespace epx::detail
