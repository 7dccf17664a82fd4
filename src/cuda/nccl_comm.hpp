// CUDA transport communicator: an NCCL communicator (created by epx from a unique id, or the
// caller's) on one CUDA device per rank.
#pragma once

#include <nccl.h>

#include "core/comm_state.hpp"

namespace epx::detail {

struct CudaCommState final : CommState {
  ncclComm_t comm = nullptr;
  int device = 0;
  bool owned = false;  // created by epx (destroyed with the last Comm copy)
  Transport transport() const override { return Transport::kCuda; }
  ~CudaCommState() override;
};

}  // namespace epx::detail
