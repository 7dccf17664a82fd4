// row_sums: how fast 24 blocks of 512 threads (the kernels' launch shape) compute the
// expert-side sum of an expanded combine on one GPU: for each of 4096 tokens, y = sum over
// k < 8 of w[k] * x[row(k)] with rows of 14 KB (hidden 7168, bf16), fp32 fma in k order, one
// bf16 rounding; the 8 rows of a token are scattered (a random permutation of the 32 768).
// That is 470 MB read and 59 MB written. The question (docs/performance.md): is the sum in
// src/cuda/kernels/combine_kernels.cu bound by the bytes it keeps in flight, and by how much would
// more in flight pay?
//
//   regsTxS   every lane loads T terms x S 16-byte positions into registers, then sums
//             (T=2, S=4 is sum_terms today: 8 loads, 128 bytes in flight per lane)
//   asyncN    each warp streams its terms through a ring of N stages of 2 KB in shared memory
//             with cp.async (16 bytes per lane per position, 4 positions per stage): the loads
//             in flight need no registers, (N - 1) * 2 KB per warp
//
// Every variant sums in the same order, so their outputs are compared bit for bit. Each case is
// the mean of 20 back-to-back launches; GB/s counts bytes read + written.
//
// Usage: row_sums
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "micro_common.cuh"
#include "plan/numerics.hpp"

namespace {

using micro::check;
using micro::elapsed_us;

constexpr int kBlocks = 24, kThreads = 512, kWarps = kThreads / 32;
constexpr int kHidden = 7168, kTopk = 8, kTokens = 4096;
constexpr int kSpan = 4;                            // 16-byte positions per lane per stage
constexpr int kStageBytes = 32 * 16 * kSpan;        // 2 KB: one term's slice of 32 * 4 * 8 elements
constexpr int kSlices = kHidden * 2 / kStageBytes;  // 7 slices per row
static_assert(kHidden * 2 % kStageBytes == 0);

struct Args {
  const uint16_t* x;    // [kTokens * kTopk, kHidden]
  const int32_t* rows;  // [kTokens, kTopk]
  const float* w;       // [kTokens * kTopk] by row
  uint16_t* y;          // [kTokens, kHidden]
};

// The kernels' numerics (plan/numerics.hpp) on 8 packed bf16 values.
__device__ __forceinline__ void accumulate(float (&acc)[8], float w, const uint4& v) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto low = static_cast<uint16_t>(words[i]), high = static_cast<uint16_t>(words[i] >> 16);
    acc[2 * i] = epx::plan::accumulate_weighted(acc[2 * i], w, epx::plan::bf16_bits_to_float(low));
    acc[2 * i + 1] =
        epx::plan::accumulate_weighted(acc[2 * i + 1], w, epx::plan::bf16_bits_to_float(high));
  }
}

__device__ __forceinline__ void store_bf16(uint16_t* out, const float (&acc)[8]) {
  uint4 v;
  uint32_t* words = &v.x;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    words[i] = uint32_t(epx::plan::float_to_bf16_bits(acc[2 * i])) |
               uint32_t(epx::plan::float_to_bf16_bits(acc[2 * i + 1])) << 16;
  }
  *reinterpret_cast<uint4*>(out) = v;
}

// Lane positions: slice s, position u covers elements s * 1024 + u * 256 + lane * 8 .. + 8.
__device__ __forceinline__ int element(int slice, int u, int lane) {
  return slice * (kStageBytes / 2) + u * 256 + lane * 8;
}

