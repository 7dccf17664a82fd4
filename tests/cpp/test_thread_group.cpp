// The rendezvous behind ThreadGroup (host code, no GPU): rounds pair up across ranks, a rank
// that never arrives gives kTimeout naming it and the step (never a hang) and breaks the group,
// ranks that disagree about the step or arrive twice raise.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "core/thread_group.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx::testing {
namespace {

using detail::ThreadGroupState;

// Runs fn(rank) on one thread per rank; returns what each returned (or "threw <code>: what").
std::vector<std::string> on_threads(int num_ranks, const std::function<std::string(int)>& fn) {
  std::vector<std::string> results(num_ranks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < num_ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        results[rank] = fn(rank);
      } catch (const Error& error) {
        results[rank] = std::string("threw ") + to_string(error.code()) + ": " + error.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return results;
}

TEST(ThreadGroup, CreateChecksItsArguments) {
  EXPECT_THROW(ThreadGroup::create(0), Error);
  EXPECT_THROW(ThreadGroup::create(65), Error);
  EXPECT_THROW(ThreadGroup::create(2, 0.0), Error);
  const ThreadGroup group = ThreadGroup::create(3, 5.0);
  const ThreadGroup copy = group;
  EXPECT_EQ(copy.num_ranks(), 3);
  EXPECT_EQ(copy.timeout_seconds(), 5.0);
  EXPECT_EQ(copy.state(), group.state());
}

TEST(ThreadGroup, RoundsExchangeEveryRanksEntry) {
  const int n = 5;
  ThreadGroupState group(n, 10.0);
  std::vector<char> memory(n);
  const auto results = on_threads(n, [&](int rank) -> std::string {
    for (int round = 0; round < 50; ++round) {
      const auto entries = group.exchange(rank, {&memory[(rank + round) % n], rank + round},
                                          round % 2 ? "buffer teardown" : "buffer setup");
      for (int peer = 0; peer < n; ++peer) {
        if (entries[peer].pointer != &memory[(peer + round) % n] ||
            entries[peer].device != peer + round) {
          return "round " + std::to_string(round) + ": wrong entry of rank " + std::to_string(peer);
        }
      }
    }
    return "";
  });
  for (int rank = 0; rank < n; ++rank) EXPECT_EQ(results[rank], "") << "rank " << rank;
}

TEST(ThreadGroup, MissingRankTimesOutNamingItAndBreaksTheGroup) {
  ThreadGroupState group(4, 0.3);
  const auto start = std::chrono::steady_clock::now();
  const auto results = on_threads(4, [&](int rank) -> std::string {
    if (rank == 1 || rank == 3) return "";  // never arrive
    group.exchange(rank, {}, "buffer setup");
    return "no error";
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0);
  for (int rank : {0, 2}) {
    EXPECT_NE(results[rank].find("threw timeout"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("buffer setup"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("rank 1, 3"), std::string::npos) << results[rank];
  }
  // A late rank raises at once instead of waiting for a round that cannot complete.
  const auto late_start = std::chrono::steady_clock::now();
  try {
    group.exchange(1, {}, "buffer setup");
    ADD_FAILURE() << "a broken group accepted a rank";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kTimeout);
    EXPECT_NE(std::string(error.what()).find("unusable"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - late_start).count(),
            0.2);
}

TEST(ThreadGroup, RanksInDifferentStepsRaise) {
  ThreadGroupState group(2, 5.0);
  const auto results = on_threads(2, [&](int rank) -> std::string {
    if (rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    group.exchange(rank, {}, rank == 0 ? "buffer setup" : "buffer teardown");
    return "no error";
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_NE(results[rank].find("threw invalid argument"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("same order on every rank"), std::string::npos) << results[rank];
  }
}

TEST(ThreadGroup, SameRankTwiceRaises) {
  ThreadGroupState group(2, 0.3);
  const auto results = on_threads(2, [&](int thread) -> std::string {
    if (thread == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    group.exchange(0, {}, "buffer setup");  // both threads claim rank 0
    return "no error";
  });
  EXPECT_NE(results[1].find("arrived twice"), std::string::npos) << results[1];
  EXPECT_NE(results[0].find("threw timeout"), std::string::npos) << results[0];
}

}  // namespace
}  // namespace epx::testing
