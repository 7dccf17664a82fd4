// Plain loops over all ranks' inputs, in the order docs/semantics.md states them. Speed does not
// matter here; every position is found by enumerating the layout's definition directly, so the
// code reads like the specification rather than like the routing plan the transports use.
#include "reference/reference.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "plan/numerics.hpp"

namespace epx::reference {
namespace {

using plan::accumulate;
using plan::accumulate_weighted;
using plan::bf16_bits_to_float;
using plan::float_to_bf16_bits;

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("epx::reference: " + message);
}

size_t idx(int64_t value) {
  return static_cast<size_t>(value);
}

int64_t expert_of(const Problem& p, const RankInputs& in, int64_t t, int32_t k) {
  return in.topk_idx[idx(t * p.num_topk + k)];
}

int32_t owner_of(const Problem& p, int64_t expert) {
  return static_cast<int32_t>(expert / p.local_experts());
}

bool goes_to(const Problem& p, const RankInputs& in, int64_t t, int32_t rank) {
  for (int32_t k = 0; k < p.num_topk; ++k) {
    const int64_t e = expert_of(p, in, t, k);
    if (e >= 0 && owner_of(p, e) == rank) return true;
  }
  return false;
}

// Optional per-rank channels are "given" when any rank gives them; a rank with zero entries
// cannot tell, so only non-empty ranks are held to the declared size.
template <typename T>
bool any_given(const std::vector<T>& items, std::vector<float> T::*channel) {
  for (const T& item : items) {
    if (!(item.*channel).empty()) return true;
  }
  return false;
}

void check_problem(const Problem& p, const std::vector<RankInputs>& inputs) {
  require(p.num_ranks > 0 && p.num_experts > 0 && p.num_experts % p.num_ranks == 0,
          "num_experts must be a positive multiple of num_ranks");
  require(p.num_topk > 0 && p.hidden > 0 && p.max_tokens >= 0, "bad sizes");
  require(!p.fp8 || p.hidden % 128 == 0, "fp8 needs hidden % 128 == 0");
  require(inputs.size() == idx(p.num_ranks), "need one RankInputs per rank");
  const bool weights = any_given(inputs, &RankInputs::weights);
  const bool aux = any_given(inputs, &RankInputs::aux);
  for (int32_t s = 0; s < p.num_ranks; ++s) {
    const RankInputs& in = inputs[idx(s)];
    const int64_t tokens = in.num_tokens;
    const std::string who = "rank " + std::to_string(s) + ": ";
    require(tokens >= 0 && tokens <= p.max_tokens, who + "num_tokens outside [0, max_tokens]");
    require(in.x.size() == idx(tokens * p.row_bytes()), who + "x has the wrong size");
    require(in.x_scales.size() == idx(tokens * p.scales_per_row()), who + "x_scales size");
    require(in.topk_idx.size() == idx(tokens * p.num_topk), who + "topk_idx has the wrong size");
    require(in.weights.size() == idx(weights ? tokens * p.num_topk : 0), who + "weights size");
    require(in.aux.size() == idx(aux ? tokens * p.num_topk : 0), who + "aux size");
    for (int64_t e : in.topk_idx) {
      require(e >= -1 && e < p.num_experts, who + "topk_idx value " + std::to_string(e));
    }
  }
}

// Row index of each compact row's (source, token), so combine can find where a token landed.
std::vector<int32_t> compact_row_of_token(const Problem& p, const DispatchOutput& out) {
  std::vector<int32_t> row(idx(p.num_ranks * p.max_tokens), -1);
  for (int64_t n = 0; n < out.num_recv_tokens; ++n) row[idx(out.src_token[idx(n)])] = int32_t(n);
  return row;
}

int32_t find_compact_row(const std::vector<int32_t>& rows, const Problem& p, int32_t s, int64_t t) {
  const int32_t n = rows[idx(s * p.max_tokens + t)];
  if (n < 0) throw std::logic_error("epx::reference: layout lacks a routed token");
  return n;
}

float bf16_at(const std::vector<uint16_t>& rows, int64_t row, int64_t hidden, int64_t h) {
  return bf16_bits_to_float(rows[idx(row * hidden + h)]);
}

// One term of a combine sum: a fused multiply-add with the row's weight, or a plain add.
void add_row(std::vector<float>& acc, const CombineRankInputs& in, int64_t row, bool weighted,
             int64_t hidden) {
  for (int64_t h = 0; h < hidden; ++h) {
    const float x = bf16_at(in.x, row, hidden, h);
    acc[idx(h)] = weighted ? accumulate_weighted(acc[idx(h)], in.weights[idx(row)], x)
                           : accumulate(acc[idx(h)], x);
  }
}

}  // namespace

