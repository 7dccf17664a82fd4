// The shared state of a ThreadGroup: the rendezvous where its rank threads meet for every
// collective setup and teardown step, exchanging one value each (a workspace base and device).
// Host code only (no CUDA), so ThreadGroup exists in every build.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "core/setup_record.hpp"
#include "epx/error.hpp"

namespace epx::detail {

struct ThreadGroupState {
  ThreadGroupState(int num_ranks, double timeout_seconds);

  struct Entry {
    void* pointer = nullptr;
    int device = -1;
    SetupRecord record;  // buffer setup: the configuration the rank states
  };

  // Rank `rank` publishes `entry` for the current round, waits until every rank has arrived
  // and returns all ranks' entries. Rounds follow one another (a generation counter pairs
  // them), so every rank must make the same sequence of calls; `step` names the call and must
  // agree across the round. Raises kTimeout naming `step` and the ranks that did not arrive
  // within the timeout (the group is then broken: every later call raises at once),
  // kInvalidArgument when ranks disagree about `step` or a rank arrives twice.
  std::vector<Entry> exchange(int rank, Entry entry, const char* step);

  const int num_ranks;
  const double timeout_seconds;

 private:
  std::string missing_ranks() const;  // of the current round, e.g. "1, 3"

  std::mutex mutex_;
  std::condition_variable round_done_;
  uint64_t generation_ = 0;  // rounds completed
  int num_arrived_ = 0;
  std::vector<char> arrived_;     // [R] in the current round
  std::vector<Entry> entries_;    // [R] of the current round
  std::vector<Entry> completed_;  // the last completed round's entries
  std::string step_;              // of the current round (the first arrival's)
  std::string broken_;            // why the group can no longer be used ("" while it can)
  ErrorCode broken_code_ = ErrorCode::kTimeout;
};

}  // namespace epx::detail
