// Comm::host: the host transport's communicator (host_comm.hpp).
#include "host/host_comm.hpp"

#include <cctype>

#include "epx/error.hpp"

namespace epx {

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

}  // namespace epx
