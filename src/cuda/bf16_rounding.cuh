// Device-side rounding of fp32 to bf16, bit for bit plan::float_to_bf16_bits (plan/numerics.hpp)
// but by the hardware's round-to-nearest-even conversion: one cvt.rn.bf16x2.f32 rounds and packs
// a pair, where the integer form takes about six instructions per value, and the reductions'
// stores of their sums are among the instructions those kernels are bound by (bench/NOTES.md
// change 28). The conversion returns its canonical NaN for any NaN, so a pair holding a NaN
// takes the integer form (which keeps the payload's top bits); tests/gpu/test_gpu_numerics.cu
// compares the two over every fp32 value.
#pragma once

#include <cstdint>

#include "plan/numerics.hpp"

namespace epx::cuda {

// bf16(low) in bits 0-15, bf16(high) in bits 16-31.
__device__ __forceinline__ uint32_t bf16x2_bits(float low, float high) {
  uint32_t packed;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(high), "f"(low));
  if (isnan(low) || isnan(high)) {
    packed = uint32_t(plan::float_to_bf16_bits(low)) |
             uint32_t(plan::float_to_bf16_bits(high)) << 16;
  }
  return packed;
}

}  // namespace epx::cuda
