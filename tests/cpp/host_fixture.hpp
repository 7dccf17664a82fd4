// Helper shared by the host-transport suites: a poisoned host allocator.
#pragma once

#include <cstring>
#include <memory>

#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/buffer.hpp"

namespace epx::testing {

inline std::shared_ptr<Allocator> poisoned_host_allocator() {
  return std::make_shared<PoisonAllocator>(
      default_allocator(), [](void* p, size_t n, void*) { std::memset(p, kPoisonByte, n); });
}

}  // namespace epx::testing