std::vector<DispatchOutput> dispatch(const Problem& problem, const std::vector<RankInputs>& inputs,
                                     bool expand, int32_t expert_alignment, bool zero_padding) {
  (void)zero_padding;  // padding rows are always written as zeros here; see is_padding
  check_problem(problem, inputs);
  require(expert_alignment >= 1, "expert_alignment must be >= 1");
  const Problem& p = problem;
  const int32_t R = p.num_ranks, K = p.num_topk, E_l = p.local_experts();
  const int64_t row_bytes = p.row_bytes(), scales = p.scales_per_row();
  const bool has_weights = any_given(inputs, &RankInputs::weights);
  const bool has_aux = any_given(inputs, &RankInputs::aux);

  std::vector<DispatchOutput> outputs(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    DispatchOutput& out = outputs[idx(r)];

    // Compact order: source rank ascending, then source token ascending.
    struct Token {
      int32_t src;
      int64_t t;
    };
    std::vector<Token> compact;
    for (int32_t s = 0; s < R; ++s) {
      for (int64_t t = 0; t < inputs[idx(s)].num_tokens; ++t) {
        if (goes_to(p, inputs[idx(s)], t, r)) compact.push_back({s, t});
      }
    }

    // Expanded order: local expert, then source rank, token, k; each segment padded.
    struct Entry {
      int32_t src;
      int64_t t;
      int32_t k;
    };
    std::vector<Entry> expanded;                       // indexed by row; src < 0 marks padding
    std::vector<std::vector<int32_t>> row_of(idx(R));  // [s][t*K+k] -> expanded row
    for (int32_t s = 0; s < R; ++s) row_of[idx(s)].assign(inputs[idx(s)].topk_idx.size(), -1);
    out.tokens_per_expert.assign(idx(E_l), 0);
    out.expert_offsets.assign(idx(E_l + 1), 0);
    for (int32_t e = 0; e < E_l; ++e) {
      const int64_t global = int64_t(r) * E_l + e;
      out.expert_offsets[idx(e)] = int32_t(expanded.size());
      for (int32_t s = 0; s < R; ++s) {
        const RankInputs& in = inputs[idx(s)];
        for (int64_t t = 0; t < in.num_tokens; ++t) {
          for (int32_t k = 0; k < K; ++k) {
            if (expert_of(p, in, t, k) != global) continue;
            row_of[idx(s)][idx(t * K + k)] = int32_t(expanded.size());
            expanded.push_back({s, t, k});
            ++out.tokens_per_expert[idx(e)];
          }
        }
      }
      while (expanded.size() % idx(expert_alignment) != 0) expanded.push_back({-1, 0, 0});
    }
    out.expert_offsets[idx(E_l)] = int32_t(expanded.size());

    const int64_t N = int64_t(compact.size());
    out.num_recv_tokens = N;
    out.src_token.resize(idx(N));
    out.expanded_rows.resize(idx(N * K));
    for (int64_t n = 0; n < N; ++n) {
      const Token& tok = compact[idx(n)];
      out.src_token[idx(n)] = int32_t(tok.src * p.max_tokens + tok.t);
      for (int32_t k = 0; k < K; ++k) {
        out.expanded_rows[idx(n * K + k)] = row_of[idx(tok.src)][idx(tok.t * K + k)];
      }
    }

    const int64_t rows = expand ? int64_t(expanded.size()) : N;
    out.num_rows = rows;
    out.x.assign(idx(rows * row_bytes), 0);
    out.x_scales.assign(idx(rows * scales), 0.0f);
    out.is_padding.assign(idx(rows), 0);
    auto copy_row = [&](int64_t dst, int32_t s, int64_t t) {
      const RankInputs& in = inputs[idx(s)];
      std::memcpy(&out.x[idx(dst * row_bytes)], &in.x[idx(t * row_bytes)], idx(row_bytes));
      for (int64_t i = 0; i < scales; ++i) {
        out.x_scales[idx(dst * scales + i)] = in.x_scales[idx(t * scales + i)];
      }
    };

    if (!expand) {
      out.topk_idx.assign(idx(N * K), -1);
      if (has_weights) out.weights.assign(idx(N * K), 0.0f);
      if (has_aux) out.aux.assign(idx(N * K), 0.0f);
      for (int64_t n = 0; n < N; ++n) {
        const Token& tok = compact[idx(n)];
        const RankInputs& in = inputs[idx(tok.src)];
        copy_row(n, tok.src, tok.t);
        for (int32_t k = 0; k < K; ++k) {
          const int64_t e = expert_of(p, in, tok.t, k);
          if (e < 0 || owner_of(p, e) != r) continue;
          const size_t at = idx(n * K + k), from = idx(tok.t * K + k);
          out.topk_idx[at] = int32_t(e % E_l);
          if (has_weights) out.weights[at] = in.weights[from];
          if (has_aux) out.aux[at] = in.aux[from];
        }
      }
    } else {
      if (has_weights) out.weights.assign(idx(rows), 0.0f);
      if (has_aux) out.aux.assign(idx(rows), 0.0f);
      for (int64_t row = 0; row < rows; ++row) {
        const Entry& entry = expanded[idx(row)];
        if (entry.src < 0) {
          out.is_padding[idx(row)] = 1;
          continue;
        }
        const RankInputs& in = inputs[idx(entry.src)];
        copy_row(row, entry.src, entry.t);
        const size_t from = idx(entry.t * K + entry.k);
        if (has_weights) out.weights[idx(row)] = in.weights[from];
        if (has_aux) out.aux[idx(row)] = in.aux[from];
      }
    }
  }
  return outputs;
}

