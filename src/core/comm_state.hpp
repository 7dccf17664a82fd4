// The transport-specific state behind an epx::Comm. Each transport derives its own.
#pragma once

#include <cstdint>

#include "epx/comm.hpp"

namespace epx::detail {

struct CommState {
  virtual ~CommState() = default;
  int rank = 0;
  int num_ranks = 1;
  uint64_t next_buffer = 0;  // buffers are created in the same order on every rank
  virtual Transport transport() const = 0;
};

}  // namespace epx::detail
