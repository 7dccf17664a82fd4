// The send part of the low-latency kernels that push rows the dispatch way (a dispatch, a cached
// dispatch, combine_backward; docs/protocol.md, "Low-latency mode"): a thread per (t, k) claims
// its destination on the owner, then the block's warps copy each token's row once into every
// destination row (send_rows); a small batch's dispatch gives each (t, k), or each unit of a
// few k of one token, its own block (send_unit).
#pragma once

#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/device/low_latency_sync.cuh"
#include "cuda/kernels/low_latency.hpp"

namespace epx::cuda {

constexpr int kBlockWarps = kBlockThreads / kWarpSize;
constexpr int kFanoutLoads = 4;  // 16-byte loads in flight per lane while a part fans out
constexpr int kHeldScales = 2;   // fp8 scales per lane held in registers: rows up to 8192 wide

// Where one (t, k) of a block's tokens goes: its row in the owner's receive region and the row's
// scales (fp8), resolved once by the claiming thread; row null: nowhere (a masked k, or a row
// past the region). The fan-out reads them from shared memory: resolving a destination there
// (the peer pointer, a global load) after the stores to the one before cost a memory round trip
// per destination, ~0.7 us each (docs/performance.md).
struct Destination {
  char* row;
  float* scales;
};

// The blocks of a grid that send rows, and this block's place among them: every block of a
// combine_backward; a dispatch's blocks but its first, which settles the round (its block 0
// stays at -1). Sending block `index` has the tokens t = index + j * count.
struct SendBlocks {
  int index;
  int count;
};
__device__ __forceinline__ SendBlocks send_blocks(int first) {
  return {static_cast<int>(blockIdx.x) - first, static_cast<int>(gridDim.x) - first};
}

// The count of the block's tokens, t = b.index + j * b.count for j below it.
__device__ __forceinline__ int64_t block_tokens(int64_t num_tokens, SendBlocks b) {
  return b.index >= 0 && num_tokens > b.index ? (num_tokens - 1 - b.index) / b.count + 1 : 0;
}

// Entry (t, k) as the send part reads it: a routing dispatch's topk_idx value, the handle's
// expert otherwise.
__device__ __forceinline__ int64_t entry_value(const LowLatencyRows& r, int64_t i) {
  if (r.kind != plan::kKindDispatch) return r.topk32[i];
  return r.topk_int64 ? static_cast<const int64_t*>(r.topk_idx)[i]
                      : static_cast<const int32_t*>(r.topk_idx)[i];
}

// The entry this thread claims in the block's first batch of send_rows (-2: none), loaded at
// the kernel's start with the state word instead of after it (its round trip overlaps).
__device__ __forceinline__ int64_t first_entry(const LowLatencyContext& c,
                                               const LowLatencyRows& r, SendBlocks b) {
  const int num_topk = c.layout.num_topk;
  if (r.unit_topk > 0) {  // thread j < unit_topk claims the unit's j-th entry
    const int64_t i = b.index * r.unit_topk + threadIdx.x;
    const bool any = threadIdx.x < r.unit_topk && b.index >= 0 && i < r.num_tokens * num_topk;
    return any ? entry_value(r, i) : -2;
  }
  const int64_t t = b.index + int64_t(threadIdx.x / num_topk) * b.count;
  if (b.index < 0 || threadIdx.x >= (kBlockThreads / num_topk) * num_topk || t >= r.num_tokens) {
    return -2;
  }
  return entry_value(r, t * num_topk + threadIdx.x % num_topk);
}

// The rows of the block's first tokens asked into L2 at the kernel's start, beside the state
// word, a lane of the second warp per token (up to 32; a unit's block: its token's): the
// fan-out's loads after the claims then hit L2. A bulk prefetch returns nothing to the SM;
// loads issued there instead held the claims' replies behind theirs (docs/performance.md).
// Rows not 16-byte aligned are left alone.
__device__ __forceinline__ void prefetch_first_rows(const LowLatencyRows& r, int num_topk,
                                                    SendBlocks b) {
  const int j = static_cast<int>(threadIdx.x) - kWarpSize;
  if (j < 0 || j >= (r.unit_topk > 0 ? 1 : kWarpSize) || b.index < 0) return;
  if ((r.alignment_bits() & 15) != 0) return;
  const int64_t t =
      r.unit_topk > 0 ? b.index * r.unit_topk / num_topk : b.index + int64_t(j) * b.count;
  if (t < r.num_tokens) prefetch_bulk_l2(r.x + t * r.row_bytes, static_cast<uint32_t>(r.row_bytes));
}

// The destination of entry (t, k) of value `value` (entry_value), one thread: a routing
// dispatch checks the value, claims a slot on the owner's counter and fills the handle; the
// others take the handle's. The row's scalars (weights, aux, src_info) go with it; a
// combine_backward moves rows only.
inline __device__ Destination claim(const LowLatencyContext& c, const LowLatencyRows& r, int64_t t,
                                    int k, int64_t value, int32_t phase) {
  const plan::LowLatencyLayout& layout = c.layout;
  const plan::LowLatencyRegions& at = c.regions;
  const int64_t i = t * layout.num_topk + k;
  const bool routing = r.kind == plan::kKindDispatch;
  int32_t e;
  if (routing) {
    const bool valid = value >= -1 && value < layout.num_experts;
    if (!valid) {
      // Recorded here; the peers learn of it from the sent flags' tags.
      c.scratch->bad_routing = c.scratch->round + 1;
      record_error(c.topo, kDeviceBadRouting, kPhaseLowLatency + phase, c.topo.rank,
                   static_cast<int32_t>(value));
    }
    e = valid ? static_cast<int32_t>(value) : -1;
    r.topk32[i] = e;
  } else {
    e = static_cast<int32_t>(value);
  }
  if (e < 0) {
    if (routing) r.slots[i] = -1;
    return {nullptr, nullptr};
  }
  const bool scalars = r.kind != plan::kKindBackward;
  // Loaded before the claim's round trip, not after it.
  const float weight = scalars && r.weights ? r.weights[i] : 0.0f;
  const float aux = scalars && r.aux ? r.aux[i] : 0.0f;
  const int owner = e / at.local_experts;
  const int32_t local = e % at.local_experts;
  char* ws = c.topo.peers[owner];
  int32_t slot;
  if (routing) {
    slot = atomicAdd_system(plan::region<int32_t>(ws, at.counters) + local, 1);
    if (slot >= at.expert_rows) slot = -1;  // past the region: dropped, the owner raises
    r.slots[i] = slot;
  } else {
    slot = r.slots[i];
  }
  if (slot < 0) return {nullptr, nullptr};
  const int64_t row = local * at.expert_rows + slot;
  if (scalars) {
    if (r.weights) plan::region<float>(ws, at.recv_weights)[row] = weight;
    if (r.aux) plan::region<float>(ws, at.recv_aux)[row] = aux;
    plan::region<int32_t>(ws, at.src_info)[row] = layout.source_id(c.topo.rank, t, k);
  }
  return {ws + at.recv_rows + row * r.row_bytes,
          r.scales ? plan::region<float>(ws, at.recv_scales) + row * at.scales_per_row : nullptr};
}

// The warp copies elements [begin, end) (of type V) of `src` into the same elements of each
// destination row of `dests` (K of them, null rows skipped): loaded once, stored to each.
template <typename V, int Loads>
__device__ __forceinline__ void fan_out(const char* src, int64_t begin, int64_t end,
                                        const Destination* dests, int num_dests, int lane) {
  const V* s = reinterpret_cast<const V*>(src);
  for (int64_t i = begin + lane; i < end; i += Loads * kWarpSize) {
    V v[Loads];
#pragma unroll
    for (int j = 0; j < Loads; ++j) {
      if (i + j * kWarpSize < end) v[j] = s[i + j * kWarpSize];
    }
    for (int d = 0; d < num_dests; ++d) {
      V* dst = reinterpret_cast<V*>(dests[d].row);
      if (!dst) continue;
      __builtin_assume(__isGlobal(dst));  // a workspace row (read back from shared memory)
#pragma unroll
      for (int j = 0; j < Loads; ++j) {
        if (i + j * kWarpSize < end) dst[i + j * kWarpSize] = v[j];
      }
    }
  }
}

// The thread of a sending block that counts its claims done. The count is a release (a GPU
// membar, which holds its warp until the block's claim stores have landed), so the last warp
// makes it, not warp 0, which carries a row's first part and, with fp8, its scales: counted
// from thread 0, the fp8 dispatch took 9.4-9.6 us at 128 tokens, from the last warp 8.9-9.0
// (docs/performance.md).
constexpr int kCountingThread = kBlockThreads - kWarpSize;

// A row's fp8 scales (`scales` of them), one warp: loaded into registers (held, beside the
// row's first loads), then stored to each destination from there (loaded again for each
// destination, each load waited behind the stores to the one before).
struct HeldScales {
  float value[kHeldScales];
};
__device__ __forceinline__ HeldScales load_scales(const LowLatencyRows& r, int64_t t,
                                                  int64_t scales, int lane) {
  HeldScales held;
#pragma unroll
  for (int j = 0; j < kHeldScales; ++j) {
    const int64_t i = lane + j * kWarpSize;
    if (i < scales) held.value[j] = r.scales[t * scales + i];
  }
  return held;
}
__device__ __forceinline__ void store_scales(const LowLatencyRows& r, int64_t t, int64_t scales,
                                             const HeldScales& held, const Destination* d,
                                             int num_dests, int lane) {
  for (int k = 0; k < num_dests; ++k) {
    float* out = d[k].scales;
    if (!out) continue;
#pragma unroll
    for (int j = 0; j < kHeldScales; ++j) {
      const int64_t i = lane + j * kWarpSize;
      if (i < scales) out[i] = held.value[j];
    }
    for (int64_t i = lane + kHeldScales * kWarpSize; i < scales; i += kWarpSize) {
      out[i] = r.scales[t * scales + i];  // past the held ones: rows wider than 8192
    }
  }
}

// Part `part` of token t's row, one warp: fanned out into each of the `num_dests` destination
// rows `d` (16-byte vectors when rows and input are aligned, else 2-byte elements, else bytes);
// the first part carries the row's `scales` (fp8; 0: none).
__device__ __forceinline__ void send_part(const LowLatencyRows& r, int64_t t, int64_t part,
                                          RowParts parts, const Destination* d, int num_dests,
                                          int64_t scales, int lane) {
  const uintptr_t bits = r.alignment_bits();
  const char* src = r.x + t * r.row_bytes;
  const int64_t begin = part * parts.bytes, end = min(r.row_bytes, begin + parts.bytes);
  const bool carries_scales = part == 0 && scales > 0;
  HeldScales held;
  if (carries_scales) held = load_scales(r, t, scales, lane);
  if ((bits & 15) == 0) {
    fan_out<int4, kFanoutLoads>(src, begin / 16, end / 16, d, num_dests, lane);
  } else if ((bits & 1) == 0) {
    fan_out<uint16_t, 8>(src, begin / 2, end / 2, d, num_dests, lane);
  } else {
    fan_out<uint8_t, 8>(src, begin, end, d, num_dests, lane);
  }
  if (carries_scales) store_scales(r, t, scales, held, d, num_dests, lane);
}

// Token t's whole row to its `num_dests` destinations by the bulk-copy unit (r.bulk_rows: the
// block's one token, 16-byte aligned, at most kBulkRowBytes): the block loads the row into
// shared memory, then a thread per destination stores all of it with one bulk store and waits
// for it to complete, so that the block's handoff (or the grid's end) orders it as it does the
// warps' stores; warp 1 carries the fp8 scales.
__device__ __forceinline__ void send_bulk(const LowLatencyRows& r, int64_t t, const Destination* d,
                                          int num_dests, int64_t scales) {
  extern __shared__ int4 staged_row[];
  const int4* src = reinterpret_cast<const int4*>(r.x + t * r.row_bytes);
  const int64_t vectors = r.row_bytes / 16;
  const int lane = lane_id();
  const bool carries_scales = scales > 0 && warp_in_block() == 1;
  HeldScales held;
  if (carries_scales) held = load_scales(r, t, scales, lane);
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < vectors; i += kBlockThreads) staged_row[i] = src[i];
  fence_proxy_async_shared();
  __syncthreads();
  if (threadIdx.x < num_dests && d[threadIdx.x].row) {
    bulk_store_global(d[threadIdx.x].row, staged_row, static_cast<uint32_t>(r.row_bytes));
    bulk_stores_complete();
  }
  if (carries_scales) store_scales(r, t, scales, held, d, num_dests, lane);
}

