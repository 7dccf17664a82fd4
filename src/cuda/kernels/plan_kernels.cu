// The source routing plan on the device: exactly plan::plan_source (src/plan/source_plan.cpp),
// computed tile by tile instead of with one sequential scan per destination.
//
//   plan_tiles_kernel   one block per tile of tokens: validates and copies the routing, ranks
//                       each (token, k) among the tile's entries for the same expert (a block
//                       radix sort of expert * 2^11 + entry, so equal experts keep (t, k)
//                       order whatever the sort's stability), ranks each token among the
//                       tile's tokens for the same rank (a block scan of packed 9-bit
//                       counters), and writes the tile's counts per expert and per rank.
//   plan_finish_kernel  one block per tile: adds the counts of the earlier tiles to the tile's
//                       ranks (slots are counts of earlier tokens, as plan_source defines
//                       them); the last block writes the totals and the routing status.
//
// Up to 512 tokens a single kernel does it all (plan_scan_kernel: one block per destination
// and per expert, one block-wide scan each). Beyond, that design walks the tokens in
// dependent 512-token passes (47 us at 4096 tokens under ncu, base clocks); the tiles take 25.
#include <algorithm>
#include <cub/block/block_discontinuity.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda/device/chained_launch.hpp"
#include "cuda/device/operation_sync.cuh"
#include "cuda/kernels/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;                        // routing entries per thread in a tile
constexpr int kTileEntries = kThreads * kItems;  // 2048
constexpr int kEntryBits = 11;                   // an entry index within a tile
constexpr int kRankField = 9;                    // bits of one packed per-rank counter
constexpr int kRanksPerScan = 64 / kRankField;   // 7 counters in a 64-bit scan
static_assert(kTileEntries == 2048 && kTileEntries <= (1 << kEntryBits));

template <typename Index>
__device__ __forceinline__ int32_t load_index(const void* topk, int64_t i) {
  const int64_t value = static_cast<const Index*>(topk)[i];
  return value < -1 ? -2 : value > INT32_MAX ? INT32_MAX : static_cast<int32_t>(value);
}

struct Maximum {
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

struct DifferentExpert {
  __device__ __forceinline__ bool operator()(int a, int b) const {
    return (a >> kEntryBits) != (b >> kEntryBits);
  }
};

// The routing status from the first invalid entry (~0: none). One thread.
__device__ void write_status(const PlanParams& p, unsigned long long bad) {
  p.plan_status[0] = bad == ~0ull ? plan::kRoutingOk : plan::kRoutingBadExpert;
  if (bad != ~0ull) {
    const int64_t value = p.topk_int64 ? static_cast<const int64_t*>(p.topk_idx)[bad]
                                       : static_cast<const int32_t*>(p.topk_idx)[bad];
    p.plan_status[1] = value;
  } else {
    p.plan_status[1] = 0;
  }
}

// The last tile's block: totals (base + the last tile's counts) and the routing status, then
// the scratch reset for the next plan (graph replays included).
__device__ void write_totals_and_status(const PlanParams& p, const int32_t* base,
                                        const int32_t* last) {
  const int num_experts = p.num_experts, targets = p.num_experts + p.num_ranks;
  for (int i = threadIdx.x; i < targets; i += kThreads) {
    // `last` was counted with atomics by this block: read it past L1.
    const int32_t total = base[i] + static_cast<const volatile int32_t*>(last)[i];
    if (i < num_experts) {
      p.expert_counts[i] = total;
    } else {
      p.rank_counts[i - num_experts] = total;
    }
  }
  if (threadIdx.x == 0) {
    write_status(p, atomicOr(p.first_bad, 0ull));  // the atomics' value, not L1's
    *p.first_bad = ~0ull;  // ready for the next plan (graph replays included)
  }
}

// The tokens of this block's tile: [first_token, first_token + tokens).
struct PlanTile {
  int64_t first_token;
  int tokens;
};

__device__ __forceinline__ PlanTile plan_tile(const PlanParams& p) {
  const int tile_tokens = plan_tile_tokens(p.num_topk);
  const int64_t first_token = int64_t(blockIdx.x) * tile_tokens;
  const int64_t left = p.num_tokens - first_token;
  return PlanTile{first_token, static_cast<int>(max(int64_t(0), min(int64_t(tile_tokens), left)))};
}

template <typename Index>
__global__ void __launch_bounds__(kThreads) plan_tiles_kernel(PlanParams p, int sort_bits) {
  chain_start();
  using Sort = cub::BlockRadixSort<int, kThreads, kItems>;
  using Heads = cub::BlockDiscontinuity<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  using PackedScan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ union {
    typename Sort::TempStorage sort;
    typename Heads::TempStorage heads;
    typename Scan::TempStorage scan;
    typename PackedScan::TempStorage packed;
  } temp;
  if (p.publish_entry && blockIdx.x == 0) publish_entry_early(p.topo);
  const int num_topk = p.num_topk, num_experts = p.num_experts, num_ranks = p.num_ranks;
  const int local_experts = num_experts / num_ranks;
  const auto [first_token, tokens] = plan_tile(p);
  const int entries = tokens * num_topk;
  const int64_t first_entry = first_token * num_topk;
  int32_t* counts = p.tile_counts + int64_t(blockIdx.x) * (num_experts + num_ranks);
  for (int i = threadIdx.x; i < num_experts + num_ranks; i += kThreads) counts[i] = 0;

  // Experts: keys expert * 2^11 + entry (invalid and padding entries sort last, as E).
  int keys[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int i = threadIdx.x * kItems + j;
    int expert = num_experts;
    if (i < entries) {
      const int64_t g = first_entry + i;
      const int32_t e = load_index<Index>(p.topk_idx, g);
      p.topk32[g] = e;
      if (e < -1 || e >= num_experts) {
        atomicMin(p.first_bad, static_cast<unsigned long long>(g));
      }
      if (e >= 0 && e < num_experts) {
        expert = e;
      } else {
        p.expert_slot[g] = -1;
      }
    }
    keys[j] = (expert << kEntryBits) | i;
  }
  Sort(temp.sort).Sort(keys, 0, sort_bits);
  __syncthreads();
  int head[kItems];
  Heads(temp.heads).FlagHeads(head, keys, DifferentExpert());
  __syncthreads();
  int start[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) start[j] = head[j] ? threadIdx.x * kItems + j : 0;
  Scan(temp.scan).InclusiveScan(start, start, Maximum());
  __syncthreads();  // counts zeroed above, before the atomics below
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int expert = keys[j] >> kEntryBits;
    if (expert >= num_experts) continue;
    const int rank_in_tile = threadIdx.x * kItems + j - start[j];
    p.expert_slot[first_entry + (keys[j] & ((1 << kEntryBits) - 1))] = rank_in_tile;
    atomicMax(&counts[expert], rank_in_tile + 1);
  }

