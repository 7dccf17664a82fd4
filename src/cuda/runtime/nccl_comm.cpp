#include "cuda/runtime/nccl_comm.hpp"

#include <cstring>

#include "cuda/runtime/cuda_check.hpp"

namespace epx {

namespace detail {
NcclCommState::~NcclCommState() {
  if (owned && comm) ncclCommDestroy(comm);
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

Comm Comm::nccl(int rank, int num_ranks, const UniqueId& id, int cuda_device) {
  EPX_CHECK(rank >= 0 && rank < num_ranks, kInvalidArgument,
            "rank " << rank << " is outside [0, " << num_ranks << ")");
  EPX_CUDA_CHECK(cudaSetDevice(cuda_device));
  ncclUniqueId nccl_id;
  std::memcpy(&nccl_id, id.bytes.data(), sizeof(nccl_id));
  auto state = std::make_shared<detail::NcclCommState>();
  EPX_NCCL_CHECK(ncclCommInitRank(&state->comm, num_ranks, nccl_id, rank));
  state->owned = true;
  state->device = cuda_device;
  state->rank = rank;
  state->num_ranks = num_ranks;
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