std::vector<CombineOutput> combine(const Problem& problem, const std::vector<RankInputs>& routing,
                                   const std::vector<DispatchOutput>& layout, bool expand,
                                   const std::vector<CombineRankInputs>& inputs,
                                   bool reduce_at_source) {
  check_problem(problem, routing);
  const Problem& p = problem;
  const int32_t R = p.num_ranks, K = p.num_topk;
  const int64_t H = p.hidden;
  require(layout.size() == idx(R) && inputs.size() == idx(R), "need one entry per rank");
  const bool has_weights = any_given(inputs, &CombineRankInputs::weights);
  const bool has_scalars = any_given(inputs, &CombineRankInputs::scalars);
  require(expand || !has_weights, "weights must be empty for a compact combine");
  const bool at_source = expand && reduce_at_source;

  std::vector<std::vector<int32_t>> compact_row(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    const DispatchOutput& out = layout[idx(r)];
    const CombineRankInputs& in = inputs[idx(r)];
    const int64_t rows = expand ? out.num_rows : out.num_recv_tokens;
    const std::string who = "rank " + std::to_string(r) + ": ";
    require(in.x.size() == idx(rows * H), who + "combine x has the wrong size");
    require(in.weights.size() == idx(has_weights ? rows : 0), who + "combine weights size");
    require(in.scalars.size() == idx(has_scalars ? (expand ? rows : rows * K) : 0),
            who + "combine scalars size");
    compact_row[idx(r)] = compact_row_of_token(p, out);
  }

  // The expanded row on rank r of (source s, token t, k); r must own topk_idx[t][k].
  auto expanded_row = [&](int32_t r, int32_t s, int64_t t, int32_t k) {
    const int32_t n = find_compact_row(compact_row[idx(r)], p, s, t);
    const int32_t row = layout[idx(r)].expanded_rows[idx(int64_t(n) * K + k)];
    if (row < 0) throw std::logic_error("epx::reference: layout lacks a routed (token, k)");
    return int64_t(row);
  };

  std::vector<CombineOutput> outputs(idx(R));
  for (int32_t s = 0; s < R; ++s) {
    const RankInputs& src = routing[idx(s)];
    const CombineRankInputs& own = inputs[idx(s)];
    const int64_t S = src.num_tokens;
    require(own.bias0.size() == 0 || own.bias0.size() == idx(S * H), "bias0 size");
    require(own.bias1.size() == 0 || own.bias1.size() == idx(S * H), "bias1 size");
    CombineOutput& result = outputs[idx(s)];
    result.x.assign(idx(S * H), 0);
    if (has_scalars) result.scalars.assign(idx(S * K), 0.0f);

    for (int64_t t = 0; t < S; ++t) {
      std::vector<float> acc(idx(H), 0.0f);
      if (at_source) {
        // Every expanded row travels; one rounding at the end.
        for (int32_t k = 0; k < K; ++k) {
          const int64_t e = expert_of(p, src, t, k);
          if (e < 0) continue;
          const int32_t r = owner_of(p, e);
          const int64_t row = expanded_row(r, s, t, k);
          add_row(acc, inputs[idx(r)], row, has_weights, H);
        }
      } else {
        // Each destination rank reduces its part and rounds once; the source adds those rows.
        for (int32_t r = 0; r < R; ++r) {
          if (!goes_to(p, src, t, r)) continue;
          const CombineRankInputs& expert = inputs[idx(r)];
          std::vector<uint16_t> partial(idx(H));
          if (expand) {
            std::vector<float> sum(idx(H), 0.0f);
            for (int32_t k = 0; k < K; ++k) {
              const int64_t e = expert_of(p, src, t, k);
              if (e < 0 || owner_of(p, e) != r) continue;
              add_row(sum, expert, expanded_row(r, s, t, k), has_weights, H);
            }
            for (int64_t h = 0; h < H; ++h) partial[idx(h)] = float_to_bf16_bits(sum[idx(h)]);
          } else {
            const int64_t n = find_compact_row(compact_row[idx(r)], p, s, t);
            for (int64_t h = 0; h < H; ++h) partial[idx(h)] = expert.x[idx(n * H + h)];
          }
          for (int64_t h = 0; h < H; ++h) {
            acc[idx(h)] = accumulate(acc[idx(h)], bf16_bits_to_float(partial[idx(h)]));
          }
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float value = acc[idx(h)];
        if (!own.bias0.empty()) value = accumulate(value, bf16_at(own.bias0, t, H, h));
        if (!own.bias1.empty()) value = accumulate(value, bf16_at(own.bias1, t, H, h));
        result.x[idx(t * H + h)] = float_to_bf16_bits(value);
      }

      if (!has_scalars) continue;
      for (int32_t k = 0; k < K; ++k) {
        const int64_t e = expert_of(p, src, t, k);
        if (e < 0) continue;  // stays 0
        const int32_t r = owner_of(p, e);
        const std::vector<float>& scalars = inputs[idx(r)].scalars;
        const int32_t n = find_compact_row(compact_row[idx(r)], p, s, t);
        result.scalars[idx(t * K + k)] =
            expand ? scalars[idx(expanded_row(r, s, t, k))] : scalars[idx(int64_t(n) * K + k)];
      }
    }
  }
  return outputs;
}

std::vector<CombineBackwardOutput> combine_backward(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<DispatchOutput>& layout, const std::vector<std::vector<uint16_t>>& grad_y,
    const std::vector<std::vector<uint16_t>>& x, const std::vector<std::vector<float>>& weights) {
  check_problem(problem, routing);
  const Problem& p = problem;
  const int32_t R = p.num_ranks, K = p.num_topk;
  const int64_t H = p.hidden;
  require(layout.size() == idx(R) && grad_y.size() == idx(R) && x.size() == idx(R) &&
              weights.size() == idx(R),
          "need one entry per rank");
  for (int32_t s = 0; s < R; ++s) {
    require(grad_y[idx(s)].size() == idx(routing[idx(s)].num_tokens * H), "grad_y size");
  }

  std::vector<CombineBackwardOutput> outputs(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    const DispatchOutput& out = layout[idx(r)];
    const int64_t M = out.num_rows;
    require(x[idx(r)].size() == idx(M * H), "combine_backward x size");
    // An unweighted forward has w = 1, whose gradient rows are grad_y exactly.
    require(weights[idx(r)].empty() || weights[idx(r)].size() == idx(M), "weights size");
    CombineBackwardOutput& result = outputs[idx(r)];
    result.grad_x.assign(idx(M * H), 0);
    result.grad_weights.assign(idx(M), 0.0);
    result.magnitude.assign(idx(M), 0.0);
    const std::vector<int32_t> compact_row = compact_row_of_token(p, out);

    // Walk the sources' tokens (not the layout's rows) so a row the layout forgot stays 0.
    for (int32_t s = 0; s < R; ++s) {
      const RankInputs& src = routing[idx(s)];
      for (int64_t t = 0; t < src.num_tokens; ++t) {
        for (int32_t k = 0; k < K; ++k) {
          const int64_t e = expert_of(p, src, t, k);
          if (e < 0 || owner_of(p, e) != r) continue;
          const int32_t n = find_compact_row(compact_row, p, s, t);
          const int64_t row = out.expanded_rows[idx(int64_t(n) * K + k)];
          if (row < 0) throw std::logic_error("epx::reference: layout lacks a routed (t, k)");
          const float w = weights[idx(r)].empty() ? 1.0f : weights[idx(r)][idx(row)];
          double dot = 0.0, magnitude = 0.0;
          for (int64_t h = 0; h < H; ++h) {
            const float g = bf16_at(grad_y[idx(s)], t, H, h);
            const float v = bf16_at(x[idx(r)], row, H, h);
            result.grad_x[idx(row * H + h)] = plan::scaled_gradient_bits(w, g);
            dot += double(g) * double(v);
            magnitude += std::fabs(double(g)) * std::fabs(double(v));
          }
          result.grad_weights[idx(row)] = dot;
          result.magnitude[idx(row)] = magnitude;
        }
      }
    }
  }
  return outputs;
}

}  // namespace epx::reference

