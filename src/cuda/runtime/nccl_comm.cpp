// Comm::nccl, its state and the NCCL workspace.

#include <nccl.h>
#include <nccl_device.h>

#include <chrono>
#include <cstring>
#include <thread>
#include <vector>

#include "cuda/kernels/kernels.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "cuda/runtime/cuda_comm.hpp"
#include "epx/error.hpp"

// CUDA transport over NCCL: a communicator (created by epx from a unique id, or the caller's)
// on one CUDA device per rank; workspaces are NCCL symmetric windows (below).
namespace epx::detail {

struct NcclCommState final : CudaCommState {
  ncclComm_t comm = nullptr;
  bool owned = false;        // created by epx (destroyed with the last Comm copy)
  bool nonblocking = false;  // created by epx in NCCL's non-blocking mode: calls are polled
  Transport transport() const override { return Transport::kNccl; }
  std::unique_ptr<PeerWorkspace> open_workspace(size_t bytes, const SetupRecord& record,
                                                double timeout_seconds) override;
  ~NcclCommState() override;
};

// Waits until `comm`'s last call has completed (non-blocking mode: ncclInProgress until then),
// at most until `deadline`; raises kTimeout naming `rank` and `step`, or kTransport with NCCL's
// error. A blocking communicator has completed every call already.
void wait_for_nccl(ncclComm_t comm, std::chrono::steady_clock::time_point deadline, int rank,
                   const char* step, double timeout_seconds);

}  // namespace epx::detail

namespace epx {

namespace detail {

void wait_for_nccl(ncclComm_t comm, std::chrono::steady_clock::time_point deadline, int rank,
                   const char* step, double timeout_seconds) {
  for (;;) {
    ncclResult_t state = ncclSuccess;
    EPX_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return;
    EPX_CHECK(state == ncclInProgress, kTransport,
              "rank " << rank << ": " << step << " failed: " << ncclGetErrorString(state));
    EPX_CHECK(std::chrono::steady_clock::now() < deadline, kTimeout,
              "rank " << rank << ": phase " << step << " timed out after " << timeout_seconds
                      << " s waiting for the other ranks of the NCCL communicator");
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
}

// Non-blocking communicators are finalized (bounded) before they are destroyed; one that does
// not finish in time (a peer died) is aborted instead, which never waits for peers.
NcclCommState::~NcclCommState() {
  if (!owned || !comm) return;
  if (nonblocking) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    try {
      const ncclResult_t finalizing = ncclCommFinalize(comm);
      EPX_CHECK(finalizing == ncclSuccess || finalizing == ncclInProgress, kTransport,
                "ncclCommFinalize failed: " << ncclGetErrorString(finalizing));
      wait_for_nccl(comm, deadline, rank, "communicator teardown", 10.0);
    } catch (const Error&) {
      ncclCommAbort(comm);
      return;
    }
  }
  ncclCommDestroy(comm);
}

}  // namespace detail

UniqueId Comm::nccl_unique_id() {
  ncclUniqueId id;
  EPX_NCCL_CHECK(ncclGetUniqueId(&id));
  static_assert(sizeof(id) <= sizeof(UniqueId::bytes));
  UniqueId out;
  std::memcpy(out.bytes.data(), &id, sizeof(id));
  return out;
}

Comm Comm::nccl(int rank, int num_ranks, const UniqueId& id, int cuda_device,
                double timeout_seconds) {
  EPX_CHECK(rank >= 0 && rank < num_ranks, kInvalidArgument,
            "rank " << rank << " is outside [0, " << num_ranks << ")");
  EPX_CHECK(timeout_seconds > 0 && timeout_seconds < 1e6, kInvalidArgument,
            "timeout_seconds must be in (0, 1e6), got " << timeout_seconds);
  detail::use_cuda_device(rank, cuda_device);
  ncclUniqueId nccl_id;
  std::memcpy(&nccl_id, id.bytes.data(), sizeof(nccl_id));
  auto state = std::make_shared<detail::NcclCommState>();
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = num_ranks;
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // so that a rank that never joins cannot hold this one forever
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_seconds));
  const ncclResult_t started =
      ncclCommInitRankConfig(&state->comm, num_ranks, nccl_id, rank, &config);
  EPX_CHECK(started == ncclSuccess || started == ncclInProgress, kTransport,
            "rank " << rank << ": ncclCommInitRankConfig failed: " << ncclGetErrorString(started));
  state->owned = true;
  state->nonblocking = true;
  try {
    detail::wait_for_nccl(state->comm, deadline, rank, "communicator setup", timeout_seconds);
  } catch (const Error&) {
    ncclCommAbort(state->comm);
    state->comm = nullptr;
    throw;
  }
  return Comm(std::move(state));
}

