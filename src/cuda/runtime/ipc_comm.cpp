// Comm::ipc and its workspace. Setup, each step a round of the ranks' shared-memory segments:
//   1. the segments are created and the setup records compared (ShmSegments);
//   2. each rank leaves its workspace's IPC handle and its device's UUID in its segment;
//   3. each rank opens every peer's handle, then a last round: from here on a peer may start
//      an operation whose kernels write into this rank's workspace.
// Teardown mirrors it: a round once every rank has issued all its work on the buffer, a wait
// for this rank's device, a round once every device is idle; only then are handles closed and
// memory freed (a peer may write into this workspace until its last operation is done). A
// teardown round that times out (a peer died) leaves the memory allocated rather than freeing
// it under a peer's feet.

#include <cstring>
#include <string>
#include <vector>

#include "core/shm_segments.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "cuda/runtime/cuda_comm.hpp"
#include "epx/error.hpp"

// CUDA transport over CUDA IPC (Comm::ipc): one process per rank on one host, each rank's
// workspace a cudaMalloc whose IPC handle its peers open (below). The ranks meet through
// POSIX shared-memory segments named after the communicator (core/shm_segments.hpp) for every
// setup and teardown step, all bounded by the buffer's timeout. No NCCL is involved, so it
// works with any NCCL a process has loaded (or none), and ranks may share a GPU.
namespace epx::detail {

struct IpcCommState final : CudaCommState {
  std::string name;
  Transport transport() const override { return Transport::kIpc; }
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
};

}  // namespace epx::detail

namespace epx {
namespace detail {
namespace {

// What a rank leaves in its segment for its peers.
struct IpcPeerInfo {
  cudaIpcMemHandle_t handle;
  char device_uuid[16];
};

class IpcWorkspace final : public PeerWorkspace {
 public:
  IpcWorkspace(IpcCommState& state, size_t bytes, const SetupRecord& record, double timeout_seconds)
      : rank_(state.rank), num_ranks_(state.num_ranks), bases_(state.num_ranks, nullptr) {
    EPX_CUDA_CHECK(cudaMalloc(&local_, bytes));
    try {
      open(state, bytes, record, timeout_seconds);
    } catch (...) {
      close_and_free();
      throw;
    }
  }

  ~IpcWorkspace() override {
    try {
      segments_->barrier("buffer teardown");
      EPX_CUDA_CHECK(cudaDeviceSynchronize());
      segments_->barrier("buffer teardown (devices idle)");
    } catch (...) {
      return;  // a rank never came: leak rather than free memory a peer may still write
    }
    close_and_free();
  }

 private:
  void open(IpcCommState& state, size_t bytes, const SetupRecord& record, double timeout_seconds) {
    EPX_CUDA_CHECK(cudaMemset(local_, 0, bytes));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    IpcPeerInfo mine{};
    EPX_CUDA_CHECK(cudaIpcGetMemHandle(&mine.handle, local_));
    cudaDeviceProp properties{};
    EPX_CUDA_CHECK(cudaGetDeviceProperties(&properties, state.device));
    std::memcpy(mine.device_uuid, properties.uuid.bytes, sizeof(mine.device_uuid));

    segments_ = std::make_unique<ShmSegments>(
        "ipc-" + state.name + "-b" + std::to_string(record.buffer_index), rank_, num_ranks_,
        sizeof(IpcPeerInfo), record, timeout_seconds);
    std::memcpy(segments_->payload(rank_), &mine, sizeof(mine));
    segments_->barrier("buffer setup (handles)");
    try {
      for (int peer = 0; peer < num_ranks_; ++peer) {
        IpcPeerInfo theirs;
        std::memcpy(&theirs, segments_->payload(peer), sizeof(theirs));
        if (std::memcmp(theirs.device_uuid, mine.device_uuid, sizeof(mine.device_uuid)) == 0 &&
            peer != rank_) {
          shares_device_ = true;
        }
        if (peer == rank_) {
          bases_[peer] = local_;
          continue;
        }
        void* base = nullptr;
        const cudaError_t status =
            cudaIpcOpenMemHandle(&base, theirs.handle, cudaIpcMemLazyEnablePeerAccess);
        EPX_CHECK(status == cudaSuccess, kTransport,
                  "rank " << rank_ << ": cannot open rank " << peer
                          << "'s workspace through CUDA IPC: " << cudaGetErrorString(status)
                          << " (ranks on different GPUs need peer access between them)");
        bases_[peer] = static_cast<char*>(base);
      }
      EPX_CUDA_CHECK(cudaMalloc(&peers_, sizeof(char*) * num_ranks_));
      EPX_CUDA_CHECK(
          cudaMemcpy(peers_, bases_.data(), sizeof(char*) * num_ranks_, cudaMemcpyHostToDevice));
    } catch (...) {
      segments_->abort();  // the peers' next round raises instead of timing out
      throw;
    }
    segments_->barrier("buffer setup (peers mapped)");
  }

  void close_and_free() {
    for (int peer = 0; peer < num_ranks_; ++peer) {
      if (peer != rank_ && bases_[peer]) cudaIpcCloseMemHandle(bases_[peer]);
      bases_[peer] = nullptr;
    }
    if (peers_) cudaFree(peers_);
    if (local_) cudaFree(local_);
    peers_ = nullptr;
    local_ = nullptr;
  }

  int rank_;
  int num_ranks_;
  std::vector<char*> bases_;  // every rank's workspace in this process
  std::unique_ptr<ShmSegments> segments_;
};

}  // namespace

std::unique_ptr<PeerWorkspace> IpcCommState::open_workspace(size_t bytes, const SetupRecord& record,
                                                            double timeout_seconds) {
  return std::make_unique<IpcWorkspace>(*this, bytes, record, timeout_seconds);
}

}  // namespace detail

Comm Comm::ipc(int rank, int num_ranks, const std::string& name, int cuda_device) {
  detail::check_segment_ranks_and_name("ipc", rank, num_ranks, name);
  detail::use_cuda_device(rank, cuda_device);
  auto state = std::make_shared<detail::IpcCommState>();
  state->name = name;
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = num_ranks;
  return Comm(std::move(state));
}

}  // namespace epx
