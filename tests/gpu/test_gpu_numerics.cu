// The device-side bf16 rounding of the reductions (cuda/bf16_rounding.cuh: the hardware's
// conversion, with the integer form for NaNs) against plan::float_to_bf16_bits, the rounding
// every backend and the reference share, over every fp32 bit pattern in both halves of a pair.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>

#include "cuda/bf16_rounding.cuh"
#include "plan/numerics.hpp"

namespace {

struct Mismatches {
  unsigned long long count;
  uint32_t low, high;  // the first pair that differed (as fp32 bits)
  uint32_t got, want;
};

// Pair i is (bits i, bits i ^ kPartner): as i covers every pattern, so do both halves.
constexpr uint32_t kPartner = 0x9e3779b9u;

__global__ void compare_every_float(Mismatches* out) {
  const uint64_t stride = uint64_t(gridDim.x) * blockDim.x;
  for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (uint64_t(1) << 32);
       i += stride) {
    const uint32_t low = static_cast<uint32_t>(i), high = low ^ kPartner;
    const float a = __uint_as_float(low), b = __uint_as_float(high);
    const uint32_t got = epx::cuda::bf16x2_bits(a, b);
    const uint32_t want = uint32_t(epx::plan::float_to_bf16_bits(a)) |
                          uint32_t(epx::plan::float_to_bf16_bits(b)) << 16;
    if (got != want && atomicAdd(&out->count, 1ull) == 0) {
      out->low = low;
      out->high = high;
      out->got = got;
      out->want = want;
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
