// Host transport communicator: the ranks are processes on one machine that meet through POSIX
// shared-memory segments whose names start with `name`.
#pragma once

#include <string>

#include "core/comm_state.hpp"

namespace epx::detail {

struct HostCommState final : CommState {
  std::string name;
  Transport transport() const override { return Transport::kHost; }
};

}  // namespace epx::detail
