#include "cuda/runtime/nccl_comm.hpp"

#include <cstring>
#include <thread>

#include "cuda/runtime/cuda_check.hpp"

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
  EPX_CUDA_CHECK(cudaSetDevice(cuda_device));
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
  const ncclResult_t started = ncclCommInitRankConfig(&state->comm, num_ranks, nccl_id, rank,
                                                      &config);
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
