// The shared state of a LocalGroup: a rendezvous for the rank threads' collective setup and
// teardown, and the pointers they exchange there (each rank's workspace base).
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <vector>

namespace epx::detail {

struct LocalGroupState {
  LocalGroupState(int num_ranks, double timeout_seconds)
      : num_ranks(num_ranks), timeout_seconds(timeout_seconds), slots(num_ranks, nullptr),
        devices(num_ranks, -1) {}

  const int num_ranks;
  const double timeout_seconds;

  // Rank `rank` publishes `value` (and its device) for the current round, waits for every
  // rank, and gets all values; rounds follow each other (a generation counter pairs them).
  // Raises kTimeout naming the rank and `what` when a rank does not arrive in time.
  std::vector<void*> exchange(int rank, void* value, int device, const char* what,
                              std::vector<int>* all_devices = nullptr);

 private:
  std::mutex mutex_;
  std::condition_variable changed_;
  uint64_t generation_ = 0;
  int arrived_ = 0;
  std::vector<void*> slots;
  std::vector<int> devices;
  std::vector<void*> last_slots_;
  std::vector<int> last_devices_;
};

}  // namespace epx::detail
