// Device-side building blocks of the CUDA transport: system-scope release/acquire on flags,
// the global timer, 16-byte row copies by a warp, warp sums.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "plan/numerics.hpp"

namespace epx::cuda {

constexpr int kWarpSize = 32;
constexpr int kBlockThreads = 512;  // the warp-per-row kernels' block size

__device__ __forceinline__ int lane_id() {
  return threadIdx.x % kWarpSize;
}
__device__ __forceinline__ int warp_in_block() {
  return threadIdx.x / kWarpSize;
}
__device__ __forceinline__ int warps_per_block() {
  return blockDim.x / kWarpSize;
}
// Warps of the whole grid, for grid-stride loops with one warp per token or row.
__device__ __forceinline__ int global_warp() {
  return blockIdx.x * warps_per_block() + warp_in_block();
}
__device__ __forceinline__ int total_warps() {
  return gridDim.x * warps_per_block();
}

// A block barrier of threads [0, threads) only (a multiple of the warp size; hardware barrier 1,
// which no other code uses): the block's other threads may be elsewhere, or gone.
__device__ __forceinline__ void partial_barrier(int threads) {
  asm volatile("bar.sync 1, %0;" ::"r"(threads) : "memory");
}

__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Release at system scope: every write this thread made (and, cumulatively, what its block
// barrier and the kernels before it on the stream ordered before it) is visible to a reader that
// acquires the flag; SASS: a system membar, then the reduction. An atomic max, performed at the
// memory that holds the flag (this GPU's L2 or the peer's), not a store: epochs only grow, so
// the flag keeps the newest value whatever the order of arrival.
__device__ __forceinline__ void publish_max_system(uint64_t* flag, uint64_t value) {
  asm volatile("red.release.sys.global.max.u64 [%0], %1;" ::"l"(flag), "l"(value) : "memory");
}

// The two halves of a handoff between the blocks of a grid through a counter
// (operation_handoff). fence_release_system, in one thread after a block barrier and before
// its relaxed count, makes the block's stores (into this GPU or a peer's) visible at system
// scope first: acq_rel is what a release needs (SASS MEMBAR.ALL.SYS, the membar of
// red.release.sys), where __threadfence_system() is sequentially consistent (MEMBAR.SC.SYS).
// fence_acquire_gpu, after a relaxed read of the count, orders what follows after everything
// the counted blocks fenced: GPU scope is enough, as they share the GPU, and a release at system
// scope after it is cumulative over it (SASS MEMBAR.ALL.GPU).
__device__ __forceinline__ void fence_release_system() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}
__device__ __forceinline__ void fence_acquire_gpu() {
  asm volatile("fence.acq_rel.gpu;" ::: "memory");
}

// A count one block's thread raises after a block barrier, and another block of the grid
// acquires: GPU scope, as both are on this GPU (SASS: a GPU membar, then the reduction). What the
// counted blocks ordered before it is, cumulatively, before a system-scope release the reader
// makes next.
__device__ __forceinline__ void count_release_gpu(uint32_t* counter) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}
__device__ __forceinline__ uint32_t load_acquire_gpu(const uint32_t* counter) {
  uint32_t value;
  asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(value) : "l"(counter) : "memory");
  return value;
}

__device__ __forceinline__ uint64_t load_acquire_system(const uint64_t* flag) {
  uint64_t value;
  asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(value) : "l"(flag) : "memory");
  return value;
}

// Asks the line holding `p` into L2 (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// Asks `bytes` (a multiple of 16) from the 16-byte aligned `p` into L2 as one bulk request: no
// data comes back to the SM.
__device__ __forceinline__ void prefetch_bulk_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

// The bulk-copy unit's stores from shared memory (sm_90): `bytes` (a multiple of 16) from the
// 16-byte aligned shared `src` to the 16-byte aligned global `dst`, in this thread's bulk group.
// Shared memory written by the block's threads is fenced for the async proxy by each writer
// (fence_proxy_async_shared) before the block barrier that precedes the store.
__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
__device__ __forceinline__ void bulk_store_global(void* dst, const void* src, uint32_t bytes) {
  const uint32_t shared = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst),
               "r"(shared), "r"(bytes)
               : "memory");
}
// This thread's bulk stores committed and complete (written, not only read from shared
// memory), and ordered before its later generic accesses.
__device__ __forceinline__ void bulk_stores_complete() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

