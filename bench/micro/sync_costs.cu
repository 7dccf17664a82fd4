// sync_costs: what the pieces of an epx operation cost on their own, on one GPU, with the
// kernels' launch shape (24 blocks of 512 threads). Each variant is one kernel; it is timed
// three ways: alone (median of single launches between two events), back to back (mean of
// 200 launches on a stream) and as 20 nodes of a CUDA graph (mean per node). The differences
// between variants place the ~10-15 us each small-batch kernel takes (docs/performance.md):
//
//   empty          launch and retire only
//   fence_all      every thread __threadfence_system() (what send_kernel ends with)
//   fence_one      __syncthreads, then thread 0 __threadfence_system() (what is needed)
//   fence_gpu_all  every thread __threadfence() (GPU scope)
//   poll           threads < 2 read a set flag with ld.acquire.sys and the global timer
//   handoff        fence_one + a grid-wide counter (atomicAdd, last block fences, publishes)
//   handoff_sc     the handoff as it was first written: sequentially consistent system fences
//                  in thread 0 before the count and after it in the last block, then two
//                  publishing threads each fence again and publish with red.release.sys
//   handoff_lean   operation_handoff as it is now: fence.acq_rel.sys before the count,
//                  fence.acq_rel.gpu after it, the release reductions alone
//   copy           1.8 MB (128 rows of 14 KB, 3 parts a row) with 8 loads in flight a lane
//   copy_fence_all copy + fence_all
//   copy_fence_one copy + fence_one
//   copy_handoff   copy + handoff
//   copy_handoff_sc, copy_handoff_lean   copy + handoff_sc / handoff_lean
//
// Usage: sync_costs
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <vector>

#include "micro_common.cuh"

namespace {

using micro::check;
using micro::elapsed_us;

constexpr int kBlocks = 24, kThreads = 512, kRows = 128, kRowBytes = 14336;

struct Args {
  const int4* src;
  int4* dst;
  uint64_t* flag;
  unsigned* counter;
};

__device__ __forceinline__ void fence_one() {
  __syncthreads();
  if (threadIdx.x == 0) __threadfence_system();
}

__device__ __forceinline__ void copy_rows(const Args& a) {
  const int lane = threadIdx.x % 32;
  const int warp = blockIdx.x * (kThreads / 32) + threadIdx.x / 32;
  const int warps = kBlocks * kThreads / 32;
  constexpr int parts = 3, part_vectors = (kRowBytes / 16 + parts - 1) / parts;
  for (int item = warp; item < kRows * parts; item += warps) {
    const int row = item / parts, part = item % parts;
    const int begin = row * (kRowBytes / 16) + part * part_vectors;
    const int end = min(begin + part_vectors, (row + 1) * (kRowBytes / 16));
    for (int i = begin + lane; i < end; i += 8 * 32) {
      int4 v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (i + j * 32 < end) v[j] = __ldg(a.src + i + j * 32);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (i + j * 32 < end) a.dst[i + j * 32] = v[j];
      }
    }
  }
}

__device__ __forceinline__ void handoff(const Args& a) {
  __shared__ int last;
  fence_one();
  if (threadIdx.x == 0) last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence_system();
    *a.counter = 0;
    asm volatile("st.release.sys.u64 [%0], %1;" ::"l"(a.flag), "l"(uint64_t(1)) : "memory");
  }
}

// The kernels' handoff to two peers (flag[0], flag[1]), with the fences of `Lean`.
template <bool Lean>
__device__ __forceinline__ void handoff_to_peers(const Args& a) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    if (Lean) {
      asm volatile("fence.acq_rel.sys;" ::: "memory");
    } else {
      __threadfence_system();
    }
    last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) {
    if (Lean) {
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    } else {
      __threadfence_system();
    }
    *a.counter = 0;
  }
  __syncthreads();
  if (threadIdx.x < 2) {
    if (!Lean) __threadfence_system();
    asm volatile("red.release.sys.global.max.u64 [%0], %1;" ::"l"(a.flag + 16 * threadIdx.x),
                 "l"(uint64_t(1))
                 : "memory");
  }
}

