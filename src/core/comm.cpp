#include "epx/comm.hpp"

#include <cctype>

#include "core/comm_state.hpp"
#include "epx/error.hpp"
#include "host/host_comm.hpp"

namespace epx {

const char* to_string(Transport transport) {
  return transport == Transport::kHost ? "host" : "cuda";
}

Comm Comm::host(int rank, int num_ranks, const std::string& name) {
  EPX_CHECK(num_ranks >= 1 && num_ranks <= 64, kInvalidArgument,
            "the host transport supports 1 to 64 ranks, got " << num_ranks);
  EPX_CHECK(rank >= 0 && rank < num_ranks, kInvalidArgument,
            "rank " << rank << " is outside [0, " << num_ranks << ")");
  EPX_CHECK(!name.empty() && name.size() <= 128, kInvalidArgument,
            "the host communicator name must have 1 to 128 characters");
  for (char c : name) {
    EPX_CHECK(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_',
              kInvalidArgument,
              "the host communicator name may hold letters, digits, '-' and '_' only: '" << name
                                                                                         << "'");
  }
  auto state = std::make_shared<detail::HostCommState>();
  state->rank = rank;
  state->num_ranks = num_ranks;
  state->name = name;
  return Comm(std::move(state));
}

int Comm::rank() const { return state_->rank; }
int Comm::num_ranks() const { return state_->num_ranks; }
Transport Comm::transport() const { return state_->transport(); }

#if !defined(EPX_WITH_CUDA)
UniqueId Comm::nccl_unique_id() {
  EPX_FAIL(kInvalidArgument, "epx was built without CUDA: the cuda transport is unavailable");
}
Comm Comm::nccl(int, int, const UniqueId&, int) {
  EPX_FAIL(kInvalidArgument, "epx was built without CUDA: the cuda transport is unavailable");
}
Comm Comm::nccl(ncclComm*, int) {
  EPX_FAIL(kInvalidArgument, "epx was built without CUDA: the cuda transport is unavailable");
}
Comm Comm::cuda_threads(const ThreadGroup&, int, int) {
  EPX_FAIL(kInvalidArgument, "epx was built without CUDA: the cuda transport is unavailable");
}
bool Comm::cuda_available() { return false; }
#endif

}  // namespace epx
