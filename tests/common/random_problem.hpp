// Random configurations and inputs shared by the host-transport tests, the GPU tests and the
// demo. Everything is a pure function of the configuration (its seed included), so a failure
// printed with `RandomConfig::describe()` replays exactly. Fields may be overwritten after
// `draw_config` (tests pin sizes that way); the draw_* functions read only the fields.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "reference/reference.hpp"

namespace epx::testing {

struct RandomConfig {
  int32_t num_ranks = 1;
  int64_t max_tokens = 1;
  int64_t hidden = 128;
  int32_t num_experts = 1;
  int32_t num_topk = 1;
  bool fp8 = false;
  bool with_weights = false;  // dispatch weights; combine weights (expanded layouts only)
  bool with_aux = false;
  bool with_scalars = false;  // combine scalars
  bool with_bias0 = false;
  bool with_bias1 = false;  // drawn only together with bias0
  bool expand = false;
  int32_t expert_alignment = 1;
  bool zero_padding = false;
  bool sync_counts = true;
  bool reduce_at_source = false;  // meaningful for expanded layouts only
  bool topk_int64 = true;         // which dtype the transport test passes topk_idx as
  // Every rank sends S_max tokens and every k of every token names one expert: the expanded
  // layout's worst case (R*S_max*K rows on one rank, duplicates included) is reached exactly.
  bool saturate = false;
  // The inputs x of dispatch and combine and combine_backward's grad_y start one element past
  // a 16-byte boundary (views into larger tensors): the CUDA transport then stages a rank's
  // rows to itself instead of reading them in place with vector loads.
  bool x_unaligned = false;
  uint64_t seed = 0;

  std::string describe() const;  // one line, every field
  reference::Problem problem() const;
};

// A random configuration: hidden <= 256 (a multiple of 128 for fp8), max_tokens <= 48,
// K in [1, 9], E a multiple of R in [R, 64], alignment in {1, 4, 128}, every flag random.
RandomConfig draw_config(uint64_t seed, int32_t num_ranks);

// A configuration at production shapes: hidden from {7168, 4096, 2048, 7176, 1032} (bf16; the
// last two odd multiples of 8, so rows end in a partial 16-byte vector group) or {7168, 2048}
// (fp8), up to 600 tokens per rank, up to 256 experts, top-8 (sometimes 4 or 6); the other
// fields as draw_config draws them.
RandomConfig draw_production_config(uint64_t seed, int32_t num_ranks);

// The i-th configuration of a random suite: every fourth at production shapes, the others small
// (many shapes quickly).
RandomConfig draw_suite_config(uint64_t seed, int32_t num_ranks, int index);

// The second scenario the random suites run on the same buffer (buffers are reusable): the same
// sizes, another seed, the other layout and the other sync_counts choice.
RandomConfig other_layout_config(const RandomConfig& config);

// The unsynced expanded worst case, reached exactly: K = 5 (more than E_l from two ranks up),
// S_max = 7, every k of every token names one expert (so its rows come from duplicates),
// sync_counts off; the other fields as draw_config(seed) draws them.
RandomConfig saturated_config(uint64_t seed, int32_t num_ranks, int32_t expert_alignment);

// Every rank's dispatch inputs: uneven token counts (some ranks 0, sometimes all S_max),
// masked -1 experts, tokens with all top-k on one rank, tokens with no expert at all,
// occasionally one expert named twice by a token. topk_idx is int64 whatever topk_int64 says.
std::vector<reference::RankInputs> draw_dispatch_inputs(const RandomConfig& config);

// Every rank's combine inputs for `layout` (the reference dispatch of `inputs`): random rows,
// weights (expanded and with_weights), scalars, biases as the configuration asks.
std::vector<reference::CombineRankInputs> draw_combine_inputs(
    const RandomConfig& config, const std::vector<reference::RankInputs>& inputs,
    const std::vector<reference::DispatchOutput>& layout);

// combine_backward's incoming gradient: [S_s][H] bf16 per source rank s.
std::vector<std::vector<uint16_t>> draw_grad_y(const RandomConfig& config,
                                               const std::vector<reference::RankInputs>& inputs);

// A finite, non-zero bf16 of either sign with an exponent spread over about 2^-10..2^4, so
// sums round in varied places.
uint16_t random_bf16(std::mt19937_64& rng);

// The run's base seed, fresh each run and printed (`tag` names the suite in the line), or
// EPX_TEST_SEED's, which replays a run.
inline uint64_t base_seed(const char* tag) {
  static const uint64_t seed = [tag] {
    const char* env = std::getenv("EPX_TEST_SEED");
    const uint64_t value = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "[" << tag << "] base seed " << value << " (EPX_TEST_SEED=" << value
              << " replays this run)" << std::endl;
    return value;
  }();
  return seed;
}

// "" when the arrays are equal bytewise; otherwise names the first differing element (index,
// got and want in hex) and how many elements differ.
std::string first_mismatch(const void* got, const void* want, size_t elem_bytes, size_t count,
                           const char* what);

}  // namespace epx::testing