enum Variant {
  kEmpty,
  kFenceAll,
  kFenceOne,
  kFenceGpuAll,
  kPoll,
  kHandoff,
  kHandoffSc,
  kHandoffLean,
  kCopy,
  kCopyFenceAll,
  kCopyFenceOne,
  kCopyHandoff,
  kCopyHandoffSc,
  kCopyHandoffLean,
  kVariants
};
const char* const kNames[] = {"empty",
                              "fence_all",
                              "fence_one",
                              "fence_gpu_all",
                              "poll",
                              "handoff",
                              "handoff_sc",
                              "handoff_lean",
                              "copy",
                              "copy_fence_all",
                              "copy_fence_one",
                              "copy_handoff",
                              "copy_handoff_sc",
                              "copy_handoff_lean"};
__host__ __device__ constexpr bool copies(int v) {
  return v >= kCopy;
}

template <int V>
__global__ void __launch_bounds__(kThreads) variant_kernel(Args a) {
  if constexpr (copies(V)) copy_rows(a);
  if constexpr (V == kFenceAll || V == kCopyFenceAll) __threadfence_system();
  if constexpr (V == kFenceOne || V == kCopyFenceOne) fence_one();
  if constexpr (V == kFenceGpuAll) __threadfence();
  if constexpr (V == kHandoff || V == kCopyHandoff) handoff(a);
  if constexpr (V == kHandoffSc || V == kCopyHandoffSc) handoff_to_peers<false>(a);
  if constexpr (V == kHandoffLean || V == kCopyHandoffLean) handoff_to_peers<true>(a);
  if constexpr (V == kPoll) {
    if (threadIdx.x < 2) {
      uint64_t seen, t;
      asm volatile("ld.acquire.sys.u64 %0, [%1];" : "=l"(seen) : "l"(a.flag) : "memory");
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      if (seen == 12345 && t == 0) a.dst[0] = int4{};  // never: keeps the loads
    }
  }
}

using Launch = void (*)(Args, cudaStream_t);
template <int V>
void launch(Args a, cudaStream_t s) {
  variant_kernel<V><<<kBlocks, kThreads, 0, s>>>(a);
}
template <int... V>
constexpr auto launches(std::integer_sequence<int, V...>) {
  return std::array<Launch, sizeof...(V)>{launch<V>...};
}
constexpr auto kLaunches = launches(std::make_integer_sequence<int, kVariants>{});

}  // namespace

int main() {
  if (!micro::gpu_visible("sync_costs")) return 0;
  cudaStream_t s;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
  Args a{};
  const size_t bytes = size_t(kRows) * kRowBytes;
  check(cudaMalloc(const_cast<int4**>(&a.src), bytes), "malloc");
  check(cudaMalloc(&a.dst, bytes), "malloc");
  check(cudaMalloc(&a.flag, 256), "malloc");
  check(cudaMalloc(&a.counter, 64), "malloc");
  check(cudaMemset(const_cast<int4*>(a.src), 1, bytes), "memset");
  check(cudaMemset(a.flag, 0, 256), "memset");
  check(cudaMemset(a.counter, 0, 64), "memset");
  std::printf("%-16s %12s %14s %12s   (us; 24 blocks x 512 threads; copy = %.1f MB)\n", "variant",
              "alone", "back-to-back", "graph node", bytes / 1e6);
  for (int v = 0; v < kVariants; ++v) {
    const Launch run = kLaunches[v];
    for (int i = 0; i < 20; ++i) run(a, s);
    check(cudaStreamSynchronize(s), "warm-up");
    std::vector<float> alone;
    for (int i = 0; i < 51; ++i) alone.push_back(elapsed_us(s, 1, [&] { run(a, s); }));
    std::sort(alone.begin(), alone.end());
    const float batched = elapsed_us(s, 200, [&] { run(a, s); });
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "capture");
    for (int i = 0; i < 20; ++i) run(a, s);
    check(cudaStreamEndCapture(s, &graph), "capture");
    check(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
    check(cudaGraphLaunch(exec, s), "graph");
    const float per_node =
        elapsed_us(s, 20, [&] { check(cudaGraphLaunch(exec, s), "graph"); }) / 20;
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    check(cudaGetLastError(), kNames[v]);
    std::printf("%-16s %12.2f %14.2f %12.2f\n", kNames[v], alone[alone.size() / 2], batched,
                per_node);
  }
  return 0;
}
