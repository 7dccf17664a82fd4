// The source routing plan of a small batch computed by one block in its shared memory: exactly
// plan::plan_source (src/plan/source_plan.cpp), without the plan kernels and without a kernel
// boundary. Every block of a dispatch's send kernel (cuda/dispatch_kernels.cu) plans the whole
// batch itself, so no block waits for another to know its slots.
//
//   expert slots  warp w ranks a contiguous chunk of the (t, k) entries: __match_any_sync finds
//                 the lanes naming the same expert (a token naming one expert twice is two
//                 entries, as plan_source counts them), a per-warp histogram in shared memory
//                 carries the counts from one 32-entry step to the next; then an exclusive scan
//                 over the warps per expert turns the histograms into each chunk's base.
//   rank slots    one token per thread: a ballot per destination rank ranks the warp's tokens,
//                 a scan over the warps per rank gives the bases.
// Slots are counts of earlier entries in (t, k) order, as plan_source defines them: nothing
// here depends on timing.
#pragma once

#include "cuda/device_primitives.cuh"
#include "cuda/kernels.hpp"
#include "cuda/phase_clock.cuh"
#include "plan/routing.hpp"

namespace epx::cuda {

// An index as the plans keep it: below -1 becomes -2, beyond int32 INT32_MAX (both invalid).
template <typename Index>
__device__ __forceinline__ int32_t load_index(const void* topk, int64_t i) {
  const int64_t value = static_cast<const Index*>(topk)[i];
  return value < -1 ? -2 : value > INT32_MAX ? INT32_MAX : static_cast<int32_t>(value);
}

// The routing status of a plan from the first invalid entry (~0: none), into status[0..1].
__device__ __forceinline__ void routing_status(const PlanParams& p, unsigned long long bad,
                                               int32_t* status) {
  status[0] = bad == ~0ull ? plan::kRoutingOk : plan::kRoutingBadExpert;
  if (bad == ~0ull) {
    status[1] = 0;
    return;
  }
  const int64_t value = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[bad]
                                     : static_cast<const int32_t*>(p.topk_idx)[bad];
  status[1] = value < INT32_MIN ? INT32_MIN : value > INT32_MAX ? INT32_MAX
                                                                : static_cast<int32_t>(value);
}

// The plan's arrays in a block's shared memory (BlockPlanShape::carve).
struct BlockPlan {
  int32_t* topk32;         // [S * K]
  int32_t* expert_slot;    // [S * K]
  int32_t* send_slot;      // [S * R]
  int32_t* expert_counts;  // [E]
  int32_t* rank_counts;    // [R]
  int32_t* status;         // [2]
  int32_t* warp_counts;    // scratch [warps][E + R]
};

__host__ __device__ inline int64_t block_plan_ints(int64_t tokens, int32_t topk, int32_t ranks,
                                                   int32_t experts) {
  const int64_t warps = kBlockThreads / kWarpSize;
  return 2 * tokens * topk + tokens * ranks + experts + ranks + 2 + warps * (experts + ranks);
}

__device__ __forceinline__ BlockPlan carve_block_plan(int32_t* smem, int64_t tokens,
                                                      int32_t topk, int32_t ranks,
                                                      int32_t experts) {
  BlockPlan plan;
  plan.topk32 = smem;
  plan.expert_slot = plan.topk32 + tokens * topk;
  plan.send_slot = plan.expert_slot + tokens * topk;
  plan.expert_counts = plan.send_slot + tokens * ranks;
  plan.rank_counts = plan.expert_counts + experts;
  plan.status = plan.rank_counts + ranks;
  plan.warp_counts = plan.status + 2;
  return plan;
}

// The lanes of the warp whose `key` (below 2^bits) equals this lane's: one ballot per bit
// (__match_any_sync measured ~0.7 us per 32-entry step in the block plan, bench/NOTES.md
// change 24).
__device__ __forceinline__ uint32_t lanes_with_same_key(uint32_t key, int bits) {
  uint32_t same = 0xffffffffu;
  for (int b = 0; b < bits; ++b) {
    const bool one = key >> b & 1u;
    const uint32_t ones = __ballot_sync(0xffffffffu, one);
    same &= one ? ones : ~ones;
  }
  return same;
}

// The whole block computes the plan of p's routing into `plan` (shared memory). Needs
// blockDim.x == kBlockThreads, p.num_tokens <= kBlockThreads and p.num_ranks <= 32
// (block_plan_fits). Ends with a block barrier.
template <typename Index>
__device__ __forceinline__ void plan_in_block(const PlanParams& p, const BlockPlan& plan) {
  constexpr int kWarps = kBlockThreads / kWarpSize;
  const int num_topk = p.num_topk, num_experts = p.num_experts, num_ranks = p.num_ranks;
  const int local_experts = num_experts / num_ranks;
  const int tokens = static_cast<int>(p.num_tokens), entries = tokens * num_topk;
  const int targets = num_experts + num_ranks;
  const int warp = warp_in_block(), lane = lane_id();
  const uint32_t lanes_below = (1u << lane) - 1;
  __shared__ unsigned long long first_bad;
  if (threadIdx.x == 0) first_bad = ~0ull;
  for (int i = threadIdx.x; i < kWarps * targets; i += blockDim.x) plan.warp_counts[i] = 0;
  __syncthreads();
  // Four loads in flight per thread before their stores (one round trip per four entries).
  constexpr int kLoads = 4;
  for (int i0 = threadIdx.x; i0 < entries; i0 += kLoads * blockDim.x) {
    int32_t e[kLoads];
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = i0 + j * blockDim.x;
      e[j] = i < entries ? load_index<Index>(p.topk_idx, i) : 0;
    }
#pragma unroll
    for (int j = 0; j < kLoads; ++j) {
      const int i = i0 + j * blockDim.x;
      if (i >= entries) break;
      plan.topk32[i] = e[j];
      if (e[j] < -1 || e[j] >= num_experts) {
        atomicMin(&first_bad, static_cast<unsigned long long>(i));
      }
    }
  }
  __syncthreads();
  mark_phase(kMarkPlanLoaded);

