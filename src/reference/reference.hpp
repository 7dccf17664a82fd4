// The oracle: computes every rank's outputs of dispatch, combine and combine_backward from all
// ranks' inputs with plain loops, straight from docs/semantics.md. It shares only the numerics
// (plan/numerics.hpp) with the transports, never their plan or staging code, so an error in the
// routing plan cannot hide in both.
#pragma once

#include <cstdint>
#include <vector>

namespace epx::reference {

struct Problem {
  int32_t num_ranks = 0;
  int64_t max_tokens = 0;  // S_max
  int64_t hidden = 0;      // H
  int32_t num_experts = 0;
  int32_t num_topk = 0;
  bool fp8 = false;  // rows are H fp8 bytes plus H/128 fp32 scales instead of H bf16 values
  int32_t local_experts() const { return num_experts / num_ranks; }
  int64_t row_bytes() const { return fp8 ? hidden : 2 * hidden; }
  int64_t scales_per_row() const { return fp8 ? hidden / 128 : 0; }
};

// One rank's dispatch inputs. Optional channels are empty vectors.
struct RankInputs {
  int64_t num_tokens = 0;
  std::vector<uint8_t> x;         // [S][row_bytes]: bf16 bits (little endian) or fp8 bytes
  std::vector<float> x_scales;    // fp8: [S][H/128]
  std::vector<int64_t> topk_idx;  // [S][K]
  std::vector<float> weights;     // [S][K] or empty
  std::vector<float> aux;         // [S][K] or empty
};

// What one rank receives.
struct DispatchOutput {
  int64_t num_recv_tokens = 0;      // N
  int64_t num_rows = 0;             // M (expanded) or N (compact)
  std::vector<uint8_t> x;           // [rows][row_bytes]
  std::vector<float> x_scales;      // fp8: [rows][H/128]
  std::vector<uint8_t> is_padding;  // [rows]: 1 for expanded padding rows
  // Compact: [N][K] local expert / weight / aux (-1 / 0 / 0 where the expert is elsewhere).
  // Expanded: topk_idx empty, weights and aux [M] (0 in padding rows).
  std::vector<int32_t> topk_idx;
  std::vector<float> weights;
  std::vector<float> aux;
  // Layout bookkeeping (both layouts).
  std::vector<int32_t> src_token;          // [N] global id g = s * S_max + t
  std::vector<int32_t> expanded_rows;      // [N][K], -1 where (token, k) is not local
  std::vector<int32_t> tokens_per_expert;  // [E_l] real rows per local expert (duplicates count)
  std::vector<int32_t> expert_offsets;     // [E_l+1] padded segment starts; last = M
};

std::vector<DispatchOutput> dispatch(const Problem& problem, const std::vector<RankInputs>& inputs,
                                     bool expand, int32_t expert_alignment, bool zero_padding);

// One rank's combine inputs (rows indexed like that rank's dispatch output).
struct CombineRankInputs {
  std::vector<uint16_t> x;      // [rows][H] bf16 bits
  std::vector<float> weights;   // expanded: [M] or empty
  std::vector<float> scalars;   // expanded [M] / compact [N][K], or empty
  std::vector<uint16_t> bias0;  // [S][H] of this rank as a source, or empty
  std::vector<uint16_t> bias1;  // [S][H], or empty
};

struct CombineOutput {
  std::vector<uint16_t> x;     // [S][H] bf16 bits
  std::vector<float> scalars;  // [S][K], or empty when no scalars were given
};

// `layout` is the reference dispatch output the combine inverts; `reduce_at_source` is ignored
// for compact layouts.
std::vector<CombineOutput> combine(const Problem& problem, const std::vector<RankInputs>& routing,
                                   const std::vector<DispatchOutput>& layout, bool expand,
                                   const std::vector<CombineRankInputs>& inputs,
                                   bool reduce_at_source);

struct CombineBackwardOutput {
  std::vector<uint16_t> grad_x;      // [M][H] bf16 bits: bf16(w_row * grad_y[t]); 0 in padding rows
  std::vector<double> grad_weights;  // [M] dot(grad_y[t], x_row) in fp64; 0 in padding rows
  std::vector<double> magnitude;     // [M] sum |grad_y[t]| |x_row|, the scale of the tolerance
};

// grad_y[s] is [S_s][H] bf16 per source rank; x[r] is [M_r][H] bf16 and weights[r] is [M_r] on
// expert rank r.
std::vector<CombineBackwardOutput> combine_backward(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<DispatchOutput>& layout, const std::vector<std::vector<uint16_t>>& grad_y,
    const std::vector<std::vector<uint16_t>>& x, const std::vector<std::vector<float>>& weights);

// The contract's tolerance (docs/semantics.md) for grad_weights: |got - want| <= 1e-5 * magnitude.
inline bool grad_weight_ok(float got, double want, double magnitude) {
  const double diff = static_cast<double>(got) - want;
  return (diff < 0 ? -diff : diff) <= 1e-5 * magnitude;
}

}  // namespace epx::reference

// The oracle of the low-latency mode (docs/semantics.md, "Low-latency mode"), in plain loops
// over all ranks' inputs. Row order inside an expert's region is decided at run time by the
// transports, so the reference fixes a canonical one, (source rank, token, k) ascending, which
// is src_info ascending: tests sort a transport's rows of each expert by src_info and compare
// them with these bit for bit. Combine's results do not depend on the order and compare as they
// are.
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
