#include "common/scenario.hpp"

#include <chrono>
#include <cstring>
#include <random>
#include <sstream>

#include "epx/error.hpp"
#include "reference/reference.hpp"
#include "scenario.hpp"

namespace epx::testing {
namespace {

using Clock = std::chrono::steady_clock;

double elapsed_ms(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

// Checks one rank's dispatch result (and its handle) against the reference.
std::string check_dispatch(const DeviceOps& ops, const RandomConfig& config,
                           const DispatchResult& got, const reference::DispatchOutput& want,
                           const char* op) {
  const reference::Problem problem = config.problem();
  const Handle& handle = got.handle;
  const int64_t k = problem.num_topk;
  int64_t num_recv = handle.num_recv_tokens, num_rows = handle.num_rows;
  if (!handle.counts_synced) {
    const auto counts = download<int64_t>(ops, handle.device_counts, 2);
    num_recv = counts[0];
    num_rows = counts[1];
  }
  std::ostringstream where;
  where << op << ": ";
  if (num_recv != want.num_recv_tokens || num_rows != want.num_rows) {
    where << "N/M are " << num_recv << "/" << num_rows << ", want " << want.num_recv_tokens << "/"
          << want.num_rows;
    return where.str();
  }
  const int64_t rows = want.num_rows;
  const bool expand = config.expand;
  // Unsynced outputs are sized before the counts are known; they must still hold every row.
  if (got.x.size(0) < rows || handle.row_capacity < rows) {
    where << "outputs have " << got.x.size(0) << " rows (handle capacity " << handle.row_capacity
          << "), the layout needs " << rows;
    return where.str();
  }
  const std::vector<uint8_t>* skip = expand && !config.zero_padding ? &want.is_padding : nullptr;
  std::string bad;
  auto note = [&](std::string message) {
    if (bad.empty() && !message.empty()) bad = where.str() + message;
  };
  note(compare_rows(download<uint8_t>(ops, got.x, rows * problem.row_bytes()), want.x, rows,
                    problem.row_bytes(), skip, "x"));
  if (problem.fp8) {
    note(compare_rows(download<float>(ops, got.x_scales, rows * problem.scales_per_row()),
                      want.x_scales, rows, problem.scales_per_row(), skip, "x_scales"));
  }
  const int64_t scalar_elems = expand ? 1 : k;
  if (!want.weights.empty()) {
    note(compare_rows(download<float>(ops, got.weights, rows * scalar_elems), want.weights, rows,
                      scalar_elems, nullptr, "weights"));
  }
  if (!want.aux.empty()) {
    note(compare_rows(download<float>(ops, got.aux, rows * scalar_elems), want.aux, rows,
                      scalar_elems, nullptr, "aux"));
  }
  if (!expand) {
    note(compare_rows(download<int32_t>(ops, got.topk_idx, rows * k), want.topk_idx, rows, k,
                      nullptr, "topk_idx"));
  }
  const int64_t n = want.num_recv_tokens;
  note(compare_rows(download<int32_t>(ops, handle.src_token, n), want.src_token, n, 1, nullptr,
                    "handle.src_token"));
  note(compare_rows(download<int32_t>(ops, handle.expanded_rows, n * k), want.expanded_rows, n, k,
                    nullptr, "handle.expanded_rows"));
  const int64_t local = problem.local_experts();
  note(compare_rows(download<int32_t>(ops, handle.tokens_per_expert, local), want.tokens_per_expert,
                    local, 1, nullptr, "handle.tokens_per_expert"));
  note(compare_rows(download<int32_t>(ops, handle.expert_offsets, local + 1), want.expert_offsets,
                    local + 1, 1, nullptr, "handle.expert_offsets"));
  if (handle.counts_synced) {
    std::vector<int32_t> host(handle.host_tokens_per_expert.begin(),
                              handle.host_tokens_per_expert.end());
    note(compare_rows(host, want.tokens_per_expert, local, 1, nullptr,
                      "handle.host_tokens_per_expert"));
  }
  return bad;
}

// Expert-side rows of a combine input for this rank, padded with random rows up to the
// handle's capacity (they must not influence anything).
template <typename T>
std::vector<T> pad_rows(std::vector<T> rows, int64_t row_elems, int64_t capacity,
                        std::mt19937_64& rng) {
  const size_t want = static_cast<size_t>(capacity * row_elems);
  while (rows.size() < want) rows.push_back(static_cast<T>(rng() & 0x3f7f));
  return rows;
}

}  // namespace

BufferConfig buffer_config_for(const RandomConfig& config, double timeout_seconds) {
  BufferConfig buffer;
  buffer.max_tokens_per_rank = config.max_tokens;
  buffer.hidden = config.hidden;
  buffer.num_experts = config.num_experts;
  buffer.num_topk = config.num_topk;
  buffer.fp8_dispatch = config.fp8;
  buffer.timeout_seconds = timeout_seconds;
  return buffer;
}

DeviceOps host_device_ops() {
  DeviceOps ops;
  ops.upload = [](const void* host, size_t bytes) {
    std::shared_ptr<void> memory(new unsigned char[bytes > 0 ? bytes : 1],
                                 [](void* p) { delete[] static_cast<unsigned char*>(p); });
    if (bytes) std::memcpy(memory.get(), host, bytes);
    return memory;
  };
  ops.download = [](void* host, const void* device, size_t bytes) {
    std::memcpy(host, device, bytes);
  };
  ops.write = [](void* device, const void* host, size_t bytes) {
    std::memcpy(device, host, bytes);
  };
  return ops;
}

Tensor PoisonAllocator::allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                                 void* stream) {
  Tensor tensor = inner_->allocate(dtype, shape, device, stream);
  if (tensor.view.nbytes() > 0) fill_(tensor.view.data, tensor.view.nbytes(), stream);
  return tensor;
}

namespace {

std::string run_scenario_steps(Buffer& buffer, const RandomConfig& config, int rank,
                               const DeviceOps& ops, PhaseTimes* times) {
  const reference::Problem problem = config.problem();
  const Device device = buffer.device();
  const auto describe = [&](const std::string& message) {
    return message.empty() ? message : message + "\n  config: " + config.describe();
  };

  // 1. Routing dispatch.
  const std::vector<reference::RankInputs> inputs = draw_dispatch_inputs(config);
  const auto want = reference::dispatch(problem, inputs, config.expand, config.expert_alignment,
                                        config.zero_padding);
  RankTensors mine = upload_inputs(ops, config, inputs[rank], device);
  DispatchOptions options;
  options.expand = config.expand;
  options.expert_alignment = config.expert_alignment;
  options.zero_padding = config.zero_padding;
  options.sync_counts = config.sync_counts;
  if (ops.before_operation) ops.before_operation();
  auto start = Clock::now();
  DispatchResult got = buffer.dispatch(mine.inputs(true), options, ops.stream);
  buffer.synchronize(ops.stream);
  if (times) times->dispatch_ms = elapsed_ms(start);
  std::string bad = check_dispatch(ops, config, got, want[rank], "dispatch");
  if (!bad.empty()) return describe(bad);
  const Handle handle = got.handle;

  // 2. Cached replay with fresh values (same routing): must land row for row.
  std::vector<reference::RankInputs> replay = inputs;
  std::mt19937_64 replay_rng(config.seed ^ 0x5eed5eedull);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (reference::RankInputs& in : replay) {
    if (problem.fp8) {
      for (uint8_t& byte : in.x) byte = static_cast<uint8_t>(replay_rng());
    } else {
      for (size_t i = 0; i + 1 < in.x.size(); i += 2) {
        const uint16_t bits = random_bf16(replay_rng);
        std::memcpy(&in.x[i], &bits, 2);
      }
    }
    for (float& w : in.weights) w = normal(replay_rng);
    for (float& a : in.aux) a = normal(replay_rng);
  }
  const auto want_replay = reference::dispatch(problem, replay, config.expand,
                                               config.expert_alignment, config.zero_padding);
  RankTensors replay_mine = upload_inputs(ops, config, replay[rank], device);
  if (ops.before_operation) ops.before_operation();
  start = Clock::now();
  DispatchResult got_replay = buffer.dispatch(replay_mine.inputs(false), handle, ops.stream);
  buffer.synchronize(ops.stream);
  if (times) times->cached_ms = elapsed_ms(start);
  bad = check_dispatch(ops, config, got_replay, want_replay[rank], "cached dispatch");
  if (!bad.empty()) return describe(bad);

  // 3. Combine.
  const auto combine_inputs = draw_combine_inputs(config, inputs, want);
  const auto want_combine = reference::combine(problem, inputs, want, config.expand, combine_inputs,
                                               config.reduce_at_source);
  const reference::CombineRankInputs& cin = combine_inputs[rank];
  std::mt19937_64 rng(config.seed * 31 + rank);
  const int64_t capacity = config.expand ? handle.row_capacity : handle.recv_token_capacity;
  const int64_t k = problem.num_topk;
  const int64_t hidden = problem.hidden;
  const int64_t tokens = inputs[rank].num_tokens;
  DeviceData cx =
      upload_maybe_unaligned(ops, pad_rows(cin.x, hidden, capacity, rng), DType::kBFloat16,
                             {capacity, hidden}, device, config.x_unaligned);
  CombineInputs combine_in;
  combine_in.x = cx.view;
  DeviceData cw, cs, b0, b1;
  if (config.expand && config.with_weights) {
    cw = upload(ops, pad_rows(cin.weights, 1, capacity, rng), DType::kFloat32, {capacity}, device);
    combine_in.weights = cw.view;
  }
  if (config.with_scalars) {
    const int64_t elems = config.expand ? 1 : k;
    std::vector<int64_t> shape =
        config.expand ? std::vector<int64_t>{capacity} : std::vector<int64_t>{capacity, k};
    cs = upload(ops, pad_rows(cin.scalars, elems, capacity, rng), DType::kFloat32, shape, device);
    combine_in.scalars = cs.view;
  }
  if (config.with_bias0) {
    b0 = upload(ops, cin.bias0, DType::kBFloat16, {tokens, hidden}, device);
    combine_in.bias0 = b0.view;
  }
  if (config.with_bias1) {
    b1 = upload_maybe_unaligned(ops, cin.bias1, DType::kBFloat16, {tokens, hidden}, device,
                                config.x_unaligned);
    combine_in.bias1 = b1.view;
  }
  CombineOptions combine_options;
  combine_options.reduce_at = config.reduce_at_source ? ReduceAt::kSource : ReduceAt::kExpert;
  if (ops.before_operation) ops.before_operation();
  start = Clock::now();
  CombineResult combined = buffer.combine(combine_in, handle, combine_options, ops.stream);
  buffer.synchronize(ops.stream);
  if (times) times->combine_ms = elapsed_ms(start);
  bad = compare_rows(download<uint16_t>(ops, combined.x, tokens * hidden), want_combine[rank].x,
                     tokens, hidden, nullptr, "combine: y");
  if (bad.empty() && config.with_scalars) {
    // The reference leaves scalars empty when no rank holds a row (every expert masked);
    // the picked value of a masked (t, k) is 0.
    std::vector<float> want_scalars = want_combine[rank].scalars;
    want_scalars.resize(static_cast<size_t>(tokens * k), 0.0f);
    bad = compare_rows(download<float>(ops, combined.scalars, tokens * k), want_scalars, tokens, k,
                       nullptr, "combine: scalars");
  }
  if (!bad.empty()) return describe(bad);

  // 4. Fused combine_backward (expanded layouts), with the combine's rows as x.
  if (!config.expand) return "";
  std::vector<std::vector<float>> weights(config.num_ranks);
  std::vector<std::vector<uint16_t>> expert_x(config.num_ranks);
  for (int32_t r = 0; r < config.num_ranks; ++r) {
    expert_x[r] = combine_inputs[r].x;
    weights[r] = combine_inputs[r].weights;
    if (!(config.expand && config.with_weights)) {
      std::mt19937_64 wrng(config.seed * 7 + r);
      std::normal_distribution<float> normal(0.0f, 1.0f);
      weights[r].resize(static_cast<size_t>(want[r].num_rows));
      for (float& w : weights[r]) w = normal(wrng);
    }
  }
  const auto grad_y = draw_grad_y(config, inputs);
  const auto want_backward =
      reference::combine_backward(problem, inputs, want, grad_y, expert_x, weights);
  DeviceData gy = upload_maybe_unaligned(ops, grad_y[rank], DType::kBFloat16, {tokens, hidden},
                                         device, config.x_unaligned);
  DeviceData bw =
      upload(ops, pad_rows(weights[rank], 1, capacity, rng), DType::kFloat32, {capacity}, device);
  if (ops.before_operation) ops.before_operation();
  start = Clock::now();
  CombineBackwardResult backward =
      buffer.combine_backward(gy.view, handle, cx.view, bw.view, ops.stream);
  buffer.synchronize(ops.stream);
  if (times) times->backward_ms = elapsed_ms(start);
  const int64_t rows = want[rank].num_rows;
  bad = compare_rows(download<uint16_t>(ops, backward.grad_x, rows * hidden),
                     want_backward[rank].grad_x, rows, hidden, nullptr, "combine_backward: grad_x");
  if (!bad.empty()) return describe(bad);
  const auto grad_w = download<float>(ops, backward.grad_weights, rows);
  for (int64_t row = 0; row < rows; ++row) {
    const double expected = want_backward[rank].grad_weights[row];
    if (!reference::grad_weight_ok(grad_w[row], expected, want_backward[rank].magnitude[row])) {
      std::ostringstream message;
      message << "combine_backward: grad_weights row " << row << " got " << grad_w[row] << " want "
              << expected << " (tolerance 1e-5 * " << want_backward[rank].magnitude[row] << ")";
      return describe(message.str());
    }
  }
  return "";
}

}  // namespace

std::string run_scenario(Buffer& buffer, const RandomConfig& config, int rank, const DeviceOps& ops,
                         PhaseTimes* times) {
  // An error raised by an operation (a timeout, say) names the configuration too, so that a
  // failing run can be replayed from its message.
  try {
    return run_scenario_steps(buffer, config, rank, ops, times);
  } catch (const Error& error) {
    return std::string("threw: ") + error.what() + "\n  config: " + config.describe();
  }
}

}  // namespace epx::testing
