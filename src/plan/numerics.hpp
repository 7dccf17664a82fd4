// The exact numerics of docs/semantics.md, shared by the reference, the host transport and the
// CUDA kernels: bf16 <-> fp32 conversion with round-to-nearest-even, and the weighted/unweighted
// accumulation steps. Every backend calls these, so equal inputs give equal bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "plan/host_device.hpp"

namespace epx::plan {

EPX_HD float bf16_bits_to_float(uint16_t bits) {
  const uint32_t word = uint32_t(bits) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(word);
#else
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
#endif
}

// Round-to-nearest-even; NaN stays NaN (quiet bit set), infinities stay infinite.
EPX_HD uint16_t float_to_bf16_bits(float value) {
#if defined(__CUDA_ARCH__)
  uint32_t word = __float_as_uint(value);
#else
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
#endif
  if ((word & 0x7f800000u) == 0x7f800000u && (word & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((word >> 16) | 0x0040u);
  }
  const uint32_t rounding = 0x7fffu + ((word >> 16) & 1u);
  return static_cast<uint16_t>((word + rounding) >> 16);
}

// One weighted term: acc = fma(w, x, acc), a single rounding (std::fma / __fmaf_rn).
EPX_HD float accumulate_weighted(float acc, float weight, float x) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(weight, x, acc);
#else
  return std::fma(weight, x, acc);
#endif
}

// One unweighted term: acc = acc + x.
EPX_HD float accumulate(float acc, float x) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(acc, x);
#else
  return acc + x;
#endif
}

// combine_backward's gradient row: bf16(w * g), one rounding to fp32 then one to bf16.
EPX_HD uint16_t scaled_gradient_bits(float weight, float grad) {
#if defined(__CUDA_ARCH__)
  return float_to_bf16_bits(__fmul_rn(weight, grad));
#else
  return float_to_bf16_bits(weight * grad);
#endif
}

}  // namespace epx::plan
