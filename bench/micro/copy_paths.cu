// copy_paths: how fast 24 blocks of 512 threads (the kernels' launch shape) move rows of 14 KB
// (hidden 7168, bf16) on one GPU, by the two ways a warp can copy:
//
//   regs     every lane loads 8 16-byte vectors into registers, then stores them
//            (warp_copy in src/cuda/device/device_primitives.cuh, what the kernels do today)
//   bulkCxS  lane 0 streams the row through shared memory with the bulk-copy unit of its SM
//            (cp.async.bulk global -> shared -> global, chunks of C KB, S buffers per warp,
//            the load of chunk i+1 in flight while chunk i is stored)
//
// and two shapes: `copy` (each row to one place: dispatch send and compact receive) and
// `expand8` (each row read once and written to 8 places: the expanded receive). 4096 rows are
// one row per warp-item; 128 rows split into 3 parts (the kernels' row_parts). Each case is
// timed as the mean of 20 back-to-back launches; GB/s counts bytes read + written. A D2D
// cudaMemcpyAsync of the same bytes is printed for reference.
//
// Usage: copy_paths
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "micro_common.cuh"

namespace {

using micro::check;
using micro::elapsed_us;

constexpr int kBlocks = 24, kThreads = 512, kWarps = kThreads / 32, kRowBytes = 14336;

struct Args {
  const char* src;
  char* dst;
  int rows;
  int parts;   // parts per row
  int fanout;  // destinations per row (row r, copy j goes to dst row r * fanout + j)
  int chunk;   // bulk: bytes per stage
  int stages;  // bulk: buffers per warp (2-4)
};

__device__ __forceinline__ int part_bytes(const Args& a) {
  return ((kRowBytes + a.parts - 1) / a.parts + 15) / 16 * 16;
}

__global__ void __launch_bounds__(kThreads) regs_kernel(Args a) {
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  const int pb = part_bytes(a);
  for (int item = warp; item < a.rows * a.parts; item += kBlocks * kWarps) {
    const int row = item / a.parts, part = item % a.parts;
    const int begin = part * pb, end = min(begin + pb, kRowBytes);
    const int4* s = reinterpret_cast<const int4*>(a.src + int64_t(row) * kRowBytes + begin);
    const int n = (end - begin) / 16;
    for (int i = lane; i < n; i += 8 * 32) {
      int4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (i + j * 32 < n) v[j] = __ldg(s + i + j * 32);
      }
      for (int f = 0; f < a.fanout; ++f) {
        int4* d =
            reinterpret_cast<int4*>(a.dst + (int64_t(row) * a.fanout + f) * kRowBytes + begin);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (i + j * 32 < n) d[i + j * 32] = v[j];
        }
      }
    }
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void bulk_load(uint32_t dst, const void* src, int bytes, uint32_t bar) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void bulk_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, "
        "p; }"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  }
}

__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, int bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}

constexpr int kMaxStages = 4;

// Lane 0 of each warp: chunk i goes through buffer i % stages (i counts the warp's chunks over
// all its items); the load of chunk i is issued before the wait for chunk i - 1, whose store
// follows. Buffer i % stages was last read by the store of chunk i - stages, and the stores
// committed after that one are those of chunks i - stages + 1 .. i - 2: wait_group.read
// (stages - 2) lets exactly those stay in flight.
__global__ void __launch_bounds__(kThreads) bulk_kernel(Args a) {
  extern __shared__ __align__(128) char stage_memory[];
  __shared__ __align__(8) uint64_t bars[kWarps][kMaxStages];
  const int lane = threadIdx.x % 32, warp_local = threadIdx.x / 32;
  const int warp = blockIdx.x * kWarps + warp_local;
  if (lane != 0) return;
  const int stages = a.stages;
  uint32_t buf[kMaxStages], bar[kMaxStages], uses[kMaxStages];
  for (int i = 0; i < stages; ++i) {
    buf[i] = smem_addr(stage_memory + (stages * warp_local + i) * a.chunk);
    bar[i] = smem_addr(&bars[warp_local][i]);
    uses[i] = 0;
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar[i]) : "memory");
  }
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  const int pb = part_bytes(a);
  uint32_t seq = 0;  // chunks this warp has loaded
  struct Pending {
    char* dst;  // first destination of the chunk in flight, or null
    int bytes;
    int64_t row;
    int offset;
  } pending{nullptr, 0, 0, 0};
  auto store_pending = [&] {
    const int stage = (seq - 1) % stages;
    bulk_wait(bar[stage], uses[stage] & 1);
    ++uses[stage];
    for (int f = 0; f < a.fanout; ++f) {
      bulk_store(a.dst + (pending.row * a.fanout + f) * kRowBytes + pending.offset, buf[stage],
                 pending.bytes);
    }
    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
  };
  for (int item = warp; item < a.rows * a.parts; item += kBlocks * kWarps) {
    const int row = item / a.parts, part = item % a.parts;
    const int begin = part * pb, end = min(begin + pb, kRowBytes);
    for (int offset = begin; offset < end; offset += a.chunk) {
      const int stage = seq % stages;
      if (stages == 2) {
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      } else if (stages == 3) {
        asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      } else {
        asm volatile("cp.async.bulk.wait_group.read 2;" ::: "memory");
      }
      const int bytes = min(a.chunk, end - offset);
      bulk_load(buf[stage], a.src + int64_t(row) * kRowBytes + offset, bytes, bar[stage]);
      if (pending.dst) store_pending();  // chunk seq - 1
      ++seq;
      pending = Pending{a.dst, bytes, row, offset};
    }
  }
  if (pending.dst) store_pending();
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}

