// Device-side rounding of fp32 to bf16, bit for bit plan::float_to_bf16_bits (plan/numerics.hpp)
// but by the hardware's round-to-nearest-even conversion: one cvt.rn.bf16x2.f32 rounds and packs
// a pair, where the integer form takes about six instructions per value, and the reductions'
// stores of their sums are among the instructions those kernels are bound by
// (docs/performance.md). The conversion returns its canonical NaN for any NaN, so a chunk holding a
// NaN takes the integer form (which keeps the payload's top bits); tests/gpu/test_gpu_numerics.cu
// compares the two over every fp32 value.
#pragma once

#include <cstdint>

#include "plan/numerics.hpp"

namespace epx::cuda {

// The bf16 bits of 2N values, two to a word: value 2i in the low half of word i, 2i + 1 in the
// high half.
template <int N>
__device__ __forceinline__ void round_to_bf16(const float (&value)[2 * N], uint32_t (&packed)[N]) {
  uint32_t nan = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;"
        : "=r"(packed[i])
        : "f"(value[2 * i + 1]), "f"(value[2 * i]));
    // A half is a NaN when its magnitude is above infinity's 0x7f80: adding 0x7f then carries
    // into bit 15, and never across halves (0x7fff + 0x7f < 0x10000). One test per chunk.
    nan |= ((packed[i] & 0x7fff7fffu) + 0x007f007fu) & 0x80008000u;
  }
  if (nan != 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      packed[i] = uint32_t(plan::float_to_bf16_bits(value[2 * i])) |
                  uint32_t(plan::float_to_bf16_bits(value[2 * i + 1])) << 16;
    }
  }
}

}  // namespace epx::cuda