Comm Comm::nccl(ncclComm* comm, int cuda_device) {
  EPX_CHECK(comm != nullptr, kInvalidArgument, "the NCCL communicator must not be null");
  auto state = std::make_shared<detail::NcclCommState>();
  state->comm = comm;
  state->device = cuda_device;
  EPX_NCCL_CHECK(ncclCommUserRank(comm, &state->rank));
  EPX_NCCL_CHECK(ncclCommCount(comm, &state->num_ranks));
  return Comm(std::move(state));
}

bool Comm::cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace epx

// The NCCL workspace: the ranks' setup records compared (one all-gather), then ncclMemAlloc + a
// symmetric window (NCCL_WIN_COLL_SYMMETRIC), a device communicator, and the peers' bases from
// ncclGetLsaPointer (NVLink load/store addresses). Every NCCL call is waited for with the
// buffer's timeout (a communicator epx created is non-blocking: nccl_comm.cpp).
namespace epx::detail {
namespace {

using Clock = std::chrono::steady_clock;

class NcclWorkspace final : public PeerWorkspace {
 public:
  NcclWorkspace(NcclCommState& state, size_t bytes, const SetupRecord& record,
                double timeout_seconds)
      : comm_(state.comm),
        rank_(state.rank),
        timeout_seconds_(timeout_seconds),
        deadline_(Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                     std::chrono::duration<double>(timeout_seconds))) {
    const int num_ranks = state.num_ranks;
    EPX_CHECK(comm_ != nullptr, kUnusable,
              "rank " << rank_
                      << ": the NCCL communicator was aborted after an earlier setup "
                         "timed out; make a new one");
    check_records(state, record);
    void* memory = nullptr;
    EPX_NCCL_CHECK(ncclMemAlloc(&memory, bytes));
    local_ = static_cast<char*>(memory);
    try {
      EPX_CUDA_CHECK(cudaMemset(local_, 0, bytes));
      EPX_CUDA_CHECK(cudaDeviceSynchronize());
      call(ncclCommWindowRegister(comm_, local_, bytes, &window_, NCCL_WIN_COLL_SYMMETRIC),
           "window registration");
      ncclDevCommRequirements requirements = {};
      requirements.lsaBarrierCount = 1;
      call(ncclDevCommCreate(comm_, &requirements, &dev_comm_), "device communicator setup");
      dev_comm_created_ = true;
      EPX_CHECK(dev_comm_.lsaSize == num_ranks, kInvalidArgument,
                "the NCCL transport needs every rank in one NVLink domain: "
                    << dev_comm_.lsaSize << " of " << num_ranks << " ranks are");
      // The kernels index peers by communicator rank through ncclGetLsaPointer, which takes the
      // LSA rank: with every rank in one LSA team the two agree, checked here once.
      EPX_CHECK(dev_comm_.lsaRank == rank_, kInternal,
                "rank " << rank_ << " has LSA rank " << dev_comm_.lsaRank
                        << "; the NCCL transport expects them equal");
      EPX_CUDA_CHECK(cudaMalloc(&peers_, sizeof(char*) * num_ranks));
      cuda::fetch_peer_pointers(window_, num_ranks, peers_, nullptr);
      EPX_CUDA_CHECK(cudaGetLastError());
      EPX_CUDA_CHECK(cudaDeviceSynchronize());
    } catch (...) {
      release();
      throw;
    }
  }

