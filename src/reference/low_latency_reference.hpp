// The oracle of the low-latency mode (docs/semantics.md, "Low-latency mode"), in plain loops
// over all ranks' inputs. Row order inside an expert's region is decided at run time by the
// transports, so the reference fixes a canonical one, (source rank, token, k) ascending, which
// is src_info ascending: tests sort a transport's rows of each expert by src_info and compare
// them with these bit for bit. Combine's results do not depend on the order and compare as they
// are.
#pragma once

#include <cstdint>
#include <vector>

#include "reference/reference.hpp"

namespace epx::reference {

// What one rank receives; every [E_l][R*S_ll] array in the canonical order. `problem.max_tokens`
// is S_ll.
struct LowLatencyDispatchOutput {
  std::vector<int32_t> counts;    // [E_l] rows per local expert (duplicates count)
  std::vector<uint8_t> x;         // [E_l][R*S_ll][row_bytes], 0 past counts
  std::vector<float> x_scales;    // fp8: [E_l][R*S_ll][H/128], 0 past counts
  std::vector<float> weights;     // [E_l][R*S_ll], 0 past counts; empty without weights
  std::vector<float> aux;         // the same for aux
  std::vector<int32_t> src_info;  // [E_l][R*S_ll]: (source * S_ll + t) * K + k, -1 past counts
};

// Throws when an expert would receive more than R * S_ll rows (tokens that name one expert
// twice); the transports raise kInvalidRouting there.
std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const Problem& problem,
                                                           const std::vector<RankInputs>& inputs);

// One rank's combine inputs on its expert side, in the canonical order of its dispatch output.
struct LowLatencyCombineRankInputs {
  std::vector<uint16_t> x;     // [E_l][R*S_ll][H] bf16 bits
  std::vector<float> weights;  // [E_l][R*S_ll], or empty: the plain sum
  std::vector<float> scalars;  // [E_l][R*S_ll], or empty
};

// y[t] = sum over k ascending of fma(w_row, x_row, acc) (acc + x_row without weights) from 0,
// one rounding; scalars[t][k] the scalar of (t, k)'s row, 0 where topk_idx is -1.
std::vector<CombineOutput> low_latency_combine(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<LowLatencyDispatchOutput>& layout,
    const std::vector<LowLatencyCombineRankInputs>& inputs);

// The backward of a weighted LL combine, per expert rank in the canonical order: grad_x =
// bf16(w_row * grad_y[t]), grad_weights = dot(grad_y[t], x_row) in fp64, 0 past counts.
// grad_y[s] is [S_s][H]; x[r] and weights[r] are rank r's combine inputs.
std::vector<CombineBackwardOutput> low_latency_combine_backward(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<LowLatencyDispatchOutput>& layout,
    const std::vector<std::vector<uint16_t>>& grad_y,
    const std::vector<LowLatencyCombineRankInputs>& inputs);

}  // namespace epx::reference
