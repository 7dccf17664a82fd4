// CUDA transport over CUDA IPC (Comm::ipc): one process per rank on one host, each rank's
// workspace a cudaMalloc whose IPC handle its peers open (ipc_comm.cpp). The ranks meet through
// POSIX shared-memory segments named after the communicator (core/shm_segments.hpp) for every
// setup and teardown step, all bounded by the buffer's timeout. No NCCL is involved, so it
// works with any NCCL a process has loaded (or none), and ranks may share a GPU.
#pragma once

#include <string>

#include "cuda/runtime/cuda_comm.hpp"

namespace epx::detail {

struct IpcCommState final : CudaCommState {
  std::string name;
  Transport transport() const override { return Transport::kIpc; }
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
};

}  // namespace epx::detail
