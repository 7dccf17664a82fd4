// What every GPU test binary starts with: the visible GPU count (counted in a child, so the
// test process stays CUDA-free), the run's base seed (printed, EPX_TEST_SEED replays it), and a
// skip where too few GPUs are visible.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

#include "common/cuda_device_ops.hpp"
#include "epx/buffer.hpp"
#include "epx/error.hpp"

namespace epx::testing {

inline int gpu_count() {
  static const int count = count_cuda_devices();
  return count;
}

// An integer from the environment (test sizes such as EPX_GPU_CONFIGS), else `fallback`.
inline int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value ? std::atoi(value) : fallback;
}

// `tag` names the suite in the printed line.
inline uint64_t base_seed(const char* tag) {
  static const uint64_t seed = [tag] {
    const char* env = std::getenv("EPX_TEST_SEED");
    const uint64_t value = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "[" << tag << "] base seed " << value << " (EPX_TEST_SEED=" << value
              << " replays this run)" << std::endl;
    return value;
  }();
  return seed;
}

// Dispatches `in` on a buffer where rank `missing` never arrives and prints what was raised and
// when (`tag` names the suite): "" when it is kTimeout naming the entry phase and that rank, in
// bounded time.
inline std::string dispatch_expecting_missing_peer(Buffer& buffer, const DispatchInputs& in,
                                                   void* stream, const char* tag, int rank,
                                                   int missing) {
  const auto start = std::chrono::steady_clock::now();
  try {
    buffer.dispatch(in, DispatchOptions{}, stream);
    return "no error was raised";
  } catch (const Error& error) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string what = error.what();
    std::cout << "[" << tag << "] rank " << rank << " after " << seconds << " s: " << what
              << std::endl;
    if (error.code() != ErrorCode::kTimeout) return "wrong code: " + what;
    if (what.find("phase dispatch/entry") == std::string::npos ||
        what.find("waiting for rank " + std::to_string(missing)) == std::string::npos) {
      return "phase or rank missing: " + what;
    }
    if (seconds > 20) return "took " + std::to_string(seconds) + " s";
    return "";
  }
}

}  // namespace epx::testing

#define EPX_REQUIRE_GPUS(n)                                                      \
  if (::epx::testing::gpu_count() < (n)) {                                       \
    GTEST_SKIP() << "needs " << (n) << " GPU(s), " << ::epx::testing::gpu_count() \
                 << " visible";                                                  \
  }
