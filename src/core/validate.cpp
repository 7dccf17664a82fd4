#include "core/validate.hpp"

#include <sstream>

#include "epx/error.hpp"

namespace epx::detail {
namespace {

std::string shape_string(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out << ", ";
    if (shape[i] < 0) {
      out << "*";
    } else {
      out << shape[i];
    }
  }
  out << "]";
  return out.str();
}

std::string dtypes_string(std::initializer_list<DType> dtypes) {
  std::string out;
  for (DType dtype : dtypes) {
    if (!out.empty()) out += " or ";
    out += to_string(dtype);
  }
  return out;
}

}  // namespace

void check_tensor(const TensorView& tensor, const TensorSpec& spec, Device device) {
  EPX_CHECK(tensor.defined(), kInvalidArgument, spec.name << " is required");
  for (int64_t extent : tensor.shape) {
    EPX_CHECK(extent >= 0, kInvalidArgument,
              spec.name << " has a negative extent: shape " << shape_string(tensor.shape));
  }
  bool dtype_ok = false;
  for (DType dtype : spec.dtypes) dtype_ok = dtype_ok || dtype == tensor.dtype;
  EPX_CHECK(dtype_ok, kInvalidArgument,
            spec.name << " must be " << dtypes_string(spec.dtypes) << ", got "
                      << to_string(tensor.dtype));
  bool shape_ok = tensor.shape.size() == spec.shape.size();
  for (size_t d = 0; shape_ok && d < spec.shape.size(); ++d) {
    shape_ok = spec.shape[d] < 0 || spec.shape[d] == tensor.shape[d];
  }
  EPX_CHECK(shape_ok, kInvalidArgument,
            spec.name << " must have shape " << shape_string(spec.shape) << ", got "
                      << shape_string(tensor.shape));
  EPX_CHECK(
      tensor.device == device, kInvalidArgument,
      spec.name << " must be on " << to_string(device) << ", got " << to_string(tensor.device));
  EPX_CHECK(tensor.is_contiguous(), kInvalidArgument, spec.name << " must be contiguous");
  EPX_CHECK(tensor.data != nullptr || tensor.numel() == 0, kInvalidArgument,
            spec.name << " has no data pointer");
}

void check_optional_tensor(const TensorView& tensor, const TensorSpec& spec, Device device) {
  if (tensor.defined()) check_tensor(tensor, spec, device);
}

void check_config(const BufferConfig& config, int num_ranks) {
  EPX_CHECK(config.max_tokens_per_rank > 0, kInvalidArgument,
            "max_tokens_per_rank must be positive, got " << config.max_tokens_per_rank);
  EPX_CHECK(config.hidden > 0, kInvalidArgument, "hidden must be positive, got " << config.hidden);
  EPX_CHECK(config.num_topk > 0, kInvalidArgument,
            "num_topk must be positive, got " << config.num_topk);
  // A token may name one expert twice (it then gets two rows), but a top-k over fewer experts
  // than k is a configuration mistake.
  EPX_CHECK(config.num_topk <= config.num_experts, kInvalidArgument,
            "num_topk (" << config.num_topk << ") must not exceed num_experts ("
                         << config.num_experts << ")");
  EPX_CHECK(config.num_experts > 0 && config.num_experts % num_ranks == 0, kInvalidArgument,
            "num_experts (" << config.num_experts << ") must be a positive multiple of the "
                            << num_ranks << " ranks");
  EPX_CHECK(!config.fp8_dispatch || config.hidden % 128 == 0, kInvalidArgument,
            "fp8 dispatch needs hidden to be a multiple of 128, got " << config.hidden);
  // Finite and at most 11.6 days: the CUDA kernels count it in nanoseconds of a 64-bit timer.
  EPX_CHECK(config.timeout_seconds > 0 && config.timeout_seconds <= 1e6, kInvalidArgument,
            "timeout_seconds must be in (0, 1e6], got " << config.timeout_seconds);
  EPX_CHECK(config.low_latency_max_tokens >= 0, kInvalidArgument,
            "low_latency_max_tokens must be >= 0, got " << config.low_latency_max_tokens);
  EPX_CHECK(config.num_sms >= 0, kInvalidArgument, "num_sms must be >= 0, got " << config.num_sms);
  // Global token ids g = rank * S_max + t and row indices are int32 on the wire.
  EPX_CHECK(config.max_tokens_per_rank * num_ranks * config.num_topk < (int64_t(1) << 31),
            kInvalidArgument, "max_tokens_per_rank * ranks * num_topk must stay below 2^31");
  check_low_latency_config(config, num_ranks);
}