  ~NcclWorkspace() override { release(); }

 private:
  // A call of a (possibly non-blocking) communicator, completed within the deadline.
  void call(ncclResult_t result, const char* step) {
    EPX_CHECK(result == ncclSuccess || result == ncclInProgress, kTransport,
              "rank " << rank_ << ": " << step << " failed: " << ncclGetErrorString(result));
    wait_for_nccl(comm_, deadline_, rank_, step, timeout_seconds_);
  }

  // Every rank's record, all-gathered; each rank compares all of them, so all raise alike. If
  // the all-gather does not complete in time (a rank never builds its Buffer), a communicator
  // epx owns is aborted (which ends the collective), and the caller's is left as it is, with
  // the collective's memory and stream (freeing them would wait for it).
  void check_records(NcclCommState& state, const SetupRecord& mine) {
    const int num_ranks = state.num_ranks;
    SetupRecord* records = nullptr;
    cudaStream_t stream = nullptr;
    EPX_CUDA_CHECK(cudaMalloc(&records, sizeof(SetupRecord) * num_ranks));
    EPX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    std::vector<SetupRecord> all(num_ranks);
    try {
      EPX_CUDA_CHECK(
          cudaMemcpyAsync(records + rank_, &mine, sizeof(mine), cudaMemcpyHostToDevice, stream));
      call(ncclAllGather(records + rank_, records, sizeof(SetupRecord), ncclUint8, comm_, stream),
           "buffer setup");
      EPX_CUDA_CHECK(cudaMemcpyAsync(all.data(), records, sizeof(SetupRecord) * num_ranks,
                                     cudaMemcpyDeviceToHost, stream));
      for (;;) {
        const cudaError_t done = cudaStreamQuery(stream);
        if (done == cudaSuccess) break;
        EPX_CHECK(done == cudaErrorNotReady, kTransport,
                  "rank " << rank_ << ": buffer setup failed: " << cudaGetErrorString(done));
        wait_for_nccl(comm_, deadline_, rank_, "buffer setup", timeout_seconds_);
        EPX_CHECK(Clock::now() < deadline_, kTimeout,
                  "rank " << rank_ << ": phase buffer setup timed out after " << timeout_seconds_
                          << " s waiting for the other ranks to build their Buffer");
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
    } catch (...) {
      if (state.owned) {
        ncclCommAbort(state.comm);
        state.comm = comm_ = nullptr;
        cudaStreamDestroy(stream);
        cudaFree(records);
      }
      throw;
    }
    cudaStreamDestroy(stream);
    cudaFree(records);
    for (int p = 0; p < num_ranks; ++p) {
      const std::string mismatch = setup_mismatch(mine, rank_, all[p], p);
      EPX_CHECK(mismatch.empty(), kInvalidArgument,
                "rank " << rank_ << ": buffer setup: " << mismatch);
    }
  }

  void release() {
    if (peers_) cudaFree(peers_);
    if (dev_comm_created_) ncclDevCommDestroy(comm_, &dev_comm_);
    if (window_) ncclCommWindowDeregister(comm_, window_);
    if (local_) ncclMemFree(local_);
    peers_ = nullptr;
    local_ = nullptr;
    window_ = nullptr;
    dev_comm_created_ = false;
  }

  ncclComm_t comm_;
  int rank_;
  double timeout_seconds_;
  Clock::time_point deadline_;
  ncclWindow_t window_ = nullptr;
  ncclDevComm dev_comm_{};
  bool dev_comm_created_ = false;
};

}  // namespace

std::unique_ptr<PeerWorkspace> NcclCommState::open_workspace(size_t bytes,
                                                             const SetupRecord& record,
                                                             double timeout_seconds) {
  return std::make_unique<NcclWorkspace>(*this, bytes, record, timeout_seconds);
}

}  // namespace epx::detail
