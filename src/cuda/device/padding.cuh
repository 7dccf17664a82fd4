// The padding rows of an expanded layout (between an expert's rows and the next expert's
// aligned start): weights/aux 0, and x (+ scales) 0 when zero_x. Run by every block of the
// kernel that wrote the real rows (padding rows are disjoint from them): blocks over experts,
// warps over each expert's padding rows.
#pragma once

#include "cuda/device/device_primitives.cuh"

namespace epx::cuda {

struct PaddingRows {
  const int32_t* tokens_per_expert = nullptr;  // [E_l]
  const int32_t* expert_offsets = nullptr;     // [E_l+1]
  int32_t local_experts = 0;
  char* x = nullptr;
  int64_t row_bytes = 0;
  float* scales = nullptr;
  int64_t scales_per_row = 0;
  float* weights = nullptr;
  float* aux = nullptr;
  bool zero_x = false;
};

__device__ __forceinline__ void write_padding(const PaddingRows& p) {
  const int lane = lane_id();
  const int warp = warp_in_block();
  for (int e = blockIdx.x; e < p.local_experts; e += gridDim.x) {
    const int64_t first = p.expert_offsets[e] + p.tokens_per_expert[e];
    const int64_t end = p.expert_offsets[e + 1];
    for (int64_t row = first + warp; row < end; row += warps_per_block()) {
      if (lane == 0) {
        if (p.weights) p.weights[row] = 0.0f;
        if (p.aux) p.aux[row] = 0.0f;
      }
      if (!p.zero_x) continue;
      warp_zero(p.x + row * p.row_bytes, p.row_bytes, lane);
      for (int64_t i = lane; p.scales && i < p.scales_per_row; i += kWarpSize) {
        p.scales[row * p.scales_per_row + i] = 0.0f;
      }
    }
  }
}

}  // namespace epx::cuda
