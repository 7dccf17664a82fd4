#include "common/low_latency_scenario.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <sstream>
#include <unordered_map>

#include "epx/error.hpp"
#include "reference/reference.hpp"
#include "scenario.hpp"

namespace epx::testing {
namespace {

constexpr uint16_t kNanBf16 = 0x7fc1;

// Combine inputs are functions of the (source, token, k) id of their row, so that the same
// value sits wherever a transport put the row, and the reference sees it in its own order.
std::mt19937_64 rng_for(uint64_t seed, int32_t id) {
  return std::mt19937_64(seed * 0x9e3779b97f4a7c15ull + uint64_t(id) + 1);
}

// Rows of the ids in `ids` (NaN where the id is -1: past the counts, never to be read).
std::vector<uint16_t> rows_of_ids(const std::vector<int32_t>& ids, int64_t hidden, uint64_t seed) {
  std::vector<uint16_t> rows(ids.size() * size_t(hidden), kNanBf16);
  for (size_t r = 0; r < ids.size(); ++r) {
    if (ids[r] < 0) continue;
    std::mt19937_64 rng = rng_for(seed, ids[r]);
    for (int64_t h = 0; h < hidden; ++h) rows[r * size_t(hidden) + size_t(h)] = random_bf16(rng);
  }
  return rows;
}

std::vector<float> scalars_of_ids(const std::vector<int32_t>& ids, uint64_t seed) {
  std::vector<float> values(ids.size(), NAN);
  for (size_t r = 0; r < ids.size(); ++r) {
    if (ids[r] < 0) continue;
    std::mt19937_64 rng = rng_for(seed, ids[r]);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    values[r] = normal(rng);
  }
  return values;
}

// What one rank received in a round, as it came back from the device.
struct Received {
  std::vector<int32_t> counts;    // [E_l]
  std::vector<int32_t> src_info;  // [E_l * R * S_ll], the transport's order
  std::vector<uint8_t> x;
  std::vector<float> x_scales, weights, aux;
};

Received download_received(const DeviceOps& ops, const LowLatencyDispatchResult& got, int64_t rows,
                           int64_t row_bytes, int64_t scales, int32_t experts) {
  Received r;
  r.counts = download<int32_t>(ops, got.counts, experts);
  r.src_info = download<int32_t>(ops, got.src_info, rows);
  r.x = download<uint8_t>(ops, got.x, rows * row_bytes);
  if (got.x_scales.defined()) r.x_scales = download<float>(ops, got.x_scales, rows * scales);
  if (got.weights.defined()) r.weights = download<float>(ops, got.weights, rows);
  if (got.aux.defined()) r.aux = download<float>(ops, got.aux, rows);
  return r;
}

bool same_bits(const void* a, const void* b, size_t bytes) {
  return std::memcmp(a, b, bytes) == 0;
}

// Checks a received round against the reference: counts; each expert's rows sorted by src_info
// against the canonical rows; 0 / -1 past the counts.
std::string check_received(const Received& got, reference::LowLatencyDispatchOutput want,
                           const RandomConfig& config, int64_t row_bytes, int64_t scales) {
  const int32_t experts = config.num_experts / config.num_ranks;
  const int64_t expert_rows = int64_t(config.num_ranks) * config.max_tokens;
  // The reference has no channel that no rank's tokens carried: all of it is past the counts.
  if (config.with_weights && want.weights.empty()) want.weights.assign(got.src_info.size(), 0.0f);
  if (config.with_aux && want.aux.empty()) want.aux.assign(got.src_info.size(), 0.0f);
  std::ostringstream bad;
  if (got.counts != want.counts) {
    bad << "counts differ:";
    for (int32_t e = 0; e < experts; ++e) bad << " " << got.counts[e] << "/" << want.counts[e];
    bad << " (got/want per local expert)";
    return bad.str();
  }
  if (got.weights.empty() == config.with_weights || got.aux.empty() == config.with_aux) {
    return "weights/aux outputs present where they should not be (or missing)";
  }
  for (int32_t e = 0; e < experts; ++e) {
    const int64_t first = e * expert_rows, count = got.counts[e];
    std::vector<int64_t> order(static_cast<size_t>(count));
    std::iota(order.begin(), order.end(), first);
    std::sort(order.begin(), order.end(),
              [&](int64_t a, int64_t b) { return got.src_info[a] < got.src_info[b]; });
    for (int64_t i = 0; i < count; ++i) {
      const int64_t g = order[i], w = first + i;
      const char* what = nullptr;
      if (got.src_info[g] != want.src_info[w]) {
        what = "src_info";
      } else if (!same_bits(&got.x[g * row_bytes], &want.x[w * row_bytes], row_bytes)) {
        what = "x";
      } else if (scales &&
                 !same_bits(&got.x_scales[g * scales], &want.x_scales[w * scales], scales * 4)) {
        what = "x_scales";
      } else if (!got.weights.empty() && !same_bits(&got.weights[g], &want.weights[w], 4)) {
        what = "weights";
      } else if (!got.aux.empty() && !same_bits(&got.aux[g], &want.aux[w], 4)) {
        what = "aux";
      }
      if (what) {
        bad << what << " of local expert " << e << ", row " << (g - first) << " (src_info "
            << got.src_info[g] << ", the canonical row " << i << " has " << want.src_info[w] << ")";
        return bad.str();
      }
    }
    for (int64_t j = first + count; j < first + expert_rows; ++j) {
      const bool clean = got.src_info[j] == -1 &&
                         (got.weights.empty() || same_bits(&got.weights[j], &want.weights[j], 4)) &&
                         (got.aux.empty() || same_bits(&got.aux[j], &want.aux[j], 4));
      if (!clean) {
        bad << "row " << (j - first) << " of local expert " << e << ", past its " << count
            << " rows, is not cleared (src_info " << got.src_info[j] << ")";
        return bad.str();
      }
    }
  }
  return "";
}

// The id -> row map of one rank's canonical layout.
std::unordered_map<int32_t, int64_t> rows_by_id(const std::vector<int32_t>& src_info) {
  std::unordered_map<int32_t, int64_t> rows;
  for (size_t r = 0; r < src_info.size(); ++r) {
    if (src_info[r] >= 0) rows[src_info[r]] = int64_t(r);
  }
  return rows;
}

class Scenario {
 public:
  Scenario(Buffer& buffer, const LowLatencyCase& c, int rank, const DeviceOps& ops)
      : buffer_(buffer),
        c_(c),
        rank_(rank),
        ops_(ops),
        problem_(c.config.problem()),
        device_(buffer.device()),
        experts_(problem_.local_experts()),
        expert_rows_(int64_t(problem_.num_ranks) * problem_.max_tokens),
        rows_(experts_ * expert_rows_),
        options_{.return_hook = c.hook} {}

