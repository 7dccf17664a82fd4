// The NCCL workspace: ncclMemAlloc + a symmetric window (NCCL_WIN_COLL_SYMMETRIC), a device
// communicator, and the peers' bases from ncclGetLsaPointer (NVLink load/store addresses).
#include <nccl.h>
#include <nccl_device.h>

#include "cuda/runtime/cuda_check.hpp"
#include "cuda/kernels/kernels.hpp"
#include "cuda/runtime/nccl_comm.hpp"
#include "epx/error.hpp"

namespace epx::detail {
namespace {

class NcclWorkspace final : public PeerWorkspace {
 public:
  NcclWorkspace(ncclComm_t comm, int rank, int num_ranks, size_t bytes) : comm_(comm) {
    void* memory = nullptr;
    EPX_NCCL_CHECK(ncclMemAlloc(&memory, bytes));
    local_ = static_cast<char*>(memory);
    EPX_CUDA_CHECK(cudaMemset(local_, 0, bytes));
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    EPX_NCCL_CHECK(
        ncclCommWindowRegister(comm_, local_, bytes, &window_, NCCL_WIN_COLL_SYMMETRIC));
    ncclDevCommRequirements requirements = {};
    requirements.lsaBarrierCount = 1;
    EPX_NCCL_CHECK(ncclDevCommCreate(comm_, &requirements, &dev_comm_));
    dev_comm_created_ = true;
    EPX_CHECK(dev_comm_.lsaSize == num_ranks, kInvalidArgument,
              "the CUDA transport needs every rank in one NVLink domain: " << dev_comm_.lsaSize
                                                                           << " of " << num_ranks
                                                                           << " ranks are");
    // The kernels index peers by communicator rank through ncclGetLsaPointer, which takes the
    // LSA rank: with every rank in one LSA team the two agree, checked here once.
    EPX_CHECK(dev_comm_.lsaRank == rank, kInternal,
              "rank " << rank << " has LSA rank " << dev_comm_.lsaRank
                      << "; the CUDA transport expects them equal");
    EPX_CUDA_CHECK(cudaMalloc(&peers_, sizeof(char*) * num_ranks));
    cuda::fetch_peer_pointers(window_, num_ranks, peers_, nullptr);
    EPX_CUDA_CHECK(cudaGetLastError());
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
  }

  ~NcclWorkspace() override {
    if (peers_) cudaFree(peers_);
    if (dev_comm_created_) ncclDevCommDestroy(comm_, &dev_comm_);
    if (window_) ncclCommWindowDeregister(comm_, window_);
    if (local_) ncclMemFree(local_);
  }

 private:
  ncclComm_t comm_;
  ncclWindow_t window_ = nullptr;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
};

}  // namespace

std::unique_ptr<PeerWorkspace> NcclCommState::open_workspace(size_t bytes) {
  return std::make_unique<NcclWorkspace>(comm, rank, num_ranks, bytes);
}

}  // namespace epx::detail
