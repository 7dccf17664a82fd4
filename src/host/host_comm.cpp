// Comm::host: the host transport's communicator (host_comm.hpp).
#include "host/host_comm.hpp"

#include "core/shm_segments.hpp"

namespace epx {

Comm Comm::host(int rank, int num_ranks, const std::string& name) {
  detail::check_segment_ranks_and_name("host", rank, num_ranks, name);
  auto state = std::make_shared<detail::HostCommState>();
  state->rank = rank;
  state->num_ranks = num_ranks;
  state->name = name;
  return Comm(std::move(state));
}

}  // namespace epx
