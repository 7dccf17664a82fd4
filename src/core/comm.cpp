// What every Comm has, whatever its transport (each transport defines its own factory:
// src/host/host_comm.cpp, src/cuda/runtime/*_comm.cpp).
#include "epx/comm.hpp"

#include "core/comm_state.hpp"

namespace epx {

const char* to_string(Transport transport) {
  switch (transport) {
    case Transport::kHost: return "host";
    case Transport::kNccl: return "nccl";
    case Transport::kIpc: return "ipc";
    case Transport::kCudaThreads: return "cuda threads";
  }
  return "unknown";
}

int Comm::rank() const { return state_->rank; }
int Comm::num_ranks() const { return state_->num_ranks; }
Transport Comm::transport() const { return state_->transport(); }

}  // namespace epx
