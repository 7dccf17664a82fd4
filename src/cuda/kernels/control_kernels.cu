// The abort of an operation and the poison mark of a failed buffer (the barriers themselves are
// folded into the kernels: cuda/device/operation_sync.cuh), kernel loading, the LSA pointer
// lookup.
#include <nccl.h>
#include <nccl_device.h>

#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/device/operation_sync.cuh"
#include "cuda/kernels/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {

const char* phase_name(int32_t phase) {
  static const char* const names[kPhaseLowLatency] = {
      "dispatch/entry", "dispatch/exit", "cached-dispatch/entry",  "cached-dispatch/exit",
      "combine/entry",  "combine/exit",  "combine-backward/entry", "combine-backward/exit"};
  if (phase >= kPhaseLowLatency) return plan::low_latency_phase_name(phase - kPhaseLowLatency);
  return phase >= 0 ? names[phase] : "unknown";
}

namespace {

// One block; thread p marks the abort in peer p and publishes the entry epoch to it. The mark
// is a field of its own, ordered before the flag by the release, so a peer sees it even after
// this rank has gone on to the next operation.
__global__ void abort_kernel(Topology topo) {
  const plan::WorkspaceLayout& layout = topo.layout;
  __shared__ uint64_t epoch;
  if (threadIdx.x == 0) {
    epoch = *topo.epoch + 1;
    *topo.epoch = epoch;
  }
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < layout.num_ranks) layout.record(topo.peers[peer], topo.rank)->abort_epoch = epoch;
  publish_to_peers(topo, epoch);
}

// One block; thread p sets this rank's poison mark in peer p (a store at system scope: the
// peers read it while they wait).
__global__ void poison_kernel(Topology topo) {
  const int peer = threadIdx.x;
  if (peer >= topo.layout.num_ranks) return;
  plan::PeerRecord* record = topo.layout.record(topo.peers[peer], topo.rank);
  *static_cast<volatile uint64_t*>(&record->poisoned) = 1;
  __threadfence_system();
}

__global__ void peer_pointer_kernel(ncclWindow_t window, int num_ranks, char** peers) {
  const int peer = threadIdx.x;
  if (peer < num_ranks) peers[peer] = static_cast<char*>(ncclGetLsaPointer(window, 0, peer));
}

}  // namespace

void load_functions(std::initializer_list<const void*> kernels) {
  cudaFuncAttributes attributes;
  for (const void* kernel : kernels) cudaFuncGetAttributes(&attributes, kernel);
}

void load_kernels() {
  load_plan_kernels();
  load_dispatch_kernels();
  load_combine_kernels();
  load_low_latency_kernels();
  load_functions(
      {reinterpret_cast<const void*>(abort_kernel), reinterpret_cast<const void*>(poison_kernel)});
  cudaGetLastError();  // a kernel that fails to load raises at its launch instead
}

void launch_abort(const Topology& topo, cudaStream_t stream) {
  const int threads = ((topo.layout.num_ranks + 31) / 32) * 32;
  abort_kernel<<<1, threads, 0, stream>>>(topo);
}

void launch_poison(const Topology& topo, cudaStream_t stream) {
  const int threads = ((topo.layout.num_ranks + 31) / 32) * 32;
  poison_kernel<<<1, threads, 0, stream>>>(topo);
}

void fetch_peer_pointers(void* window, int num_ranks, char** peers, cudaStream_t stream) {
  const int threads = ((num_ranks + 31) / 32) * 32;
  peer_pointer_kernel<<<1, threads, 0, stream>>>(static_cast<ncclWindow_t>(window), num_ranks,
                                                 peers);
}

}  // namespace epx::cuda