  std::string run() {
    const RandomConfig& config = c_.config;
    const int64_t hidden = config.hidden;
    const std::vector<reference::RankInputs> inputs = draw_low_latency_inputs(config);
    const auto want0 = reference::low_latency_dispatch(problem_, inputs);
    const int64_t tokens = inputs[rank_].num_tokens;

    // Round 0: routing dispatch, checked with its handle.
    RankTensors mine = upload_inputs(ops_, config, inputs[rank_], device_);
    before();
    LowLatencyDispatchResult got0 =
        buffer_.low_latency_dispatch(mine.inputs(true), options_, stream());
    finish();
    const Received r0 = download_received(ops_, got0, rows_, problem_.row_bytes(),
                                          problem_.scales_per_row(), experts_);
    std::string bad =
        check_received(r0, want0[rank_], config, problem_.row_bytes(), problem_.scales_per_row());
    if (!bad.empty()) return "dispatch: " + bad;
    bad = check_handle(got0.handle, inputs[rank_], r0.counts);
    if (!bad.empty()) return "dispatch handle: " + bad;

    // Combine 0: weighted when the case has weights.
    const bool weighted = config.with_weights;
    CombineData combine0 =
        combine_inputs(r0.src_info, 11, c_.zero_copy, weighted, config.with_scalars,
                       c_.zero_copy && weighted ? &got0.weights : nullptr);
    std::vector<reference::LowLatencyCombineRankInputs> want_in0(config.num_ranks);
    for (int32_t r = 0; r < config.num_ranks; ++r) {
      want_in0[r] =
          canonical_inputs(want0[r], 11, weighted, config.with_scalars, c_.zero_copy && weighted);
    }
    bad =
        combine_and_check(combine0, got0.handle,
                          reference::low_latency_combine(problem_, inputs, want0, want_in0)[rank_],
                          tokens, "combine 0");
    if (!bad.empty()) return bad;

    // Round 1: a cached dispatch of new rows must land where round 0's did.
    RandomConfig replay_config = config;
    replay_config.fp8 = config.fp8 && !c_.cached_bf16;
    const reference::Problem replay_problem = replay_config.problem();
    std::vector<reference::RankInputs> replay = inputs;
    std::mt19937_64 replay_rng(config.seed ^ 0x11ull);
    for (reference::RankInputs& in : replay) {
      if (!replay_config.fp8) {
        std::vector<uint16_t> rows(size_t(in.num_tokens * hidden));
        for (uint16_t& v : rows) v = random_bf16(replay_rng);
        in.x.resize(rows.size() * 2);
        if (!rows.empty()) std::memcpy(in.x.data(), rows.data(), in.x.size());
        in.x_scales.clear();
      } else {
        for (uint8_t& byte : in.x) byte = static_cast<uint8_t>(replay_rng() & 0x7e);
      }
      for (float& w : in.weights) w = std::ldexp(1.0f, int(replay_rng() % 9) - 4);
    }
    const auto want1 = reference::low_latency_dispatch(replay_problem, replay);
    RankTensors replay_mine = upload_inputs(ops_, replay_config, replay[rank_], device_);
    before();
    LowLatencyDispatchResult got1 =
        buffer_.low_latency_dispatch(replay_mine.inputs(false), got0.handle, options_, stream());
    finish();
    const Received r1 = download_received(ops_, got1, rows_, replay_problem.row_bytes(),
                                          replay_problem.scales_per_row(), experts_);
    bad = check_received(r1, want1[rank_], replay_config, replay_problem.row_bytes(),
                         replay_problem.scales_per_row());
    if (!bad.empty()) return "cached dispatch: " + bad;
    if (r1.src_info != r0.src_info) return "cached dispatch: rows are not where round 0 put them";
    const Received again = download_received(ops_, got0, rows_, problem_.row_bytes(),
                                             problem_.scales_per_row(), experts_);
    if (again.x != r0.x || again.src_info != r0.src_info || again.counts != r0.counts ||
        again.weights != r0.weights || again.x_scales != r0.x_scales) {
      return "round 0's views changed before round 1's combine (the validity rule)";
    }

    // Combine 1: unweighted, copied.
    CombineData combine1 =
        combine_inputs(r1.src_info, 12, false, false, config.with_scalars, nullptr);
    std::vector<reference::LowLatencyCombineRankInputs> want_in1(config.num_ranks);
    for (int32_t r = 0; r < config.num_ranks; ++r) {
      want_in1[r] = canonical_inputs(want1[r], 12, false, config.with_scalars, false);
    }
    bad = combine_and_check(
        combine1, got0.handle,
        reference::low_latency_combine(replay_problem, replay, want1, want_in1)[rank_], tokens,
        "combine 1");
    if (!bad.empty()) return bad;

    // Round 2: combine_backward of a weighted combine over round 0's rows.
    const auto grad_y = draw_grad_y(config, inputs);
    const std::vector<uint16_t> forward_x = rows_of_ids(r0.src_info, hidden, 13);
    const std::vector<float> forward_w = scalars_of_ids(r0.src_info, 14);
    DeviceData gy = upload_maybe_unaligned(ops_, grad_y[rank_], DType::kBFloat16, {tokens, hidden},
                                           device_, config.x_unaligned);
    DeviceData hx =
        upload(ops_, forward_x, DType::kBFloat16, {experts_, expert_rows_, hidden}, device_);
    DeviceData hw = upload(ops_, forward_w, DType::kFloat32, {experts_, expert_rows_}, device_);
    before();
    CombineBackwardResult back =
        buffer_.low_latency_combine_backward(gy.view, got0.handle, hx.view, hw.view, stream());
    buffer_.synchronize(stream());
    std::vector<reference::LowLatencyCombineRankInputs> want_back_in(config.num_ranks);
    for (int32_t r = 0; r < config.num_ranks; ++r) {
      want_back_in[r].x = rows_of_ids(want0[r].src_info, hidden, 13);
      want_back_in[r].weights = scalars_of_ids(want0[r].src_info, 14);
    }
    const auto want_back = reference::low_latency_combine_backward(problem_, inputs, want0, grad_y,
                                                                   want_back_in)[rank_];
    bad = check_backward(back, want_back, r0.src_info, want0[rank_].src_info);
    if (!bad.empty()) return "combine_backward: " + bad;

    // Combine 2: gradient rows with scalars back to the sources (a dispatch's backward).
    CombineData combine2 = combine_inputs(r0.src_info, 15, false, false, true, nullptr);
    std::vector<reference::LowLatencyCombineRankInputs> want_in2(config.num_ranks);
    for (int32_t r = 0; r < config.num_ranks; ++r) {
      want_in2[r] = canonical_inputs(want0[r], 15, false, true, false);
    }
    return combine_and_check(
        combine2, got0.handle,
        reference::low_latency_combine(problem_, inputs, want0, want_in2)[rank_], tokens,
        "combine 2");
  }