  // Ranks: a token goes to rank r once, whatever number of its experts live there; counters
  // of up to 7 ranks travel packed in one 64-bit scan (a tile has <= 256 tokens < 2^9).
  const bool have_token = threadIdx.x < tokens;
  const int64_t t = first_token + threadIdx.x;
  for (int r0 = 0; r0 < num_ranks; r0 += kRanksPerScan) {
    unsigned long long mine = 0;
    if (have_token) {
      uint32_t hit = 0;
      for (int k = 0; k < num_topk; ++k) {
        const int32_t e = load_index<Index>(p.topk_idx, t * num_topk + k);
        if (e < 0 || e >= num_experts) continue;
        const int r = plan::rank_of_expert(e, local_experts) - r0;
        if (r >= 0 && r < kRanksPerScan) hit |= 1u << r;
      }
      for (int r = 0; r < kRanksPerScan; ++r) {
        if (hit >> r & 1u) mine |= 1ull << (kRankField * r);
      }
    }
    unsigned long long prefix = 0, total = 0;
    PackedScan(temp.packed).ExclusiveSum(mine, prefix, total);
    __syncthreads();
    const int group = min(kRanksPerScan, num_ranks - r0);
    constexpr unsigned long long kField = (1ull << kRankField) - 1;
    for (int r = 0; r < group; ++r) {
      const int shift = kRankField * r;
      if (have_token) {
        p.send_slot[t * num_ranks + r0 + r] =
            (mine >> shift & kField) ? static_cast<int32_t>(prefix >> shift & kField) : -1;
      }
      if (threadIdx.x == 0) {
        counts[num_experts + r0 + r] = static_cast<int32_t>(total >> shift & kField);
      }
    }
  }
}

// Small batches (<= kScanTokens tokens): one block per destination rank and per expert, each
// ranking every token for its target in one block-wide exclusive sum (a token per thread).
// Faster than a tile's radix sort when all tokens fit one pass (ncu at 128 tokens: ~6 us
// against ~14 us for the sort), and 257 blocks in parallel at top-8 of 256.
constexpr int kScanTokens = 512;

