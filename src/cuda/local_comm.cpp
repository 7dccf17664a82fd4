// CUDA transport for ranks that are threads of one process (LocalGroup): each rank's workspace
// is a cudaMalloc on its device, the bases are exchanged through the group, and peers on other
// devices are reached through peer access. Several ranks may share a device.
#include "core/local_group.hpp"
#include "cuda/cuda_check.hpp"
#include "cuda/peer_workspace.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx {
namespace detail {
namespace {

class LocalWorkspace final : public PeerWorkspace {
 public:
  LocalWorkspace(std::shared_ptr<LocalGroupState> group, int rank, int device, size_t bytes)
      : group_(std::move(group)), rank_(rank), device_(device) {
    EPX_CUDA_CHECK(cudaMalloc(&local_, bytes));
    EPX_CUDA_CHECK(cudaMemset(local_, 0, bytes));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<int> devices;
    const std::vector<void*> bases = group_->exchange(rank_, local_, device_, "buffer setup",
                                                      &devices);
    for (int peer = 0; peer < group_->num_ranks; ++peer) {
      if (devices[peer] == device_) continue;
      int can_access = 0;
      EPX_CUDA_CHECK(cudaDeviceCanAccessPeer(&can_access, device_, devices[peer]));
      EPX_CHECK(can_access, kTransport,
                "rank " << rank_ << ": device " << device_ << " cannot access device "
                        << devices[peer] << " of rank " << peer << " (no peer access)");
      const cudaError_t status = cudaDeviceEnablePeerAccess(devices[peer], 0);
      if (status == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // clear it: already enabled is what we want
      } else {
        EPX_CUDA_CHECK(status);
      }
    }
    EPX_CUDA_CHECK(cudaMalloc(&peers_, sizeof(char*) * bases.size()));
    EPX_CUDA_CHECK(
        cudaMemcpy(peers_, bases.data(), sizeof(char*) * bases.size(), cudaMemcpyHostToDevice));
    open_ = true;
  }

  // Collective: a peer may still be writing into this workspace until every rank has finished
  // its work on the buffer, so the memory is freed only after two rounds of the group: all
  // ranks here (nothing more will be issued), then all ranks synchronised (nothing runs).
  ~LocalWorkspace() override {
    try {
      if (open_) group_->exchange(rank_, nullptr, device_, "buffer teardown");
      cudaDeviceSynchronize();
      if (open_) group_->exchange(rank_, nullptr, device_, "buffer teardown");
    } catch (const Error&) {
      return;  // a rank never came: leave the memory rather than free it under its feet
    }
    if (peers_) cudaFree(peers_);
    if (local_) cudaFree(local_);
  }

 private:
  std::shared_ptr<LocalGroupState> group_;
  int rank_;
  int device_;
  bool open_ = false;
};

struct LocalCommState final : CudaCommState {
  std::shared_ptr<LocalGroupState> group;
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes) override {
    return std::make_unique<LocalWorkspace>(group, rank, device, bytes);
  }
};

}  // namespace
}  // namespace detail

Comm Comm::cuda_local(const LocalGroup& group, int rank, int cuda_device) {
  EPX_CHECK(rank >= 0 && rank < group.num_ranks(), kInvalidArgument,
            "rank " << rank << " is outside [0, " << group.num_ranks() << ")");
  EPX_CUDA_CHECK(cudaSetDevice(cuda_device));
  auto state = std::make_shared<detail::LocalCommState>();
  state->group = group.state();
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = group.num_ranks();
  return Comm(std::move(state));
}

}  // namespace epx
