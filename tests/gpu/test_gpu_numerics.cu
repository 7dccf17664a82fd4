// The device-side bf16 rounding of the reductions (cuda/device/bf16_rounding.cuh: the hardware's
// conversion, the integer form for chunks holding a NaN) against plan::float_to_bf16_bits, the
// rounding every backend and the reference share, over every fp32 bit pattern in each slot of
// an 8-value chunk.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/device/bf16_rounding.cuh"
#include "plan/numerics.hpp"

namespace {

struct Mismatches {
  unsigned long long count;
  uint32_t low, high;  // the first pair that differed (fp32 bits)
  uint32_t got, want;
};

// Chunk i holds bits i ^ kPartner[s] in slot s: as i covers every pattern, so does each slot,
// with other values beside it (a NaN anywhere in a chunk sends the whole chunk the slow way).
__constant__ uint32_t kPartner[8] = {0u,          0x9e3779b9u, 0x7f800001u, 0x00400000u,
                                     0x3c6ef372u, 0x80000000u, 0xdeadbeefu, 0x00000001u};

__global__ void compare_every_float(Mismatches* out) {
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (uint64_t(1) << 32);
       i += stride) {
    float value[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) value[s] = __uint_as_float(static_cast<uint32_t>(i) ^ kPartner[s]);
    uint32_t got[4];
    epx::cuda::round_to_bf16<4>(value, got);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t want = uint32_t(epx::plan::float_to_bf16_bits(value[2 * w])) |
                            uint32_t(epx::plan::float_to_bf16_bits(value[2 * w + 1])) << 16;
      if (got[w] != want && atomicAdd(&out->count, 1ull) == 0) {
        out->low = __float_as_uint(value[2 * w]);
        out->high = __float_as_uint(value[2 * w + 1]);
        out->got = got[w];
        out->want = want;
      }
    }
  }
}

TEST(GpuNumerics, HardwareBf16RoundingMatchesTheReferenceForEveryFloat) {
  // (gpu_test_support.hpp's skip needs C++20 headers this CUDA source is not compiled with.)
  int gpus = 0;
  if (cudaGetDeviceCount(&gpus) != cudaSuccess || gpus == 0) GTEST_SKIP() << "needs 1 GPU";
  Mismatches* mismatches = nullptr;
  ASSERT_EQ(cudaMallocManaged(&mismatches, sizeof(Mismatches)), cudaSuccess);
  *mismatches = Mismatches{};
  compare_every_float<<<1024, 256>>>(mismatches);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(mismatches->count, 0u)
      << std::hex << "first: fp32 " << mismatches->low << " and " << mismatches->high << " gave 0x"
      << mismatches->got << ", plan::float_to_bf16_bits 0x" << mismatches->want;
  cudaFree(mismatches);
}

}  // namespace
