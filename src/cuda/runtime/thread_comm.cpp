// Comm::cuda_threads, its state and the thread group's workspace.

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "core/thread_group.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "cuda/runtime/cuda_comm.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

// CUDA transport for ranks that are threads of one process (Comm::cuda_threads): the ranks of
// a ThreadGroup meet in its rendezvous to exchange their workspaces (below).
namespace epx::detail {

struct ThreadCommState final : CudaCommState {
  std::shared_ptr<ThreadGroupState> group;
  Transport transport() const override { return Transport::kCudaThreads; }
  // The rendezvous waits are bounded by the group's timeout.
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
};

void use_cuda_device(int rank, int cuda_device) {
  int num_devices = 0;
  EPX_CUDA_CHECK(cudaGetDeviceCount(&num_devices));
  EPX_CHECK(cuda_device >= 0 && cuda_device < num_devices, kInvalidArgument,
            "rank " << rank << ": CUDA device " << cuda_device << " does not exist (" << num_devices
                    << " visible)");
  EPX_CUDA_CHECK(cudaSetDevice(cuda_device));
}

}  // namespace epx::detail

namespace epx {

Comm Comm::cuda_threads(const ThreadGroup& group, int rank, int cuda_device) {
  EPX_CHECK(group.state() != nullptr, kInvalidArgument, "the thread group is empty");
  EPX_CHECK(rank >= 0 && rank < group.num_ranks(), kInvalidArgument,
            "rank " << rank << " is outside [0, " << group.num_ranks() << ")");
  detail::use_cuda_device(rank, cuda_device);
  // The device's default pool (cudaMallocAsync, e.g. a caller's inputs) otherwise gives memory
  // back at every synchronisation; unmapping may wait for the whole device, where the other
  // ranks' kernels wait for this rank. The pool keeps its memory instead. (epx's own default
  // allocator has a pool of its own that keeps its memory: src/cuda/runtime/cuda_allocator.cpp.)
  cudaMemPool_t pool;
  EPX_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, cuda_device));
  uint64_t keep = UINT64_MAX;
  EPX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  auto state = std::make_shared<detail::ThreadCommState>();
  state->group = group.state();
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = group.num_ranks();
  return Comm(std::move(state));
}

}  // namespace epx

// The thread group's workspace: a cudaMalloc on the rank's device, the ranks' bases exchanged
// through the group's rendezvous, peers on other devices reached through peer access.
//
// Ranks that share a device wait for each other inside kernels, so a call that waits for the
// whole device (cudaDeviceSynchronize, cudaFree, a legacy-stream memset) is safe only while
// no rank can have a kernel waiting for another rank's later work. Setup and teardown make
// such a window with the group's rendezvous: every rank has issued all its earlier work before
// it arrives, and no rank issues new work on this buffer before the last round is over.
namespace epx::detail {
namespace {

constexpr const char* kSetup = "buffer setup";
constexpr const char* kSetupDone = "buffer setup (peers mapped)";
constexpr const char* kTeardown = "buffer teardown";
constexpr const char* kTeardownIdle = "buffer teardown (devices idle)";

class ThreadWorkspace final : public PeerWorkspace {
 public:
  ThreadWorkspace(std::shared_ptr<ThreadGroupState> group, int rank, int device, size_t bytes,
                  const SetupRecord& record)
      : group_(std::move(group)), rank_(rank), device_(device) {
    try {
      open(bytes, record);
    } catch (...) {
      free_memory();  // no peer ever used it: the setup did not finish on any rank
      throw;
    }
  }

  // Collective. A peer may write into this workspace until it has finished its last operation
  // on the buffer, possibly on another device: round 1 shows that every rank has issued all its
  // work (it is here), each rank then waits for its device, and round 2 shows that every
  // device is idle, after which the memory can go.
  ~ThreadWorkspace() override {
    try {
      EPX_CUDA_CHECK(cudaSetDevice(device_));
      group_->exchange(rank_, {}, kTeardown);
      EPX_CUDA_CHECK(cudaDeviceSynchronize());
      group_->exchange(rank_, {}, kTeardownIdle);
    } catch (...) {
      return;  // a rank never came (or a device failed): leak rather than free under its feet
    }
    free_memory();
  }

 private:
  void open(size_t bytes, const SetupRecord& record) {
    const int num_ranks = group_->num_ranks;
    EPX_CUDA_CHECK(cudaSetDevice(device_));
    EPX_CUDA_CHECK(cudaMalloc(&local_, bytes));
    EPX_CUDA_CHECK(cudaMalloc(&peers_, sizeof(char*) * num_ranks));
    // Every rank is in this buffer's setup or still issuing earlier work that needs no later
    // work of this rank, so waiting for the whole device is safe here.
    EPX_CUDA_CHECK(cudaMemset(local_, 0, bytes));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());

