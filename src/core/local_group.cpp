#include "core/local_group.hpp"

#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx {

LocalGroup::LocalGroup(int num_ranks, double timeout_seconds) {
  EPX_CHECK(num_ranks >= 1 && num_ranks <= 64, kInvalidArgument,
            "a local group holds 1 to 64 ranks, got " << num_ranks);
  EPX_CHECK(timeout_seconds > 0, kInvalidArgument, "the timeout must be positive");
  state_ = std::make_shared<detail::LocalGroupState>(num_ranks, timeout_seconds);
}

int LocalGroup::num_ranks() const { return state_->num_ranks; }

namespace detail {

std::vector<void*> LocalGroupState::exchange(int rank, void* value, int device,
                                             const char* what, std::vector<int>* all_devices) {
  std::unique_lock<std::mutex> lock(mutex_);
  const uint64_t round = generation_;
  slots[rank] = value;
  devices[rank] = device;
  if (++arrived_ == num_ranks) {
    last_slots_ = slots;
    last_devices_ = devices;
    arrived_ = 0;
    ++generation_;
    changed_.notify_all();
  } else {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration<double>(timeout_seconds);
    const bool done =
        changed_.wait_until(lock, deadline, [&] { return generation_ != round; });
    if (!done) {
      const int missing = num_ranks - arrived_;
      --arrived_;  // leave the round as it was for the ranks still coming
      EPX_FAIL(kTimeout, "rank " << rank << ": " << what << " timed out after "
                                 << timeout_seconds << " s: " << missing << " of " << num_ranks
                                 << " ranks of the local group did not arrive");
    }
  }
  if (all_devices) *all_devices = last_devices_;
  return last_slots_;
}

}  // namespace detail
}  // namespace epx
