// What every Comm has, whatever its transport (each transport defines its own factory:
// src/host/host_engine.cpp, src/cuda/runtime/*_comm.cpp).
#include "epx/comm.hpp"

#include <algorithm>
#include <chrono>
#include <sstream>

#include "core/engine.hpp"
#include "core/thread_group.hpp"
#include "epx/error.hpp"

namespace epx {

const char* to_string(Transport transport) {
  switch (transport) {
    case Transport::kHost:
      return "host";
    case Transport::kNccl:
      return "nccl";
    case Transport::kIpc:
      return "ipc";
    case Transport::kCudaThreads:
      return "cuda threads";
  }
  return "unknown";
}

int Comm::rank() const {
  return state_->rank;
}
int Comm::num_ranks() const {
  return state_->num_ranks;
}
Transport Comm::transport() const {
  return state_->transport();
}

}  // namespace epx

namespace epx {

ThreadGroup ThreadGroup::create(int num_ranks, double timeout_seconds) {
  EPX_CHECK(num_ranks >= 1 && num_ranks <= 64, kInvalidArgument,
            "a thread group holds 1 to 64 ranks, got " << num_ranks);
  EPX_CHECK(timeout_seconds > 0, kInvalidArgument,
            "the thread group's timeout must be positive, got " << timeout_seconds);
  return ThreadGroup(std::make_shared<detail::ThreadGroupState>(num_ranks, timeout_seconds));
}

int ThreadGroup::num_ranks() const {
  return state_->num_ranks;
}
double ThreadGroup::timeout_seconds() const {
  return state_->timeout_seconds;
}

namespace detail {

ThreadGroupState::ThreadGroupState(int num_ranks, double timeout_seconds)
    : num_ranks(num_ranks),
      timeout_seconds(timeout_seconds),
      arrived_(num_ranks, 0),
      entries_(num_ranks) {}

std::string ThreadGroupState::missing_ranks() const {
  std::string list;
  for (int rank = 0; rank < num_ranks; ++rank) {
    if (arrived_[rank]) continue;
    list += (list.empty() ? "" : ", ") + std::to_string(rank);
  }
  return list;
}

std::vector<ThreadGroupState::Entry> ThreadGroupState::exchange(int rank, Entry entry,
                                                                const char* step) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!broken_.empty()) {
    throw_error(broken_code_, __FILE__, __LINE__,
                "rank " + std::to_string(rank) + ": " + step +
                    ": the thread group is unusable since " + broken_);
  }
  EPX_CHECK(!arrived_[rank], kInvalidArgument,
            "rank " << rank << " arrived twice at " << step
                    << " of one thread group round (two communicators with the same rank?)");
  if (num_arrived_ == 0) {
    step_ = step;
  } else if (step_ != step) {
    std::ostringstream why;
    why << "rank " << rank << " came to " << step << " while other ranks are in " << step_
        << " (buffers must be created and destroyed in the same order on every rank)";
    broken_ = why.str();
    broken_code_ = ErrorCode::kInvalidArgument;
    round_done_.notify_all();
    EPX_FAIL(kInvalidArgument, broken_);
  }
  const uint64_t round = generation_;
  arrived_[rank] = 1;
  entries_[rank] = entry;
  if (++num_arrived_ == num_ranks) {
    completed_ = entries_;
    std::fill(arrived_.begin(), arrived_.end(), 0);
    num_arrived_ = 0;
    ++generation_;
    round_done_.notify_all();
    return completed_;
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  const bool done = round_done_.wait_until(
      lock, deadline, [&] { return generation_ != round || !broken_.empty(); });
  if (done && generation_ != round) return completed_;
  if (!broken_.empty()) {
    throw_error(broken_code_, __FILE__, __LINE__,
                "rank " + std::to_string(rank) + ": " + step + " failed: " + broken_);
  }
  // This rank's wait ran out first: the round can no longer complete.
  std::ostringstream why;
  why << step << " timed out after " << timeout_seconds << " s waiting for rank " << missing_ranks()
      << " of the thread group (" << num_ranks << " ranks)";
  broken_ = why.str();
  round_done_.notify_all();
  EPX_FAIL(kTimeout, "rank " << rank << ": " << broken_);
}

}  // namespace detail
}  // namespace epx