 private:
  struct CombineData {
    DeviceData x, weights, scalars;
    LowLatencyCombineInputs view;
  };

  void* stream() const { return ops_.stream; }
  void before() const {
    if (ops_.before_operation) ops_.before_operation();
  }
  // The wait of a hook, then the errors recorded on the device.
  void finish() {
    if (c_.hook) buffer_.low_latency_wait(stream());
    buffer_.synchronize(stream());
  }

  std::string check_handle(const LowLatencyHandle& handle, const reference::RankInputs& in,
                           const std::vector<int32_t>& counts) {
    const int64_t entries = in.num_tokens * problem_.num_topk;
    const auto topk = download<int32_t>(ops_, handle.topk_idx, entries);
    const auto slots = download<int32_t>(ops_, handle.slots, entries);
    for (int64_t i = 0; i < entries; ++i) {
      if (topk[i] != in.topk_idx[i]) return "topk_idx differs at entry " + std::to_string(i);
      const bool ok =
          in.topk_idx[i] < 0 ? slots[i] == -1 : slots[i] >= 0 && slots[i] < expert_rows_;
      if (!ok) return "slot " + std::to_string(slots[i]) + " of entry " + std::to_string(i);
    }
    if (download<int32_t>(ops_, handle.counts, experts_) != counts) return "counts differ";
    if (handle.num_tokens != in.num_tokens) return "num_tokens differs";
    return "";
  }

