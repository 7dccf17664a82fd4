// The abort of an operation (the barriers themselves are folded into the kernels:
// cuda/operation_sync.cuh), the device routing plan, and the LSA pointer lookup.
#include <cub/block/block_scan.cuh>
#include <nccl.h>
#include <nccl_device.h>

#include "cuda/device_errors.cuh"
#include "cuda/device_primitives.cuh"
#include "cuda/operation_sync.cuh"
#include "cuda/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {

const char* phase_name(int32_t phase) {
  static const char* const names[kPhaseCount] = {
      "dispatch/entry", "dispatch/exit",  "cached-dispatch/entry", "cached-dispatch/exit",
      "combine/entry",  "combine/exit",   "combine-backward/entry", "combine-backward/exit"};
  return phase >= 0 && phase < kPhaseCount ? names[phase] : "unknown";
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
  if (peer < layout.num_ranks) layout.abort_epochs(topo.peers[peer])[topo.rank] = epoch;
  publish_to_peers(topo, epoch);
}

constexpr int kPlanThreads = 512;

template <typename Index>
__device__ __forceinline__ int32_t load_index(const void* topk, int64_t i) {
  const int64_t value = static_cast<const Index*>(topk)[i];
  return value < -1 ? -2 : value > INT32_MAX ? INT32_MAX : static_cast<int32_t>(value);
}

// Blocks [0, R) compute send_slot for destination rank b; blocks [R, R+E) expert_slot for
// expert b-R. Each scans the tokens in order with a block-wide exclusive sum, so slots are the
// counts of earlier tokens, exactly as plan_source computes them sequentially. Block 0 also
// validates and writes the int32 copy of the routing.
template <typename Index>
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(PlanParams p) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running;
  __shared__ long long first_bad;
  const int num_ranks = p.num_ranks, num_topk = p.num_topk, num_experts = p.num_experts;
  const int local_experts = num_experts / num_ranks;
  const bool rank_block = blockIdx.x < num_ranks;
  const int target = rank_block ? blockIdx.x : blockIdx.x - num_ranks;
  if (threadIdx.x == 0) {
    running = 0;
    first_bad = LLONG_MAX;
  }
  __syncthreads();
  for (int64_t base = 0; base < p.num_tokens; base += kPlanThreads) {
    const int64_t t = base + threadIdx.x;
    int count = 0;
    if (t < p.num_tokens) {
      for (int k = 0; k < num_topk; ++k) {
        const int32_t e = load_index<Index>(p.topk_idx, t * num_topk + k);
        const bool valid = e >= 0 && e < num_experts;
        if (blockIdx.x == 0) {
          p.topk32[t * num_topk + k] = e;
          if (e < -1 || e >= num_experts) atomicMin(&first_bad, t * num_topk + k);
          if (!valid) p.expert_slot[t * num_topk + k] = -1;
        }
        if (!valid) continue;
        if (rank_block) {
          count |= plan::rank_of_expert(e, local_experts) == target;
        } else {
          count += e == target;
        }
      }
    }
    int prefix = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(count, prefix, total);
    if (t < p.num_tokens) {
      if (rank_block) {
        p.send_slot[t * num_ranks + target] = count ? running + prefix : -1;
      } else if (count) {
        int slot = running + prefix;
        for (int k = 0; k < num_topk; ++k) {
          if (load_index<Index>(p.topk_idx, t * num_topk + k) == target) {
            p.expert_slot[t * num_topk + k] = slot++;
          }
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  if (rank_block) {
    p.rank_counts[target] = running;
  } else {
    p.expert_counts[target] = running;
  }
  if (blockIdx.x == 0) {
    const bool bad = first_bad != LLONG_MAX;
    p.plan_status[0] = bad ? plan::kRoutingBadExpert : plan::kRoutingOk;
    if (bad) {
      const int64_t value = p.topk_int64
                                ? static_cast<const int64_t*>(p.topk_idx)[first_bad]
                                : static_cast<const int32_t*>(p.topk_idx)[first_bad];
      p.plan_status[1] = value < INT32_MIN ? INT32_MIN
                         : value > INT32_MAX ? INT32_MAX
                                             : static_cast<int32_t>(value);
    } else {
      p.plan_status[1] = 0;
    }
  }
}

__global__ void peer_pointer_kernel(ncclWindow_t window, int num_ranks, char** peers) {
  const int peer = threadIdx.x;
  if (peer < num_ranks) peers[peer] = static_cast<char*>(ncclGetLsaPointer(window, 0, peer));
}

}  // namespace

void launch_abort(const Topology& topo, cudaStream_t stream) {
  const int threads = ((topo.layout.num_ranks + 31) / 32) * 32;
  abort_kernel<<<1, threads, 0, stream>>>(topo);
}

void launch_plan(const PlanParams& params, cudaStream_t stream) {
  const int blocks = params.num_ranks + params.num_experts;
  if (params.topk_int64) {
    plan_kernel<int64_t><<<blocks, kPlanThreads, 0, stream>>>(params);
  } else {
    plan_kernel<int32_t><<<blocks, kPlanThreads, 0, stream>>>(params);
  }
}

void fetch_peer_pointers(void* window, int num_ranks, char** peers, cudaStream_t stream) {
  const int threads = ((num_ranks + 31) / 32) * 32;
  peer_pointer_kernel<<<1, threads, 0, stream>>>(static_cast<ncclWindow_t>(window), num_ranks,
                                                 peers);
}

}  // namespace epx::cuda