  // Expert slots within each warp's chunk of entries (chunk: whole 32-entry steps).
  const int chunk = (entries + kWarps * kWarpSize - 1) / (kWarps * kWarpSize) * kWarpSize;
  int32_t* counts = plan.warp_counts + warp * targets;  // this warp's experts, then ranks
  const int end = min(entries, (warp + 1) * chunk);
  const int key_bits = 32 - __clz(num_experts);  // keys 0..E, E for every invalid entry
  for (int base = warp * chunk; base < end; base += kWarpSize) {
    const int i = base + lane;
    const int32_t e = i < end ? plan.topk32[i] : -1;
    const bool valid = e >= 0 && e < num_experts;
    const uint32_t same = lanes_with_same_key(valid ? e : num_experts, key_bits);
    if (valid) {
      plan.expert_slot[i] = counts[e] + __popc(same & lanes_below);
    } else if (i < end) {
      plan.expert_slot[i] = -1;
    }
    __syncwarp();
    if (valid && (same & lanes_below) == 0) counts[e] += __popc(same);
    __syncwarp();
  }

  // Rank slots within each warp's 32 tokens (rank r's counter follows the experts').
  const int t = threadIdx.x;
  uint32_t hit = 0;
  for (int k = 0; t < tokens && k < num_topk; ++k) {
    const int32_t e = plan.topk32[t * num_topk + k];
    if (e >= 0 && e < num_experts) hit |= 1u << plan::rank_of_expert(e, local_experts);
  }
  for (int r = 0; r < num_ranks; ++r) {
    const uint32_t goes = __ballot_sync(0xffffffffu, hit >> r & 1u);
    if (t < tokens) plan.send_slot[t * num_ranks + r] = hit >> r & 1u ? __popc(goes & lanes_below) : -1;
    if (lane == 0) counts[num_experts + r] = __popc(goes);
  }
  __syncthreads();
  mark_phase(kMarkPlanSlotted);

  // Per target, an exclusive scan over the warps: each warp's base, and the total.
  for (int j = threadIdx.x; j < targets; j += blockDim.x) {
    int sum = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int c = plan.warp_counts[w * targets + j];
      plan.warp_counts[w * targets + j] = sum;
      sum += c;
    }
    if (j < num_experts) {
      plan.expert_counts[j] = sum;
    } else {
      plan.rank_counts[j - num_experts] = sum;
    }
  }
  __syncthreads();
  mark_phase(kMarkPlanScanned);
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
    const int32_t e = plan.topk32[i];
    if (e >= 0 && e < num_experts) plan.expert_slot[i] += plan.warp_counts[i / chunk * targets + e];
  }
  for (int r = 0; t < tokens && r < num_ranks; ++r) {
    int32_t& slot = plan.send_slot[t * num_ranks + r];
    if (slot >= 0) slot += plan.warp_counts[warp * targets + num_experts + r];
  }
  if (threadIdx.x == 0) routing_status(p, first_bad, plan.status);
  __syncthreads();
}

// The plan's handle arrays and counts from shared memory into p's device arrays (one block).
__device__ __forceinline__ void store_block_plan(const PlanParams& p, const BlockPlan& plan) {
  const int64_t entries = p.num_tokens * p.num_topk, slots = p.num_tokens * p.num_ranks;
  for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) {
    p.topk32[i] = plan.topk32[i];
    p.expert_slot[i] = plan.expert_slot[i];
  }
  for (int64_t i = threadIdx.x; i < slots; i += blockDim.x) p.send_slot[i] = plan.send_slot[i];
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x) {
    p.expert_counts[i] = plan.expert_counts[i];
  }
  for (int i = threadIdx.x; i < p.num_ranks; i += blockDim.x) p.rank_counts[i] = plan.rank_counts[i];
  if (threadIdx.x < 2) p.plan_status[threadIdx.x] = plan.status[threadIdx.x];
}

}  // namespace epx::cuda
