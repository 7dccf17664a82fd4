#include "epx/buffer.hpp"

#include <atomic>
#include <chrono>
#include <random>

#include "core/engine.hpp"
#include "core/validate.hpp"
#include "epx/error.hpp"

namespace epx {
namespace {

// Distinct per Buffer within a process (and, with the random start, across processes), so a
// handle can be matched to the buffer that made it.
uint64_t next_buffer_id() {
  static std::atomic<uint64_t> counter{std::random_device{}() |
                                       (uint64_t(std::random_device{}()) << 32)};
  return counter.fetch_add(1) * 0x9e3779b97f4a7c15ull + 1;
}

}  // namespace

// Runs a host-side check; if it rejects the input, tells the peers (through the operation's
// entry barrier) before raising, so a bad call on one rank never leaves the others waiting.
template <typename Check>
void Buffer::validate_collective(const char* operation, void* stream, Check&& check) {
  try {
    check();
  } catch (const Error&) {
    engine_->abort(operation, stream);
    throw;
  }
}

Buffer::Buffer(Comm comm, const BufferConfig& config, std::shared_ptr<Allocator> allocator)
    : comm_(std::move(comm)), config_(config), allocator_(std::move(allocator)),
      id_(next_buffer_id()) {
  EPX_CHECK(allocator_ != nullptr, kInvalidArgument, "the allocator must not be null");
  detail::check_config(config_, comm_.num_ranks());
  const detail::EngineContext context{comm_, config_, allocator_, id_};
  engine_ = comm_.transport() == Transport::kHost ? detail::make_host_engine(context)
                                                  : detail::make_cuda_engine(context);
}

Buffer::~Buffer() = default;

Device Buffer::device() const { return engine_->device(); }
int Buffer::num_sms() const { return engine_->num_sms(); }

DispatchResult Buffer::dispatch(const DispatchInputs& inputs, const DispatchOptions& options,
                                void* stream) {
  validate_collective("dispatch", stream,
                      [&] { detail::check_dispatch(inputs, options, config_, device()); });
  return engine_->dispatch(inputs, options, nullptr, stream);
}

DispatchResult Buffer::dispatch(const DispatchInputs& inputs, const Handle& handle,
                                void* stream) {
  validate_collective("cached dispatch", stream, [&] {
    detail::check_handle(handle, id_, rank(), num_ranks(), "cached dispatch");
    detail::check_cached_dispatch(inputs, handle, config_, device());
  });
  DispatchOptions options;
  options.expand = handle.expand;
  options.expert_alignment = handle.expert_alignment;
  options.zero_padding = handle.zero_padding;
  options.sync_counts = handle.counts_synced;
  return engine_->dispatch(inputs, options, &handle, stream);
}

CombineResult Buffer::combine(const CombineInputs& inputs, const Handle& handle,
                              const CombineOptions& options, void* stream) {
  validate_collective("combine", stream, [&] {
    detail::check_handle(handle, id_, rank(), num_ranks(), "combine");
    detail::check_combine(inputs, handle, config_, device());
  });
  return engine_->combine(inputs, handle, options.reduce_at, stream);
}

CombineBackwardResult Buffer::combine_backward(const TensorView& grad_y, const Handle& handle,
                                               const TensorView& x, const TensorView& weights,
                                               void* stream) {
  validate_collective("combine_backward", stream, [&] {
    detail::check_handle(handle, id_, rank(), num_ranks(), "combine_backward");
    detail::check_combine_backward(grad_y, handle, x, weights, config_, device());
  });
  return engine_->combine_backward(grad_y, handle, x, weights, stream);
}

void Buffer::synchronize(void* stream) { engine_->synchronize(stream); }

size_t workspace_bytes(const BufferConfig& config, int num_ranks) {
  detail::check_config(config, num_ranks);
  return static_cast<size_t>(detail::workspace_layout(config, num_ranks).total_bytes());
}

namespace detail {
plan::WorkspaceLayout workspace_layout(const BufferConfig& config, int num_ranks) {
  plan::WorkspaceLayout layout;
  layout.num_ranks = num_ranks;
  layout.num_topk = static_cast<int32_t>(config.num_topk);
  layout.num_experts = static_cast<int32_t>(config.num_experts);
  layout.max_tokens = config.max_tokens_per_rank;
  layout.hidden = config.hidden;
  layout.fp8 = config.fp8_dispatch;
  return layout;
}

Handle new_handle(const EngineContext& context, const DispatchOptions& options,
                  int64_t num_tokens) {
  Handle handle;
  handle.buffer_id = context.buffer_id;
  handle.rank = context.comm.rank();
  handle.num_ranks = context.comm.num_ranks();
  handle.expand = options.expand;
  handle.expert_alignment = options.expert_alignment;
  handle.zero_padding = options.zero_padding;
  handle.counts_synced = options.sync_counts;
  handle.num_experts = static_cast<int32_t>(context.config.num_experts);
  handle.num_topk = static_cast<int32_t>(context.config.num_topk);
  handle.max_tokens_per_rank = context.config.max_tokens_per_rank;
  handle.num_tokens = num_tokens;
  return handle;
}
}  // namespace detail

}  // namespace epx
