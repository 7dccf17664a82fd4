#include "core/validate_low_latency.hpp"

#include "core/validate.hpp"
#include "epx/error.hpp"

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