// Five warm-up calls, then the mean of `repeats`.
template <typename Body>
float mean_us(cudaStream_t s, int repeats, const Body& body) {
  for (int i = 0; i < 5; ++i) body();
  return elapsed_us(s, repeats, body);
}

}  // namespace

int main() {
  if (!micro::gpu_visible("copy_paths")) return 0;
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  constexpr int kMaxRows = 4096, kMaxFanout = 8;
  char *src, *dst, *check_dst;
  check(cudaMalloc(&src, size_t(kMaxRows) * kRowBytes), "malloc");
  check(cudaMalloc(&dst, size_t(kMaxRows) * kMaxFanout * kRowBytes), "malloc");
  check(cudaMalloc(&check_dst, size_t(kMaxRows) * kMaxFanout * kRowBytes), "malloc");
  // Distinct bytes per position, so a misplaced chunk is caught by the comparison below.
  {
    const size_t n = size_t(kMaxRows) * kRowBytes;
    char* host = static_cast<char*>(std::malloc(n));
    for (size_t i = 0; i < n; ++i) host[i] = static_cast<char>((i * 2654435761u) >> 13);
    check(cudaMemcpy(src, host, n, cudaMemcpyHostToDevice), "upload");
    std::free(host);
  }
  const int max_smem = 2 * kWarps * 7168;  // the largest configuration below (224 KB)
  check(cudaFuncSetAttribute(bulk_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem),
        "smem attribute");
  std::printf("%-8s %6s %6s %9s %10s %9s  %s\n", "shape", "rows", "parts", "path", "us", "GB/s",
              "same bytes as regs");
  for (const int fanout : {1, 8}) {
    for (const int rows : {128, 4096}) {
      const int parts = rows >= kBlocks * kWarps ? 1 : 3;
      const double bytes = double(rows) * kRowBytes * (1 + fanout);
      Args base{src, check_dst, rows, parts, fanout, 0, 0};
      check(cudaMemset(check_dst, 0, size_t(rows) * fanout * kRowBytes), "memset");
      regs_kernel<<<kBlocks, kThreads, 0, s>>>(base);
      check(cudaStreamSynchronize(s), "regs");
      const float regs_us = mean_us(s, 20, [&] {
        Args a = base;
        a.dst = dst;
        regs_kernel<<<kBlocks, kThreads, 0, s>>>(a);
      });
      const char* shape = fanout == 1 ? "copy" : "expand8";
      std::printf("%-8s %6d %6d %9s %10.2f %9.1f\n", shape, rows, parts, "regs", regs_us,
                  bytes / regs_us / 1e3);
      const int configs[][2] = {{7168, 2}, {4096, 3}, {2048, 4}, {4096, 2}};
      for (const auto [chunk, stages] : configs) {
        Args a{src, dst, rows, parts, fanout, chunk, stages};
        const size_t smem = size_t(stages) * kWarps * chunk;
        check(cudaMemset(dst, 0, size_t(rows) * fanout * kRowBytes), "memset");
        bulk_kernel<<<kBlocks, kThreads, smem, s>>>(a);
        check(cudaStreamSynchronize(s), "bulk");
        const int same = [&] {
          const size_t n = size_t(rows) * fanout * kRowBytes;
          char* x = static_cast<char*>(std::malloc(n));
          char* y = static_cast<char*>(std::malloc(n));
          check(cudaMemcpy(x, dst, n, cudaMemcpyDeviceToHost), "download");
          check(cudaMemcpy(y, check_dst, n, cudaMemcpyDeviceToHost), "download");
          size_t diff = 0;
          for (size_t i = 0; i < n; ++i) diff += x[i] != y[i];
          std::free(x);
          std::free(y);
          return static_cast<int>(diff == 0);
        }();
        const float us = mean_us(s, 20, [&] { bulk_kernel<<<kBlocks, kThreads, smem, s>>>(a); });
        char name[16];
        std::snprintf(name, sizeof name, "bulk%dx%d", chunk / 1024, stages);
        std::printf("%-8s %6d %6d %9s %10.2f %9.1f  %s\n", shape, rows, parts, name, us,
                    bytes / us / 1e3, same ? "yes" : "NO");
      }
      if (fanout == 1) {
        const float us = mean_us(s, 20, [&] {
          check(cudaMemcpyAsync(dst, src, size_t(rows) * kRowBytes, cudaMemcpyDeviceToDevice, s),
                "memcpy");
        });
        std::printf("%-8s %6d %6s %9s %10.2f %9.1f\n", shape, rows, "-", "memcpy", us,
                    bytes / us / 1e3);
      }
    }
  }
  check(cudaGetLastError(), "kernels");
  return 0;
}