template <int Terms, int Span>
__global__ void __launch_bounds__(kThreads) regs_kernel(Args a) {
  const int lane = threadIdx.x % 32;
  for (int t = blockIdx.x * kWarps + threadIdx.x / 32; t < kTokens; t += kBlocks * kWarps) {
    const int32_t* rows = a.rows + t * kTopk;
    for (int h0 = lane * 8; h0 < kHidden; h0 += Span * 256) {
      float acc[Span][8] = {};
      for (int k0 = 0; k0 < kTopk; k0 += Terms) {
        uint4 v[Terms][Span];
        float w[Terms];
#pragma unroll
        for (int j = 0; j < Terms; ++j) {
          const int row = rows[k0 + j];
          w[j] = a.w[row];
#pragma unroll
          for (int u = 0; u < Span; ++u) {
            if (h0 + u * 256 < kHidden) {
              v[j][u] =
                  *reinterpret_cast<const uint4*>(a.x + int64_t(row) * kHidden + h0 + u * 256);
            }
          }
        }
#pragma unroll
        for (int j = 0; j < Terms; ++j) {
#pragma unroll
          for (int u = 0; u < Span; ++u) {
            if (h0 + u * 256 < kHidden) accumulate(acc[u], w[j], v[j][u]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < Span; ++u) {
        if (h0 + u * 256 < kHidden) store_bf16(a.y + int64_t(t) * kHidden + h0 + u * 256, acc[u]);
      }
    }
  }
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
}

// Stage i of a token is (slice i / kTopk, term i % kTopk): every slice sums its 8 terms in order.
template <int Stages>
__global__ void __launch_bounds__(kThreads) async_kernel(Args a) {
  extern __shared__ uint4 ring[];  // [kWarps][Stages][32 * kSpan]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint4* mine = ring + warp * Stages * 32 * kSpan;
  constexpr int kStagesPerToken = kSlices * kTopk;
  for (int t = blockIdx.x * kWarps + warp; t < kTokens; t += kBlocks * kWarps) {
    const int32_t* rows = a.rows + t * kTopk;
    auto issue = [&](int i) {
      if (i < kStagesPerToken) {
        const int slice = i / kTopk, row = rows[i % kTopk];
        uint4* buffer = mine + (i % Stages) * 32 * kSpan;
#pragma unroll
        for (int u = 0; u < kSpan; ++u) {
          cp_async16(buffer + u * 32 + lane,
                     a.x + int64_t(row) * kHidden + element(slice, u, lane));
        }
      }
      cp_async_commit();  // an empty group past the end keeps the count uniform
    };
#pragma unroll
    for (int i = 0; i < Stages - 1; ++i) issue(i);
    float acc[kSpan][8] = {};
    for (int i = 0; i < kStagesPerToken; ++i) {
      cp_async_wait<Stages - 2>();
      __syncwarp();
      const uint4* buffer = mine + (i % Stages) * 32 * kSpan;
      const float w = a.w[rows[i % kTopk]];
#pragma unroll
      for (int u = 0; u < kSpan; ++u) accumulate(acc[u], w, buffer[u * 32 + lane]);
      __syncwarp();  // the buffer is read before it is refilled below
      issue(i + Stages - 1);
      if (i % kTopk == kTopk - 1) {
        const int slice = i / kTopk;
#pragma unroll
        for (int u = 0; u < kSpan; ++u) {
          store_bf16(a.y + int64_t(t) * kHidden + element(slice, u, lane), acc[u]);
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
        }
      }
    }
    cp_async_wait<0>();
    __syncwarp();
  }
}

}  // namespace

int main() {
  if (!micro::gpu_visible("row_sums")) return 0;
  const int64_t rows_total = int64_t(kTokens) * kTopk;
  uint16_t *x, *y, *reference;
  int32_t* rows;
  float* w;
  check(cudaMalloc(&x, rows_total * kHidden * 2), "malloc");
  check(cudaMalloc(&y, int64_t(kTokens) * kHidden * 2), "malloc");
  check(cudaMalloc(&reference, int64_t(kTokens) * kHidden * 2), "malloc");
  check(cudaMalloc(&rows, rows_total * 4), "malloc");
  check(cudaMalloc(&w, rows_total * 4), "malloc");
  {
    std::mt19937 rng(7);
    std::vector<uint16_t> xs(rows_total * kHidden);
    for (auto& v : xs) v = static_cast<uint16_t>(0x3c00 + rng() % 0x0800);  // bf16 in [0.0078, 2)
    std::vector<int32_t> perm(rows_total);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::vector<float> ws(rows_total);
    for (auto& v : ws) v = static_cast<float>(rng() % 1000) / 997.0f;
    check(cudaMemcpy(x, xs.data(), xs.size() * 2, cudaMemcpyHostToDevice), "upload");
    check(cudaMemcpy(rows, perm.data(), perm.size() * 4, cudaMemcpyHostToDevice), "upload");
    check(cudaMemcpy(w, ws.data(), ws.size() * 4, cudaMemcpyHostToDevice), "upload");
  }
  cudaStream_t s;
  check(cudaStreamCreate(&s), "stream");
  const double bytes = double(rows_total + kTokens) * kHidden * 2;
  const Args args{x, rows, w, y};
  const Args reference_args{x, rows, w, reference};
  regs_kernel<2, 4><<<kBlocks, kThreads, 0, s>>>(reference_args);
  check(cudaStreamSynchronize(s), "reference");
  std::vector<uint16_t> want(int64_t(kTokens) * kHidden), got(want.size());
  check(cudaMemcpy(want.data(), reference, want.size() * 2, cudaMemcpyDeviceToHost), "download");

  std::printf("%-10s %10s %9s  %s\n", "path", "us", "GB/s", "output");
  auto report = [&](const char* name, auto launch) {
    check(cudaMemset(y, 0, want.size() * 2), "clear");
    launch();
    check(cudaStreamSynchronize(s), name);
    check(cudaMemcpy(got.data(), y, got.size() * 2, cudaMemcpyDeviceToHost), "download");
    const bool same = std::equal(got.begin(), got.end(), want.begin());
    for (int i = 0; i < 3; ++i) launch();
    const float us = elapsed_us(s, 20, launch);
    check(cudaGetLastError(), name);
    std::printf("%-10s %10.2f %9.1f  %s\n", name, us, bytes / (us * 1e3),
                same ? "same as regs2x4" : "DIFFERS");
  };
  report("regs2x4", [&] { regs_kernel<2, 4><<<kBlocks, kThreads, 0, s>>>(args); });
  report("regs4x4", [&] { regs_kernel<4, 4><<<kBlocks, kThreads, 0, s>>>(args); });
  report("regs8x2", [&] { regs_kernel<8, 2><<<kBlocks, kThreads, 0, s>>>(args); });
  report("regs8x4", [&] { regs_kernel<8, 4><<<kBlocks, kThreads, 0, s>>>(args); });
  auto async = [&](auto kernel, int stages, const char* name) {
    const int smem = kWarps * stages * kStageBytes;
    check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), name);
    report(name, [&] { kernel<<<kBlocks, kThreads, smem, s>>>(args); });
  };
  async(async_kernel<3>, 3, "async3");
  async(async_kernel<4>, 4, "async4");
  async(async_kernel<6>, 6, "async6");
  float copy_us = elapsed_us(
      s, 20, [&] { cudaMemcpyAsync(reference, y, want.size() * 2, cudaMemcpyDeviceToDevice, s); });
  std::printf("%-10s %10.2f %9.1f  (copy engine, 59 MB read + written, for scale)\n", "memcpy",
              copy_us, 2.0 * want.size() * 2 / (copy_us * 1e3));
  return 0;
}
