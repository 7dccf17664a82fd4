// The host transport against the reference, bit for bit, over fresh random configurations:
// R in {1,2,3,4,8}, uneven and zero token counts, masked experts, all top-k on one rank,
// alignment 1/4/128, compact and expanded, cached replays, sync_counts on and off, fp8.
// The base seed is fresh each run (printed); EPX_TEST_SEED=<n> replays a run.
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
#include <random>

#include "common/multi_process.hpp"
#include "common/scenario.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("EPX_TEST_SEED");
    const uint64_t value = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "[epx] host random tests: base seed " << value << " (EPX_TEST_SEED=" << value
              << " replays this run)" << std::endl;
    return value;
  }();
  return seed;
}

int configs_for(int num_ranks) {
  switch (num_ranks) {
    case 1:
      return 40;
    case 2:
      return 80;
    case 3:
      return 50;
    case 4:
      return 50;
    default:
      return 30;
  }
}

class HostRandom : public ::testing::TestWithParam<int> {};

TEST_P(HostRandom, MatchesReferenceBitForBit) {
  const int num_ranks = GetParam();
  int checked = 0;
  for (int i = 0; i < configs_for(num_ranks); ++i) {
    const uint64_t seed = base_seed() * 1000003ull + uint64_t(num_ranks) * 10007ull + i;
    const RandomConfig config = draw_config(seed, num_ranks);
    const RandomConfig again = other_layout_config(config);
    const std::string name = unique_name("hr");
    const auto outcomes = run_ranks(num_ranks, [&](int rank) {
      Buffer buffer(Comm::host(rank, num_ranks, name), buffer_config_for(config),
                    poisoned_host_allocator());
      std::string failure = run_scenario(buffer, config, rank, host_device_ops());
      if (failure.empty()) failure = run_scenario(buffer, again, rank, host_device_ops());
      return failure;
    });
    const std::string failed = failures(outcomes);
    ASSERT_TRUE(failed.empty()) << "seed " << seed << "\n" << failed;
    checked += 2;
  }
  std::cout << "[epx] R=" << num_ranks << ": " << checked << " scenarios bit-exact" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Ranks, HostRandom, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// Production shapes (hidden 7168, 4096, 2048 and odd multiples of 8, hundreds of tokens, up to
// 256 experts, top-8): the row paths that only large rows take, on the host transport.
TEST(HostProduction, MatchesReferenceBitForBit) {
  for (int num_ranks : {2, 3}) {
    for (int i = 0; i < 2; ++i) {
      const uint64_t seed = base_seed() * 7919ull + uint64_t(num_ranks) * 31ull + i;
      const RandomConfig config = draw_production_config(seed, num_ranks);
      const std::string name = unique_name("hp");
      const auto outcomes = run_ranks(num_ranks, [&](int rank) {
        Buffer buffer(Comm::host(rank, num_ranks, name), buffer_config_for(config),
                      poisoned_host_allocator());
        return run_scenario(buffer, config, rank, host_device_ops());
      });
      ASSERT_EQ(failures(outcomes), "") << "seed " << seed;
    }
  }
}

// The unsynced expanded worst case, reached exactly: every k of every token names one expert and
// K > E_l, so rows come from duplicates. A bound of min(K, E_l) rows per token overflowed here
// (found by HostRandom as heap corruption in CI).
TEST(HostWorstCase, DuplicateExpertsFillTheUnsyncedExpandedCapacity) {
  for (int num_ranks : {1, 2, 3}) {
    for (int32_t alignment : {1, 128}) {
      const RandomConfig config = saturated_config(
          base_seed() + uint64_t(num_ranks * 131 + alignment), num_ranks, alignment);
      const std::string name = unique_name("hw");
      const auto outcomes = run_ranks(num_ranks, [&](int rank) {
        Buffer buffer(Comm::host(rank, num_ranks, name), buffer_config_for(config),
                      poisoned_host_allocator());
        return run_scenario(buffer, config, rank, host_device_ops());
      });
      EXPECT_EQ(failures(outcomes), "") << config.describe();
    }
  }
}

}  // namespace
}  // namespace epx::testing