// The send part of a dispatch-direction call, every sending block: batches of its tokens, a
// thread per (t, k) claiming destinations, then a warp per (token, row part) fanning the part out
// (16-byte vectors when rows and input are aligned, else 2-byte elements, else bytes).
// `first`: this thread's entry of the first batch (first_entry). `claimed` (or null): raised by
// one once the block's last claims are done, for the block that settles the counts, which then
// runs while the rows are still being stored (the counts are known before the rows land).
inline __device__ void send_rows(const LowLatencyContext& c, const LowLatencyRows& r, int64_t first,
                                 int32_t phase, SendBlocks b, uint32_t* claimed) {
  __shared__ Destination dests[kBlockThreads];
  const int num_topk = c.layout.num_topk;
  const int64_t tokens = block_tokens(r.num_tokens, b);
  // A block without tokens counts at once; otherwise after its last claims.
  const bool counts = claimed && threadIdx.x == kCountingThread;
  if (counts && tokens == 0) count_release_gpu(claimed);
  const int batch = kBlockThreads / num_topk;  // tokens whose destinations fit in `dests`
  const int lane = lane_id(), warp = warp_in_block();
  const int64_t scales = r.scales ? c.regions.scales_per_row : 0;
  for (int64_t j0 = 0; j0 < tokens; j0 += batch) {
    const int n = static_cast<int>(min(int64_t(batch), tokens - j0));
    if (threadIdx.x < n * num_topk) {
      const int jt = threadIdx.x / num_topk, k = threadIdx.x % num_topk;
      const int64_t t = b.index + (j0 + jt) * b.count;
      const int64_t value = j0 == 0 ? first : entry_value(r, t * num_topk + k);
      dests[threadIdx.x] = claim(c, r, t, k, value, phase);
    }
    __syncthreads();
    if (j0 == 0) mark_phase_into(c.clock, kMarkLlClaimed);
    if (counts && j0 + batch >= tokens) count_release_gpu(claimed);
    if (r.bulk_rows) {  // one token, n == 1
      send_bulk(r, b.index, dests, num_topk, scales);
      __syncthreads();
      continue;
    }
    const RowParts parts = row_parts(n, r.row_bytes, kBlockWarps);
    for (int64_t item = warp; item < n * parts.count; item += kBlockWarps) {
      const int jt = static_cast<int>(item / parts.count);
      const int64_t t = b.index + (j0 + jt) * b.count;
      send_part(r, t, item % parts.count, parts, dests + jt * num_topk, num_topk, scales, lane);
    }
    __syncthreads();
  }
}