// A warp copies `bytes` from src to dst: 16-byte vectors when both are 16-byte aligned and
// bytes % 16 == 0 (every row the kernels move, for H % 8 == 0), else 2-byte elements, else
// bytes (an fp8 input that starts at an odd address).
// A lane issues kCopyLoads loads before their stores (a 14 KB row is four passes, the last one
// partial), so enough bytes are in flight to cover memory latency with 24 SMs.
constexpr int kCopyLoads = 8;

__device__ __forceinline__ void warp_copy(void* dst, const void* src, int64_t bytes, int lane) {
  // The low bits of both addresses and the length together: their alignment picks the width.
  const uintptr_t bits = reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) |
                         static_cast<uintptr_t>(bytes);
  if ((bits & 15) == 0) {
    const int4* s = static_cast<const int4*>(src);
    int4* d = static_cast<int4*>(dst);
    const int64_t n = bytes / 16;
    for (int64_t i = lane; i < n; i += kCopyLoads * kWarpSize) {
      int4 v[kCopyLoads];
#pragma unroll
      for (int j = 0; j < kCopyLoads; ++j) {
        if (i + j * kWarpSize < n) v[j] = __ldg(s + i + j * kWarpSize);
      }
#pragma unroll
      for (int j = 0; j < kCopyLoads; ++j) {
        if (i + j * kWarpSize < n) d[i + j * kWarpSize] = v[j];
      }
    }
  } else if ((bits & 1) == 0) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = lane; i < bytes / 2; i += kWarpSize) d[i] = s[i];
  } else {
    const uint8_t* s = static_cast<const uint8_t*>(src);
    uint8_t* d = static_cast<uint8_t*>(dst);
    for (int64_t i = lane; i < bytes; i += kWarpSize) d[i] = s[i];
  }
}

// Row parts: the row-moving loops hand out (row, part) pairs to warps. With at least as many
// rows as warps a part is the whole row (a warp streams it with warp_copy, kCopyLoads loads
// in flight per lane); with fewer, each row splits into as many parts (of >= 512 bytes, a
// multiple of 16) as every row can have with no warp left a second (row, part): 128 rows of 14 KB
// over 384 warps are 3 parts each, over 2 112 warps 16. Rounding the count up instead gave 64 of
// 2 112 warps a second part, a second round of loads that doubled the time of a one-pass sum
// (docs/performance.md).
struct RowParts {
  int64_t count;  // parts per row
  int64_t bytes;  // bytes per part (the last one may be shorter)
};

// Over `warps` warps (the grid's, or a block's for a block's own rows).
__device__ __forceinline__ RowParts row_parts(int64_t rows, int64_t row_bytes, int64_t warps) {
  int64_t count = rows >= warps || rows == 0 ? 1 : warps / rows;
  count = max(int64_t(1), min(count, row_bytes / 512));
  const int64_t bytes = ((row_bytes + count - 1) / count + 15) / 16 * 16;
  return RowParts{(row_bytes + bytes - 1) / bytes, bytes};
}
__device__ __forceinline__ RowParts row_parts(int64_t rows, int64_t row_bytes) {
  return row_parts(rows, row_bytes, total_warps());
}

// A warp copies part `part` of a row (bytes [part * parts.bytes, +parts.bytes), clipped).
__device__ __forceinline__ void warp_copy_part(char* dst, const char* src, int64_t row_bytes,
                                               const RowParts& parts, int64_t part, int lane) {
  const int64_t begin = part * parts.bytes;
  warp_copy(dst + begin, src + begin, min(parts.bytes, row_bytes - begin), lane);
}

// A warp zeroes `bytes` (a multiple of 2) at dst.
__device__ __forceinline__ void warp_zero(void* dst, int64_t bytes, int lane) {
  if (((reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(bytes)) & 15) == 0) {
    int4* d = static_cast<int4*>(dst);
    for (int64_t i = lane; i < bytes / 16; i += kWarpSize) d[i] = make_int4(0, 0, 0, 0);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = lane; i < bytes / 2; i += kWarpSize) d[i] = 0;
  }
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

}  // namespace epx::cuda