// Plain loops straight from docs/semantics.md's low-latency section; they share only the
// numerics (plan/numerics.hpp) with the transports.
namespace epx::reference {
namespace {

int32_t source_id(const Problem& p, int32_t source, int64_t token, int32_t k) {
  return static_cast<int32_t>((source * p.max_tokens + token) * p.num_topk + k);
}

bool any_weights(const std::vector<LowLatencyCombineRankInputs>& inputs) {
  for (const auto& in : inputs) {
    if (!in.weights.empty()) return true;
  }
  return false;
}

}  // namespace

std::vector<LowLatencyDispatchOutput> low_latency_dispatch(const Problem& problem,
                                                           const std::vector<RankInputs>& inputs) {
  const Problem& p = problem;
  require(inputs.size() == idx(p.num_ranks), "need one RankInputs per rank");
  const int32_t R = p.num_ranks, K = p.num_topk, E_l = p.local_experts();
  const int64_t capacity = R * p.max_tokens, row_bytes = p.row_bytes();
  const int64_t scales = p.scales_per_row();
  bool weights = false, aux = false;
  for (const RankInputs& in : inputs) {
    require(in.num_tokens <= p.max_tokens, "a rank has more tokens than S_ll");
    weights = weights || !in.weights.empty();
    aux = aux || !in.aux.empty();
  }
  std::vector<LowLatencyDispatchOutput> outputs(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    LowLatencyDispatchOutput& out = outputs[idx(r)];
    const int64_t rows = E_l * capacity;
    out.counts.assign(idx(E_l), 0);
    out.x.assign(idx(rows * row_bytes), 0);
    out.x_scales.assign(idx(rows * scales), 0.0f);
    if (weights) out.weights.assign(idx(rows), 0.0f);
    if (aux) out.aux.assign(idx(rows), 0.0f);
    out.src_info.assign(idx(rows), -1);
    for (int32_t e = 0; e < E_l; ++e) {
      const int64_t expert = int64_t(r) * E_l + e;
      int64_t next = 0;  // the canonical order: source, token, k
      for (int32_t s = 0; s < R; ++s) {
        const RankInputs& in = inputs[idx(s)];
        for (int64_t t = 0; t < in.num_tokens; ++t) {
          for (int32_t k = 0; k < K; ++k) {
            const size_t from = idx(t * K + k);
            if (in.topk_idx[from] != expert) continue;
            require(next < capacity,
                    "expert " + std::to_string(expert) + " receives more than R * S_ll rows");
            const int64_t row = e * capacity + next++;
            std::memcpy(&out.x[idx(row * row_bytes)], &in.x[idx(t * row_bytes)], idx(row_bytes));
            for (int64_t i = 0; i < scales; ++i) {
              out.x_scales[idx(row * scales + i)] = in.x_scales[idx(t * scales + i)];
            }
            if (weights) out.weights[idx(row)] = in.weights[from];
            if (aux) out.aux[idx(row)] = in.aux[from];
            out.src_info[idx(row)] = source_id(p, s, t, k);
          }
        }
      }
      out.counts[idx(e)] = static_cast<int32_t>(next);
    }
  }
  return outputs;
}

std::vector<CombineOutput> low_latency_combine(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<LowLatencyDispatchOutput>& layout,
    const std::vector<LowLatencyCombineRankInputs>& inputs) {
  const Problem& p = problem;
  const int32_t R = p.num_ranks, K = p.num_topk, E_l = p.local_experts();
  const int64_t H = p.hidden;
  require(layout.size() == idx(R) && inputs.size() == idx(R), "need one entry per rank");
  const bool weighted = any_weights(inputs);
  bool with_scalars = false;
  for (const auto& in : inputs) with_scalars = with_scalars || !in.scalars.empty();
  // The row of every source id on every rank.
  std::vector<std::unordered_map<int32_t, int64_t>> row_of(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    const std::vector<int32_t>& info = layout[idx(r)].src_info;
    for (size_t row = 0; row < info.size(); ++row) {
      if (info[row] >= 0) row_of[idx(r)][info[row]] = int64_t(row);
    }
  }
  std::vector<CombineOutput> outputs(idx(R));
  for (int32_t s = 0; s < R; ++s) {
    const RankInputs& src = routing[idx(s)];
    CombineOutput& out = outputs[idx(s)];
    out.x.assign(idx(src.num_tokens * H), 0);
    if (with_scalars) out.scalars.assign(idx(src.num_tokens * K), 0.0f);
    std::vector<float> acc(idx(H));
    for (int64_t t = 0; t < src.num_tokens; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int32_t k = 0; k < K; ++k) {
        const int64_t expert = src.topk_idx[idx(t * K + k)];
        if (expert < 0) continue;
        const int32_t owner = static_cast<int32_t>(expert / E_l);
        const LowLatencyCombineRankInputs& in = inputs[idx(owner)];
        const int64_t row = row_of[idx(owner)].at(source_id(p, s, t, k));
        for (int64_t h = 0; h < H; ++h) {
          const float x = plan::bf16_bits_to_float(in.x[idx(row * H + h)]);
          acc[idx(h)] = weighted ? plan::accumulate_weighted(acc[idx(h)], in.weights[idx(row)], x)
                                 : plan::accumulate(acc[idx(h)], x);
        }
        if (with_scalars) out.scalars[idx(t * K + k)] = in.scalars[idx(row)];
      }
      for (int64_t h = 0; h < H; ++h) out.x[idx(t * H + h)] = plan::float_to_bf16_bits(acc[idx(h)]);
    }
  }
  return outputs;
}

