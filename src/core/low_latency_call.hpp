// One low-latency call as Buffer runs it (Buffer::run_low_latency, src/core/buffer.cpp): the
// calls are in src/core/buffer_low_latency.cpp, the numbering, failure and abort rules of every
// operation in buffer.cpp's run_operation.
#pragma once

#include <cstdint>
#include <functional>

#include "plan/op_record.hpp"

namespace epx::detail {

struct LowLatencyCall {
  // The fingerprint of a call given its number; empty for the wait of a hook, part of a call
  // already numbered. Its input checks run in `run`: a rejected LL call tells the peers through
  // the LL flags (LowLatencyEngine::abort), not through the entry barrier of the other calls.
  std::function<plan::OpFingerprint(uint64_t sequence)> check{};
  std::function<void(const plan::OpFingerprint&)> run{};
};

}  // namespace epx::detail