void check_tokens(const DispatchInputs& in, const BufferConfig& config, Device device,
                  int64_t num_tokens) {
  const int64_t hidden = config.hidden;
  const int64_t topk = config.num_topk;
  if (in.x.defined() && in.x.dtype == DType::kFloat8E4M3) {
    EPX_CHECK(config.fp8_dispatch, kInvalidArgument,
              "x is fp8 but the buffer was built without fp8_dispatch");
    check_tensor(in.x, {"x", {DType::kFloat8E4M3}, {num_tokens, hidden}}, device);
    check_tensor(in.x_scales, {"x_scales", {DType::kFloat32}, {num_tokens, hidden / 128}}, device);
  } else {
    check_tensor(in.x, {"x", {DType::kBFloat16, DType::kFloat8E4M3}, {num_tokens, hidden}}, device);
    EPX_CHECK(!in.x_scales.defined(), kInvalidArgument, "x_scales is only for fp8 x");
  }
  check_optional_tensor(in.weights, {"weights", {DType::kFloat32}, {num_tokens, topk}}, device);
  check_optional_tensor(in.aux, {"aux", {DType::kFloat32}, {num_tokens, topk}}, device);
}

void check_dispatch(const DispatchInputs& in, const DispatchOptions& options,
                    const BufferConfig& config, Device device) {
  EPX_CHECK(in.x.defined() && in.x.dim() == 2 && in.x.size(0) >= 0, kInvalidArgument,
            "x must be a 2-D [tokens, hidden] tensor");
  const int64_t num_tokens = in.x.size(0);
  EPX_CHECK(num_tokens <= config.max_tokens_per_rank, kInvalidArgument,
            "x has " << num_tokens << " tokens, more than max_tokens_per_rank ("
                     << config.max_tokens_per_rank << ")");
  EPX_CHECK(in.x.size(1) == config.hidden, kInvalidArgument,
            "x has hidden size " << in.x.size(1) << ", the buffer was built for " << config.hidden);
  check_tokens(in, config, device, num_tokens);
  check_tensor(in.topk_idx,
               {"topk_idx", {DType::kInt32, DType::kInt64}, {num_tokens, config.num_topk}}, device);
  EPX_CHECK(options.expert_alignment >= 1 && options.expert_alignment <= (1 << 16),
            kInvalidArgument,
            "expert_alignment must be in [1, 65536], got " << options.expert_alignment);
}

void check_handle(const Handle& handle, uint64_t buffer_id, int rank, int num_ranks,
                  const char* operation) {
  EPX_CHECK(handle.buffer_id == buffer_id && handle.rank == rank && handle.num_ranks == num_ranks,
            kHandleMismatch,
            operation << ": the handle was made by another buffer (or another rank)");
}

void check_cached_dispatch(const DispatchInputs& in, const Handle& handle,
                           const BufferConfig& config, Device device) {
  EPX_CHECK(!in.topk_idx.defined(), kInvalidArgument,
            "cached dispatch takes its routing from the handle: omit topk_idx");
  EPX_CHECK(in.x.defined() && in.x.dim() == 2 && in.x.size(0) == handle.num_tokens,
            kInvalidArgument,
            "cached dispatch: x must have the handle's " << handle.num_tokens << " tokens");
  check_tokens(in, config, device, handle.num_tokens);
}

void check_combine(const CombineInputs& in, const Handle& handle, const BufferConfig& config,
                   Device device) {
  const int64_t rows = handle.expand ? handle.row_capacity : handle.recv_token_capacity;
  const char* layout = handle.expand ? "expanded" : "compact";
  EPX_CHECK(in.x.defined() && in.x.dim() == 2 && in.x.size(0) == rows, kInvalidArgument,
            "combine: x must have the handle's " << rows << " " << layout << " rows, got "
                                                 << (in.x.dim() >= 1 ? in.x.size(0) : -1));
  check_tensor(in.x, {"x", {DType::kBFloat16}, {rows, config.hidden}}, device);
  if (handle.expand) {
    check_optional_tensor(in.weights, {"weights", {DType::kFloat32}, {rows}}, device);
    check_optional_tensor(in.scalars, {"scalars", {DType::kFloat32}, {rows}}, device);
  } else {
    EPX_CHECK(!in.weights.defined(), kInvalidArgument,
              "combine: weights cannot be given with a compact handle (the expert side applies "
              "them when it reduces its local experts)");
    check_optional_tensor(in.scalars, {"scalars", {DType::kFloat32}, {rows, config.num_topk}},
                          device);
  }
  check_optional_tensor(in.bias0, {"bias0", {DType::kBFloat16}, {handle.num_tokens, config.hidden}},
                        device);
  check_optional_tensor(in.bias1, {"bias1", {DType::kBFloat16}, {handle.num_tokens, config.hidden}},
                        device);
}

