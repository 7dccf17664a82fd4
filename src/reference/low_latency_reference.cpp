// Plain loops straight from docs/semantics.md's low-latency section; they share only the
// numerics (plan/numerics.hpp) with the transports.
#include "reference/low_latency_reference.hpp"

#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "plan/numerics.hpp"

namespace epx::reference {
namespace {

size_t idx(int64_t value) {
  return static_cast<size_t>(value);
}

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("epx::reference (low latency): " + message);
}

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