  // The expert side's inputs of a combine in the transport's layout (`src_info`): rows and
  // scalars by id (NaN past the counts); `weights_view` is the dispatch's own weights.
  CombineData combine_inputs(const std::vector<int32_t>& src_info, uint64_t seed, bool zero_copy,
                             bool weighted, bool with_scalars, const Tensor* weights_view) {
    const int64_t hidden = c_.config.hidden;
    const std::vector<uint16_t> rows = rows_of_ids(src_info, hidden, seed);
    CombineData data;
    if (zero_copy) {
      const Tensor input = buffer_.low_latency_combine_input();
      ops_.write(input.view.data, rows.data(), rows.size() * 2);
      data.view.x = input.view;
    } else {
      data.x =
          upload_maybe_unaligned(ops_, rows, DType::kBFloat16, {experts_, expert_rows_, hidden},
                                 device_, c_.config.x_unaligned);
      data.view.x = data.x.view;
    }
    if (weighted && weights_view) {
      data.view.weights = weights_view->view;
    } else if (weighted) {
      data.weights = upload(ops_, scalars_of_ids(src_info, seed + 100), DType::kFloat32,
                            {experts_, expert_rows_}, device_);
      data.view.weights = data.weights.view;
    }
    if (with_scalars) {
      data.scalars = upload(ops_, scalars_of_ids(src_info, seed + 200), DType::kFloat32,
                            {experts_, expert_rows_}, device_);
      data.view.scalars = data.scalars.view;
    }
    return data;
  }

  // The same inputs in the reference's canonical layout of `want`.
  reference::LowLatencyCombineRankInputs canonical_inputs(
      const reference::LowLatencyDispatchOutput& want, uint64_t seed, bool weighted,
      bool with_scalars, bool dispatched_weights) const {
    reference::LowLatencyCombineRankInputs in;
    in.x = rows_of_ids(want.src_info, c_.config.hidden, seed);
    if (weighted) {
      in.weights = dispatched_weights ? want.weights : scalars_of_ids(want.src_info, seed + 100);
    }
    if (with_scalars) in.scalars = scalars_of_ids(want.src_info, seed + 200);
    return in;
  }

  std::string combine_and_check(const CombineData& data, const LowLatencyHandle& handle,
                                const reference::CombineOutput& want, int64_t tokens,
                                const char* op) {
    before();
    LowLatencyCombineResult got =
        buffer_.low_latency_combine(data.view, handle, options_, stream());
    finish();
    const int64_t hidden = c_.config.hidden, topk = c_.config.num_topk;
    const auto y = download<uint16_t>(ops_, got.x, tokens * hidden);
    std::string bad = first_mismatch(y.data(), want.x.data(), 2, y.size(), "y");
    if (bad.empty() && data.view.scalars.defined()) {
      const auto scalars = download<float>(ops_, got.scalars, tokens * topk);
      bad = first_mismatch(scalars.data(), want.scalars.data(), 4, scalars.size(), "scalars");
    }
    return bad.empty() ? "" : std::string(op) + ": " + bad;
  }