void check_combine_backward(const TensorView& grad_y, const Handle& handle, const TensorView& x,
                            const TensorView& weights, const BufferConfig& config, Device device) {
  EPX_CHECK(handle.expand, kHandleMismatch,
            "combine_backward needs an expanded handle (a compact combine's backward is a "
            "cached dispatch)");
  const int64_t rows = handle.row_capacity;
  check_tensor(grad_y, {"grad_y", {DType::kBFloat16}, {handle.num_tokens, config.hidden}}, device);
  check_tensor(x, {"x", {DType::kBFloat16}, {rows, config.hidden}}, device);
  check_tensor(weights, {"weights", {DType::kFloat32}, {rows}}, device);
}

}  // namespace epx::detail

namespace epx::detail {
namespace {

// [E_l, R*S_ll]: the shape of every per-row tensor of the mode.
std::vector<int64_t> rows_shape(const BufferConfig& config, int num_ranks) {
  return {config.num_experts / num_ranks, num_ranks * config.low_latency_max_tokens};
}

std::vector<int64_t> row_tensor_shape(const BufferConfig& config, int num_ranks) {
  std::vector<int64_t> shape = rows_shape(config, num_ranks);
  shape.push_back(config.hidden);
  return shape;
}

}  // namespace

void check_low_latency_config(const BufferConfig& config, int num_ranks) {
  const int64_t tokens = config.low_latency_max_tokens;
  EPX_CHECK(tokens >= 0, kInvalidArgument,
            "low_latency_max_tokens must be >= 0 (0: the mode is off), got " << tokens);
  // src_info holds (source * S_ll + t) * K + k as an int32.
  EPX_CHECK(tokens * num_ranks * config.num_topk < (int64_t(1) << 31), kInvalidArgument,
            "low_latency_max_tokens * ranks * num_topk must stay below 2^31");
}

void check_low_latency_on(const BufferConfig& config, const char* operation) {
  EPX_CHECK(config.low_latency_max_tokens > 0, kInvalidArgument,
            operation << ": the buffer was built without the low-latency mode "
                         "(BufferConfig::low_latency_max_tokens is 0)");
}

void check_low_latency_dispatch(const DispatchInputs& in, const BufferConfig& config,
                                Device device) {
  EPX_CHECK(in.x.defined() && in.x.dim() == 2, kInvalidArgument,
            "low_latency_dispatch: x must be a 2-D [tokens, hidden] tensor");
  const int64_t num_tokens = in.x.size(0);
  EPX_CHECK(num_tokens <= config.low_latency_max_tokens, kInvalidArgument,
            "low_latency_dispatch: x has " << num_tokens
                                           << " tokens, more than low_latency_max_tokens ("
                                           << config.low_latency_max_tokens << ")");
  check_tokens(in, config, device, num_tokens);
  check_tensor(in.topk_idx,
               {"topk_idx", {DType::kInt32, DType::kInt64}, {num_tokens, config.num_topk}}, device);
}

void check_low_latency_handle(const LowLatencyHandle& handle, uint64_t buffer_id, int rank,
                              int num_ranks, const char* operation) {
  EPX_CHECK(handle.buffer_id == buffer_id && handle.rank == rank && handle.num_ranks == num_ranks,
            kHandleMismatch,
            operation << ": the handle was made by another buffer (or another rank)");
}

void check_low_latency_cached(const DispatchInputs& in, const LowLatencyHandle& handle,
                              const BufferConfig& config, Device device) {
  EPX_CHECK(!in.topk_idx.defined(), kInvalidArgument,
            "cached low_latency_dispatch takes its routing from the handle: omit topk_idx");
  EPX_CHECK(
      in.x.defined() && in.x.dim() == 2 && in.x.size(0) == handle.num_tokens, kInvalidArgument,
      "cached low_latency_dispatch: x must have the handle's " << handle.num_tokens << " tokens");
  check_tokens(in, config, device, handle.num_tokens);
}

void check_low_latency_combine(const LowLatencyCombineInputs& in, const BufferConfig& config,
                               int num_ranks, Device device) {
  check_tensor(in.x, {"x", {DType::kBFloat16}, row_tensor_shape(config, num_ranks)}, device);
  check_optional_tensor(in.weights, {"weights", {DType::kFloat32}, rows_shape(config, num_ranks)},
                        device);
  check_optional_tensor(in.scalars, {"scalars", {DType::kFloat32}, rows_shape(config, num_ranks)},
                        device);
}

void check_low_latency_backward(const TensorView& grad_y, const LowLatencyHandle& handle,
                                const TensorView& x, const TensorView& weights,
                                const BufferConfig& config, int num_ranks, Device device) {
  check_tensor(grad_y, {"grad_y", {DType::kBFloat16}, {handle.num_tokens, config.hidden}}, device);
  check_tensor(x, {"x", {DType::kBFloat16}, row_tensor_shape(config, num_ranks)}, device);
  check_tensor(weights, {"weights", {DType::kFloat32}, rows_shape(config, num_ranks)}, device);
}

}  // namespace epx::detail
