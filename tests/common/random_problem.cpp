#include "common/random_problem.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <sstream>

namespace epx::testing {
namespace {

// Each draw_* function gets its own stream, so changing one never shifts another's values.
enum Stream : uint64_t { kConfig = 1, kDispatch = 2, kCombine = 3, kGradY = 4, kProduction = 5 };

uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::mt19937_64 stream_for(uint64_t seed, uint64_t stream) {
  return std::mt19937_64(splitmix64(splitmix64(seed) ^ (stream * 0x632be59bd9b4e019ull)));
}

int64_t uniform(std::mt19937_64& rng, int64_t lo, int64_t hi) {  // inclusive
  return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

bool chance(std::mt19937_64& rng, double p) {
  return std::bernoulli_distribution(p)(rng);
}

template <typename T, size_t N>
T pick(std::mt19937_64& rng, const T (&values)[N]) {
  return values[static_cast<size_t>(uniform(rng, 0, int64_t(N) - 1))];
}

float nonzero_float(std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  float value = 0.0f;
  while (value == 0.0f) value = normal(rng);
  return value;
}

std::vector<uint16_t> random_bf16_rows(std::mt19937_64& rng, int64_t count) {
  std::vector<uint16_t> values(static_cast<size_t>(count));
  for (uint16_t& v : values) v = random_bf16(rng);
  return values;
}

// One token's top-k. Modes are chosen so that every routing shape the layouts treat specially
// shows up in a few dozen tokens.
std::vector<int64_t> draw_topk(std::mt19937_64& rng, const reference::Problem& p, bool skewed,
                               int32_t hot_rank) {
  const int32_t K = p.num_topk, E = p.num_experts, E_l = p.local_experts();
  std::vector<int64_t> topk(static_cast<size_t>(K), -1);
  const int64_t mode = uniform(rng, 0, 99);
  if (mode < 8) return topk;  // no expert at all
  std::vector<int64_t> pool;
  if (mode < 23 || (skewed && mode < 60)) {
    // All top-k on one rank.
    const int32_t rank = skewed ? hot_rank : int32_t(uniform(rng, 0, p.num_ranks - 1));
    pool.resize(static_cast<size_t>(E_l));
    std::iota(pool.begin(), pool.end(), int64_t(rank) * E_l);
  } else {
    pool.resize(static_cast<size_t>(E));
    std::iota(pool.begin(), pool.end(), int64_t(0));
  }
  std::shuffle(pool.begin(), pool.end(), rng);
  for (size_t k = 0; k < topk.size() && k < pool.size(); ++k) topk[k] = pool[k];
  for (int64_t& e : topk) {
    if (chance(rng, 0.12)) e = -1;
  }
  if (K >= 2 && chance(rng, 0.05)) {
    const size_t from = size_t(uniform(rng, 0, K - 1)), to = size_t(uniform(rng, 0, K - 1));
    if (from != to && topk[from] >= 0) topk[to] = topk[from];
  }
  return topk;
}

std::string hex_of(const unsigned char* bytes, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string text = "0x";
  for (size_t i = n; i-- > 0;) {  // little endian: the most significant byte is last
    text += digits[bytes[i] >> 4];
    text += digits[bytes[i] & 15];
  }
  return text;
}

}  // namespace

std::string RandomConfig::describe() const {
  std::ostringstream out;
  out << "R=" << num_ranks << " S_max=" << max_tokens << " H=" << hidden << " E=" << num_experts
      << " K=" << num_topk << " fp8=" << fp8 << " weights=" << with_weights << " aux=" << with_aux
      << " scalars=" << with_scalars << " bias0=" << with_bias0 << " bias1=" << with_bias1
      << " expand=" << expand << " alignment=" << expert_alignment
      << " zero_padding=" << zero_padding << " sync_counts=" << sync_counts
      << " reduce_at=" << (reduce_at_source ? "source" : "expert")
      << " topk=" << (topk_int64 ? "int64" : "int32") << " saturate=" << saturate
      << " x_unaligned=" << x_unaligned << " seed=" << seed;
  return out.str();
}

reference::Problem RandomConfig::problem() const {
  reference::Problem p;
  p.num_ranks = num_ranks;
  p.max_tokens = max_tokens;
  p.hidden = hidden;
  p.num_experts = num_experts;
  p.num_topk = num_topk;
  p.fp8 = fp8;
  return p;
}

RandomConfig draw_config(uint64_t seed, int32_t num_ranks) {
  std::mt19937_64 rng = stream_for(seed ^ (uint64_t(num_ranks) << 48), kConfig);
  RandomConfig c;
  c.num_ranks = num_ranks;
  c.seed = seed;
  c.fp8 = chance(rng, 0.25);
  static const int64_t kBf16Hidden[] = {8, 24, 64, 128, 200, 256};
  static const int64_t kFp8Hidden[] = {128, 256};
  c.hidden = c.fp8 ? pick(rng, kFp8Hidden) : pick(rng, kBf16Hidden);
  static const int64_t kTokens[] = {1, 2, 5, 16, 33, 48};
  c.max_tokens = chance(rng, 0.5) ? pick(rng, kTokens) : uniform(rng, 1, 48);
  const int32_t max_local = std::max(1, 64 / std::max(1, num_ranks));
  const int64_t local =
      chance(rng, 0.3) ? uniform(rng, 1, std::min(2, max_local)) : uniform(rng, 1, max_local);
  c.num_experts = int32_t(num_ranks * local);
  c.num_topk = int32_t(std::min<int64_t>(uniform(rng, 1, 9), c.num_experts));
  c.with_weights = chance(rng, 0.6);
  c.with_aux = chance(rng, 0.4);
  c.with_scalars = chance(rng, 0.5);
  c.with_bias0 = chance(rng, 0.4);
  c.with_bias1 = c.with_bias0 && chance(rng, 0.5);
  c.expand = chance(rng, 0.5);
  static const int32_t kAlignments[] = {1, 4, 128};
  c.expert_alignment = pick(rng, kAlignments);
  c.zero_padding = chance(rng, 0.5);
  c.sync_counts = chance(rng, 0.6);
  c.reduce_at_source = chance(rng, 0.5);
  c.topk_int64 = chance(rng, 0.5);
  c.saturate = chance(rng, 0.05);
  c.x_unaligned = chance(rng, 0.25);  // drawn last: the fields above keep their draws
  return c;
}

RandomConfig draw_production_config(uint64_t seed, int32_t num_ranks) {
  RandomConfig c = draw_config(seed, num_ranks);
  std::mt19937_64 rng = stream_for(seed ^ (uint64_t(num_ranks) << 48), kProduction);
  static const int64_t kBf16Hidden[] = {7168, 4096, 2048, 7176, 1032};
  static const int64_t kFp8Hidden[] = {7168, 2048};
  c.hidden = c.fp8 ? pick(rng, kFp8Hidden) : pick(rng, kBf16Hidden);
  static const int64_t kTokens[] = {1, 128, 256, 512, 600};
  c.max_tokens = chance(rng, 0.5) ? pick(rng, kTokens) : uniform(rng, 1, 600);
  const int64_t max_local = std::max<int64_t>(1, 256 / num_ranks);
  static const int64_t kLocal[] = {1, 2, 8, 32, 64, 128, 256};
  int64_t local = pick(rng, kLocal);
  while (local > max_local) local /= 2;
  c.num_experts = int32_t(num_ranks * std::max<int64_t>(1, local));
  static const int32_t kTopk[] = {8, 8, 8, 6, 4};
  c.num_topk = std::min(pick(rng, kTopk), c.num_experts);
  c.saturate = false;  // the saturated worst case is exercised at small sizes
  return c;
}

RandomConfig draw_suite_config(uint64_t seed, int32_t num_ranks, int index) {
  return index % 4 == 3 ? draw_production_config(seed, num_ranks) : draw_config(seed, num_ranks);
}

RandomConfig other_layout_config(const RandomConfig& config) {
  RandomConfig again = config;
  again.seed = config.seed ^ 0xa5a5a5a5ull;
  again.expand = !config.expand;
  again.sync_counts = !config.sync_counts;
  return again;
}

RandomConfig saturated_config(uint64_t seed, int32_t num_ranks, int32_t expert_alignment) {
  RandomConfig config = draw_config(seed, num_ranks);
  // The fewest local experts with at least K experts in all: E_l < K from two ranks up.
  config.num_topk = 5;
  config.num_experts = num_ranks * ((5 + num_ranks - 1) / num_ranks);
  config.max_tokens = 7;
  config.expand = true;
  config.sync_counts = false;
  config.expert_alignment = expert_alignment;
  config.saturate = true;
  return config;
}

std::vector<reference::RankInputs> draw_dispatch_inputs(const RandomConfig& config) {
  std::mt19937_64 rng = stream_for(config.seed, kDispatch);
  const reference::Problem p = config.problem();
  const int32_t R = p.num_ranks;
  const bool all_full = chance(rng, 0.25);
  const bool skewed = chance(rng, 0.25);
  const int32_t hot_rank = int32_t(uniform(rng, 0, R - 1));
  std::vector<reference::RankInputs> inputs(static_cast<size_t>(R));
  for (reference::RankInputs& in : inputs) {
    const int64_t kind = uniform(rng, 0, 9);
    in.num_tokens = config.saturate || all_full || kind < 2 ? p.max_tokens
                    : kind < 4                              ? 0
                                                            : uniform(rng, 0, p.max_tokens);
  }
  const int64_t saturated_expert = uniform(rng, 0, p.num_experts - 1);
  for (reference::RankInputs& in : inputs) {
    const int64_t S = in.num_tokens;
    for (int64_t t = 0; t < S; ++t) {
      const std::vector<int64_t> topk =
          config.saturate ? std::vector<int64_t>(static_cast<size_t>(p.num_topk), saturated_expert)
                          : draw_topk(rng, p, skewed, hot_rank);
      in.topk_idx.insert(in.topk_idx.end(), topk.begin(), topk.end());
    }
    if (p.fp8) {
      in.x.resize(static_cast<size_t>(S * p.hidden));
      for (uint8_t& byte : in.x) {
        do {
          byte = static_cast<uint8_t>(rng());
        } while ((byte & 0x7f) == 0x7f);  // e4m3 NaN: moved verbatim anyway, but keep it real
      }
      in.x_scales.resize(static_cast<size_t>(S * p.scales_per_row()));
      std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
      for (float& s : in.x_scales) s = std::ldexp(mantissa(rng), int(uniform(rng, -6, 6)));
    } else {
      const std::vector<uint16_t> x = random_bf16_rows(rng, S * p.hidden);
      in.x.resize(x.size() * 2);
      if (!x.empty()) std::memcpy(in.x.data(), x.data(), in.x.size());
    }
    if (config.with_weights) {
      in.weights.resize(in.topk_idx.size());
      for (float& w : in.weights) w = nonzero_float(rng);
    }
    if (config.with_aux) {
      in.aux.resize(in.topk_idx.size());
      for (float& a : in.aux) a = nonzero_float(rng);
    }
  }
  return inputs;
}

std::vector<reference::CombineRankInputs> draw_combine_inputs(
    const RandomConfig& config, const std::vector<reference::RankInputs>& inputs,
    const std::vector<reference::DispatchOutput>& layout) {
  std::mt19937_64 rng = stream_for(config.seed, kCombine);
  const int64_t H = config.hidden, K = config.num_topk;
  std::vector<reference::CombineRankInputs> out(static_cast<size_t>(config.num_ranks));
  for (int32_t r = 0; r < config.num_ranks; ++r) {
    reference::CombineRankInputs& in = out[size_t(r)];
    const reference::DispatchOutput& got = layout[size_t(r)];
    const int64_t rows = config.expand ? got.num_rows : got.num_recv_tokens;
    in.x = random_bf16_rows(rng, rows * H);
    // Padding rows and non-local (n, k) slots get values too: they must never be read.
    if (config.expand && config.with_weights) {
      in.weights.resize(size_t(rows));
      for (float& w : in.weights) w = nonzero_float(rng);
    }
    if (config.with_scalars) {
      in.scalars.resize(size_t(config.expand ? rows : rows * K));
      for (float& s : in.scalars) s = nonzero_float(rng);
    }
    const int64_t S = inputs[size_t(r)].num_tokens;
    if (config.with_bias0) in.bias0 = random_bf16_rows(rng, S * H);
    if (config.with_bias1) in.bias1 = random_bf16_rows(rng, S * H);
  }
  return out;
}

std::vector<std::vector<uint16_t>> draw_grad_y(const RandomConfig& config,
                                               const std::vector<reference::RankInputs>& inputs) {
  std::mt19937_64 rng = stream_for(config.seed, kGradY);
  std::vector<std::vector<uint16_t>> grad_y;
  for (const reference::RankInputs& in : inputs) {
    grad_y.push_back(random_bf16_rows(rng, in.num_tokens * config.hidden));
  }
  return grad_y;
}

uint16_t random_bf16(std::mt19937_64& rng) {
  const uint64_t bits = rng();
  const uint32_t sign = uint32_t(bits & 1);
  const uint32_t exponent = 127 - 10 + uint32_t((bits >> 1) % 15);  // 2^-10 .. 2^4
  const uint32_t mantissa = uint32_t((bits >> 8) & 0x7f);
  return static_cast<uint16_t>((sign << 15) | (exponent << 7) | mantissa);
}

std::string first_mismatch(const void* got, const void* want, size_t elem_bytes, size_t count,
                           const char* what) {
  const auto* a = static_cast<const unsigned char*>(got);
  const auto* b = static_cast<const unsigned char*>(want);
  size_t differing = 0, first = 0;
  for (size_t i = 0; i < count; ++i) {
    if (std::memcmp(a + i * elem_bytes, b + i * elem_bytes, elem_bytes) == 0) continue;
    if (differing++ == 0) first = i;
  }
  if (differing == 0) return "";
  std::ostringstream out;
  out << what << ": element " << first << " got " << hex_of(a + first * elem_bytes, elem_bytes)
      << " want " << hex_of(b + first * elem_bytes, elem_bytes) << " (" << differing << " of "
      << count << " elements differ)";
  return out.str();
}

}  // namespace epx::testing