// The send part of a dispatch whose every sending block has one unit (r.unit_topk consecutive
// k of one token: the launch gave a block per unit, small batches): thread j claims the unit's
// j-th entry, and the block's warps fan the parts of the token's row out into the unit's
// destinations. A token's K rows from one SM were most of the dispatch's time at 1-64 tokens
// (docs/performance.md); here K / unit_topk SMs share them, each reading the row (from L2
// after the first).
inline __device__ void send_unit(const LowLatencyContext& c, const LowLatencyRows& r,
                                 int64_t first, int32_t phase, SendBlocks b, uint32_t* claimed) {
  __shared__ Destination dests[kBlockThreads];
  const int num_topk = c.layout.num_topk, unit = r.unit_topk;
  const int64_t i = b.index * unit, t = i / num_topk;  // the unit's first entry and its token
  if (threadIdx.x < unit) {
    dests[threadIdx.x] =
        claim(c, r, t, static_cast<int>(i % num_topk) + threadIdx.x, first, phase);
  }
  __syncthreads();
  mark_phase_into(c.clock, kMarkLlClaimed);
  if (claimed && threadIdx.x == kCountingThread) count_release_gpu(claimed);
  const int64_t scales = r.scales ? c.regions.scales_per_row : 0;
  const RowParts parts = row_parts(1, r.row_bytes, kBlockWarps);
  for (int64_t part = warp_in_block(); part < parts.count; part += kBlockWarps) {
    send_part(r, t, part, parts, dests, unit, scales, lane_id());
  }
}

}  // namespace epx::cuda