    const std::vector<ThreadGroupState::Entry> entries =
        group_->exchange(rank_, {local_, device_, record}, kSetup);
    for (int peer = 0; peer < num_ranks; ++peer) {
      const std::string mismatch = setup_mismatch(record, rank_, entries[peer].record, peer);
      EPX_CHECK(mismatch.empty(), kInvalidArgument,
                "rank " << rank_ << ": buffer setup: " << mismatch);
    }
    check_peer_access(entries);
    check_hardware_queues(entries);
    shares_device_ = ranks_on(entries, device_) > 1;
    for (const ThreadGroupState::Entry& peer : entries) {
      if (peer.device == device_) continue;
      const cudaError_t status = cudaDeviceEnablePeerAccess(peer.device, 0);
      if (status == cudaErrorPeerAccessAlreadyEnabled) {
        (void)cudaGetLastError();  // what we want; clear it so later launch checks do not see it
      } else {
        EPX_CUDA_CHECK(status);
      }
    }
    std::vector<char*> bases(num_ranks);
    for (int peer = 0; peer < num_ranks; ++peer) {
      bases[peer] = static_cast<char*>(entries[peer].pointer);
    }
    EPX_CUDA_CHECK(
        cudaMemcpy(peers_, bases.data(), sizeof(char*) * num_ranks, cudaMemcpyHostToDevice));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    // Once a rank is past this round it may start an operation whose kernels wait for the
    // others; nobody waits for a whole device after it.
    group_->exchange(rank_, {local_, device_, record}, kSetupDone);
  }

  // Every pair of distinct devices in the group must reach each other; every rank checks every
  // pair, so all of them raise the same error rather than some timing out.
  void check_peer_access(const std::vector<ThreadGroupState::Entry>& entries) const {
    for (size_t a = 0; a < entries.size(); ++a) {
      for (size_t b = 0; b < entries.size(); ++b) {
        if (entries[a].device == entries[b].device) continue;
        int can_access = 0;
        EPX_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, entries[a].device, entries[b].device));
        EPX_CHECK(can_access, kTransport,
                  "rank " << rank_ << ": the thread group's rank " << a << " (CUDA device "
                          << entries[a].device << ") cannot access the memory of rank " << b
                          << " (CUDA device " << entries[b].device
                          << "): ranks on different devices need peer access between them");
      }
    }
  }

  // The ranks of the group on CUDA device `device`.
  static std::ptrdiff_t ranks_on(const std::vector<ThreadGroupState::Entry>& entries, int device) {
    return std::count_if(entries.begin(), entries.end(),
                         [&](const auto& entry) { return entry.device == device; });
  }

  // CUDA feeds a device from CUDA_DEVICE_MAX_CONNECTIONS hardware queues (default 8) and maps
  // streams onto them in turn; a kernel queued behind another rank's kernel that waits for it
  // never starts, and both ranks time out. Ranks sharing a device need a queue each, plus the
  // legacy stream's. Every rank checks every device, so all raise the same error. (Enough
  // queues are necessary, not sufficient: other streams of the process take queues too.)
  void check_hardware_queues(const std::vector<ThreadGroupState::Entry>& entries) const {
    const char* env = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
    const int queues = env ? std::atoi(env) : 8;
    for (const ThreadGroupState::Entry& entry : entries) {
      const auto sharing = ranks_on(entries, entry.device);
      EPX_CHECK(sharing == 1 || sharing + 1 <= queues, kInvalidArgument,
                "rank " << rank_ << ": " << sharing
                        << " ranks of the thread group share CUDA device " << entry.device
                        << " but CUDA_DEVICE_MAX_CONNECTIONS is " << queues
                        << (env ? "" : " (CUDA's default)")
                        << ": their kernels wait for each other and need a hardware queue each; "
                           "set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process first uses CUDA");
    }
  }

  void free_memory() {
    if (peers_) cudaFree(peers_);
    if (local_) cudaFree(local_);
    peers_ = nullptr;
    local_ = nullptr;
  }

  std::shared_ptr<ThreadGroupState> group_;
  int rank_;
  int device_;
};

}  // namespace

std::unique_ptr<PeerWorkspace> ThreadCommState::open_workspace(size_t bytes,
                                                               const SetupRecord& record,
                                                               double /*timeout_seconds*/) {
  return std::make_unique<ThreadWorkspace>(group, rank, device, bytes, record);
}

}  // namespace epx::detail
