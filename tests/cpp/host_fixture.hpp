// Helpers shared by the host-transport suites: a BufferConfig from a random configuration and a
// poisoned host allocator.
#pragma once

#include <cstring>
#include <memory>

#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/buffer.hpp"

namespace epx::testing {

inline BufferConfig buffer_config_for(const RandomConfig& config, double timeout_seconds = 60) {
  BufferConfig buffer;
  buffer.max_tokens_per_rank = config.max_tokens;
  buffer.hidden = config.hidden;
  buffer.num_experts = config.num_experts;
  buffer.num_topk = config.num_topk;
  buffer.fp8_dispatch = config.fp8;
  buffer.timeout_seconds = timeout_seconds;
  return buffer;
}

inline std::shared_ptr<Allocator> poisoned_host_allocator() {
  return std::make_shared<PoisonAllocator>(
      default_allocator(), [](void* p, size_t n) { std::memset(p, kPoisonByte, n); });
}

}  // namespace epx::testing