  std::string check_backward(const CombineBackwardResult& back,
                             const reference::CombineBackwardOutput& want,
                             const std::vector<int32_t>& src_info,
                             const std::vector<int32_t>& canonical) {
    const int64_t hidden = c_.config.hidden;
    const auto grad_x = download<uint16_t>(ops_, back.grad_x, rows_ * hidden);
    const auto grad_w = download<float>(ops_, back.grad_weights, rows_);
    const auto canonical_row = rows_by_id(canonical);
    for (int64_t row = 0; row < rows_; ++row) {
      std::ostringstream bad;
      if (src_info[row] < 0) {
        const bool zero =
            std::all_of(grad_x.begin() + row * hidden, grad_x.begin() + (row + 1) * hidden,
                        [](uint16_t v) { return v == 0; }) &&
            same_bits(&grad_w[row], "\0\0\0\0", 4);
        if (zero) continue;
        bad << "row " << row << " past its expert's counts is not 0";
        return bad.str();
      }
      const int64_t w = canonical_row.at(src_info[row]);
      const std::string x_bad =
          first_mismatch(&grad_x[row * hidden], &want.grad_x[w * hidden], 2, hidden, "grad_x");
      if (!x_bad.empty()) {
        bad << "row " << row << " (src_info " << src_info[row] << "): " << x_bad;
        return bad.str();
      }
      if (!reference::grad_weight_ok(grad_w[row], want.grad_weights[w], want.magnitude[w])) {
        bad << "grad_weights row " << row << " got " << grad_w[row] << " want "
            << want.grad_weights[w] << " (tolerance 1e-5 * " << want.magnitude[w] << ")";
        return bad.str();
      }
    }
    return "";
  }

  Buffer& buffer_;
  const LowLatencyCase& c_;
  int rank_;
  const DeviceOps& ops_;
  reference::Problem problem_;
  Device device_;
  int32_t experts_;
  int64_t expert_rows_;
  int64_t rows_;
  LowLatencyOptions options_;
};

}  // namespace

std::string LowLatencyCase::describe() const {
  std::ostringstream out;
  out << config.describe() << " hook=" << hook << " zero_copy=" << zero_copy
      << " cached_bf16=" << cached_bf16;
  return out.str();
}

LowLatencyCase draw_low_latency_case(uint64_t seed, int32_t num_ranks) {
  LowLatencyCase c;
  c.config = draw_config(seed, num_ranks);
  c.config.saturate = false;
  std::mt19937_64 rng(seed ^ 0x4c4c4c4cull);
  c.hook = rng() % 3 == 0;
  c.zero_copy = rng() % 2 == 0;
  c.cached_bf16 = c.config.fp8 && rng() % 2 == 0;
  return c;
}

LowLatencyCase production_low_latency_case(uint64_t seed, int32_t num_ranks, int64_t tokens,
                                           int64_t hidden, bool fp8, int32_t experts) {
  LowLatencyCase c = draw_low_latency_case(seed, num_ranks);
  c.config.max_tokens = tokens;
  c.config.hidden = hidden;
  c.config.fp8 = fp8;
  c.config.num_experts = experts % num_ranks == 0 ? experts : 8 * num_ranks;
  c.config.num_topk = 8;
  c.cached_bf16 = fp8 && c.cached_bf16;
  return c;
}

BufferConfig low_latency_buffer_config(const LowLatencyCase& c, double timeout_seconds) {
  RandomConfig normal = c.config;
  normal.max_tokens = 1;
  BufferConfig config = buffer_config_for(normal, timeout_seconds);
  config.low_latency_max_tokens = c.config.max_tokens;
  return config;
}

std::vector<reference::RankInputs> draw_low_latency_inputs(const RandomConfig& config) {
  std::vector<reference::RankInputs> inputs = draw_dispatch_inputs(config);
  const int64_t capacity = int64_t(config.num_ranks) * config.max_tokens;
  std::vector<int64_t> rows(static_cast<size_t>(config.num_experts), 0);
  for (reference::RankInputs& in : inputs) {
    for (int64_t& e : in.topk_idx) {
      if (e >= 0 && rows[size_t(e)]++ >= capacity) e = -1;
    }
  }
  return inputs;
}

std::string run_low_latency_scenario(Buffer& buffer, const LowLatencyCase& c, int rank,
                                     const DeviceOps& ops) {
  std::string bad;
  try {
    bad = Scenario(buffer, c, rank, ops).run();
  } catch (const Error& error) {
    bad = std::string("threw: ") + error.what();
  }
  return bad.empty() ? bad : bad + "\n  case: " + c.describe();
}

}  // namespace epx::testing
