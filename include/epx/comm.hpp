// The communicator a Buffer runs over: which ranks take part and which transport joins them.
//   - host: one process per rank, POSIX shared memory (works everywhere, no GPU needed);
//   - cuda: an NCCL communicator whose symmetric windows give NVLink load/store access to peers;
//   - cuda, local group: ranks that are threads of one process, each on a CUDA device of its
//     choice (peer access between devices; several ranks may share one device).
#pragma once

#include <array>
#include <memory>
#include <string>

struct ncclComm;  // from nccl.h; the public headers do not include NCCL

namespace epx {

enum class Transport { kHost, kCuda };
const char* to_string(Transport transport);

// An NCCL unique id, made by one rank and distributed by the caller (a file, a pipe, a
// torch.distributed broadcast).
struct UniqueId {
  std::array<char, 128> bytes{};
};

namespace detail {
struct CommState;       // transport-specific state, defined in src/
struct LocalGroupState;
}

// The ranks of a process-local CUDA group (Comm::cuda_local): made once, shared by the rank
// threads. Every collective setup and teardown (buffer creation and destruction) waits for all
// ranks at most `timeout_seconds`, then raises kTimeout naming the rank.
class LocalGroup {
 public:
  explicit LocalGroup(int num_ranks, double timeout_seconds = 100.0);
  int num_ranks() const;
  const std::shared_ptr<detail::LocalGroupState>& state() const { return state_; }

 private:
  std::shared_ptr<detail::LocalGroupState> state_;
};

class Comm {
 public:
  // Host transport. Every rank passes the same `name` (it names the shared-memory segments;
  // letters, digits, '-', '_' only) and `timeout_seconds` bounds every wait for a peer.
  static Comm host(int rank, int num_ranks, const std::string& name);

  // CUDA transport (available when epx was built with CUDA; otherwise these throw).
  static UniqueId nccl_unique_id();
  static Comm nccl(int rank, int num_ranks, const UniqueId& id, int cuda_device);
  // Wraps a communicator the caller owns (it must outlive every Buffer built on it).
  static Comm nccl(ncclComm* comm, int cuda_device);
  // CUDA transport for a rank that is a thread of this process (LocalGroup). Ranks of one
  // group may share a device (how the GPU tests run several ranks on one GPU); ranks on
  // different devices need peer access between them. Each rank thread orders its work on a
  // stream of its own (a non-blocking one: the legacy default stream would wait for the
  // other ranks' kernels, which wait for this rank).
  static Comm cuda_local(const LocalGroup& group, int rank, int cuda_device);
  static bool cuda_available();  // built with CUDA and at least one device visible

  int rank() const;
  int num_ranks() const;
  Transport transport() const;
  const std::shared_ptr<detail::CommState>& state() const { return state_; }

  explicit Comm(std::shared_ptr<detail::CommState> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<detail::CommState> state_;
};

}  // namespace epx