template <typename Index>
__global__ void __launch_bounds__(kScanTokens) plan_scan_kernel(PlanParams p) {
  chain_start();
  using Scan = cub::BlockScan<int, kScanTokens>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long first_bad;
  if (p.publish_entry && blockIdx.x == 0) publish_entry_early(p.topo);
  const int num_ranks = p.num_ranks, num_topk = p.num_topk, num_experts = p.num_experts;
  const int local_experts = num_experts / num_ranks;
  const bool rank_block = blockIdx.x < num_ranks;
  const int target = rank_block ? blockIdx.x : blockIdx.x - num_ranks;
  if (threadIdx.x == 0) first_bad = ~0ull;
  __syncthreads();
  const int64_t t = threadIdx.x;
  const bool have_token = t < p.num_tokens;
  int count = 0;
  for (int k = 0; have_token && k < num_topk; ++k) {
    const int32_t e = load_index<Index>(p.topk_idx, t * num_topk + k);
    const bool valid = e >= 0 && e < num_experts;
    if (blockIdx.x == 0) {
      p.topk32[t * num_topk + k] = e;
      if (e < -1 || e >= num_experts) atomicMin(&first_bad, t * num_topk + k);
      if (!valid) p.expert_slot[t * num_topk + k] = -1;
    }
    if (!valid) continue;
    count += rank_block ? plan::rank_of_expert(e, local_experts) == target : e == target;
  }
  if (rank_block) count = count > 0;
  int slot = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(count, slot, total);
  if (have_token && rank_block) {
    p.send_slot[t * num_ranks + target] = count ? slot : -1;
  } else if (have_token && count) {
    for (int k = 0; k < num_topk; ++k) {
      if (load_index<Index>(p.topk_idx, t * num_topk + k) == target) {
        p.expert_slot[t * num_topk + k] = slot++;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (rank_block) {
      p.rank_counts[target] = total;
    } else {
      p.expert_counts[target] = total;
    }
    if (blockIdx.x == 0) write_status(p, first_bad);  // block 0 saw every entry
  }
}

// Dynamic shared memory: the tile's base per expert and per rank, (E + R) ints.
template <typename Index>
__global__ void __launch_bounds__(kThreads) plan_finish_kernel(PlanParams p) {
  chain_start();
  extern __shared__ int32_t base[];
  const int num_topk = p.num_topk, num_experts = p.num_experts, num_ranks = p.num_ranks;
  const int targets = num_experts + num_ranks;
  const auto [first_token, tokens] = plan_tile(p);
  for (int i = threadIdx.x; i < targets; i += kThreads) {
    int sum = 0;
#pragma unroll 8
    for (int tile = 0; tile < static_cast<int>(blockIdx.x); ++tile) {
      sum += p.tile_counts[int64_t(tile) * targets + i];
    }
    base[i] = sum;
  }
  __syncthreads();
  // Every load of a thread is issued before its stores (the loops are latency-bound).
  const int64_t first_entry = first_token * num_topk;
  for (int i0 = threadIdx.x; i0 < tokens * num_topk; i0 += kItems * kThreads) {
    int32_t e[kItems], slot[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = i0 + j * kThreads;
      if (i >= tokens * num_topk) break;
      e[j] = p.topk32[first_entry + i];
      slot[j] = p.expert_slot[first_entry + i];
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = i0 + j * kThreads;
      if (i >= tokens * num_topk) break;
      if (e[j] >= 0 && e[j] < num_experts) p.expert_slot[first_entry + i] = slot[j] + base[e[j]];
    }
  }
  for (int i0 = threadIdx.x; i0 < tokens * num_ranks; i0 += kItems * kThreads) {
    int32_t slot[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = i0 + j * kThreads;
      if (i < tokens * num_ranks) slot[j] = p.send_slot[first_token * num_ranks + i];
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int i = i0 + j * kThreads;
      if (i < tokens * num_ranks && slot[j] >= 0) {
        p.send_slot[first_token * num_ranks + i] = slot[j] + base[num_experts + i % num_ranks];
      }
    }
  }
  if (blockIdx.x != gridDim.x - 1) return;
  __syncthreads();
  write_totals_and_status(p, base, p.tile_counts + int64_t(blockIdx.x) * targets);
}

// The plan's kernels for each topk_idx dtype: the launcher picks from this table and
// load_plan_kernels loads exactly what it holds.
struct PlanKernels {
  bool topk_int64;
  void (*scan)(PlanParams);        // up to kScanTokens tokens: the whole plan
  void (*tiles)(PlanParams, int);  // beyond: per tile, then
  void (*finish)(PlanParams);      // the earlier tiles' counts added
};
constexpr PlanKernels kPlanKernels[] = {
    {false, plan_scan_kernel<int32_t>, plan_tiles_kernel<int32_t>, plan_finish_kernel<int32_t>},
    {true, plan_scan_kernel<int64_t>, plan_tiles_kernel<int64_t>, plan_finish_kernel<int64_t>},
};

}  // namespace

int plan_tiles(int64_t num_tokens, int32_t num_topk) {
  const int64_t tile = plan_tile_tokens(num_topk);
  return static_cast<int>(std::max<int64_t>(1, (num_tokens + tile - 1) / tile));
}

void load_plan_kernels() {
  for (const PlanKernels& k : kPlanKernels) {
    load_functions({reinterpret_cast<const void*>(k.scan), reinterpret_cast<const void*>(k.tiles),
                    reinterpret_cast<const void*>(k.finish)});
  }
}

void launch_plan(const PlanParams& p, cudaStream_t stream) {
  const PlanKernels& kernels = kPlanKernels[p.topk_int64 ? 1 : 0];
  if (p.num_tokens <= kScanTokens) {
    launch_chained(kernels.scan, p.num_ranks + p.num_experts, kScanTokens, 0, stream,
                   p.topo.chained, p);
    return;
  }
  int sort_bits = kEntryBits;
  while ((1 << (sort_bits - kEntryBits)) <= p.num_experts) ++sort_bits;
  const int tiles = plan_tiles(p.num_tokens, p.num_topk);
  launch_chained(kernels.tiles, tiles, kThreads, 0, stream, p.topo.chained, p, sort_bits);
  const size_t smem = sizeof(int32_t) * (p.num_experts + p.num_ranks);
  launch_chained(kernels.finish, tiles, kThreads, smem, stream, p.topo.chained, p);
}

}  // namespace epx::cuda