std::vector<CombineBackwardOutput> low_latency_combine_backward(
    const Problem& problem, const std::vector<RankInputs>& routing,
    const std::vector<LowLatencyDispatchOutput>& layout,
    const std::vector<std::vector<uint16_t>>& grad_y,
    const std::vector<LowLatencyCombineRankInputs>& inputs) {
  const Problem& p = problem;
  const int32_t R = p.num_ranks, K = p.num_topk;
  const int64_t H = p.hidden;
  require(layout.size() == idx(R) && inputs.size() == idx(R) && grad_y.size() == idx(R),
          "need one entry per rank");
  for (int32_t s = 0; s < R; ++s) {
    require(grad_y[idx(s)].size() == idx(routing[idx(s)].num_tokens * H), "grad_y size");
  }
  std::vector<CombineBackwardOutput> outputs(idx(R));
  for (int32_t r = 0; r < R; ++r) {
    const std::vector<int32_t>& info = layout[idx(r)].src_info;
    const LowLatencyCombineRankInputs& in = inputs[idx(r)];
    CombineBackwardOutput& out = outputs[idx(r)];
    out.grad_x.assign(idx(int64_t(info.size()) * H), 0);
    out.grad_weights.assign(info.size(), 0.0);
    out.magnitude.assign(info.size(), 0.0);
    for (size_t row = 0; row < info.size(); ++row) {
      if (info[row] < 0) continue;
      const int64_t id = info[row];
      const int32_t s = static_cast<int32_t>(id / K / p.max_tokens);
      const int64_t t = id / K % p.max_tokens;
      const float w = in.weights[row];
      double dot = 0.0, magnitude = 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const float g = plan::bf16_bits_to_float(grad_y[idx(s)][idx(t * H + h)]);
        const float v = plan::bf16_bits_to_float(in.x[row * idx(H) + idx(h)]);
        out.grad_x[row * idx(H) + idx(h)] = plan::scaled_gradient_bits(w, g);
        dot += double(g) * double(v);
        magnitude += std::fabs(double(g)) * std::fabs(double(v));
      }
      out.grad_weights[row] = dot;
      out.magnitude[row] = magnitude;
    }
  }
  return outputs;
}

}  // namespace epx::reference
