#include "epx/buffer.hpp"

#include <atomic>
#include <chrono>
#include <optional>
#include <random>

#include "core/engine.hpp"
#include "core/low_latency_engine.hpp"
#include "core/op_fingerprint.hpp"
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

// Every operation: refuse at once when the buffer failed earlier; raise an error an earlier
// operation recorded on the device; number the call and make its fingerprint; run the host-side
// check, and if it rejects the input tell the peers (through the operation's entry barrier)
// before raising, so a bad call on one rank never leaves the others waiting; then run it. A
// timeout (or a peer's failure) makes the buffer unusable on this rank and marks it so for the
// peers.
template <typename Check, typename Run>
auto Buffer::run_operation(const char* operation, void* stream, Check&& check, Run&& run) {
  check_usable(operation);
  try {
    engine_->raise_recorded_error(stream);
    ++sequence_;
    plan::OpFingerprint op{.sequence = sequence_};
    try {
      op = check(sequence_);
    } catch (const Error&) {
      engine_->abort(op, stream);
      throw;
    }
    return run(op);
  } catch (const Error& error) {
    note_failure(error, stream);
    throw;
  }
}

void Buffer::check_usable(const char* operation) const {
  EPX_CHECK(unusable_.empty(), kUnusable,
            "rank " << rank() << ": " << operation << ": this buffer failed earlier (" << unusable_
                    << "); build a new Buffer on every rank");
}

void Buffer::note_failure(const Error& error, void* stream) {
  if (error.code() != ErrorCode::kTimeout && error.code() != ErrorCode::kUnusable) return;
  unusable_ = error.what();
  engine_->poison(stream);
}

Buffer::Buffer(Comm comm, const BufferConfig& config, std::shared_ptr<Allocator> allocator)
    : comm_(std::move(comm)),
      config_(config),
      allocator_(std::move(allocator)),
      id_(next_buffer_id()) {
  EPX_CHECK(allocator_ != nullptr, kInvalidArgument, "the allocator must not be null");
  detail::check_config(config_, comm_.num_ranks());
  const detail::SetupRecord setup =
      detail::setup_record(config_, comm_.num_ranks(), comm_.state()->next_buffer++);
  config_hash_ = detail::config_hash(setup);
  const detail::EngineContext context{comm_, config_, allocator_, id_, setup};
  engine_ = !is_cuda(comm_.transport()) ? detail::make_host_engine(context)
                                        : detail::make_cuda_engine(context);
}

Buffer::~Buffer() = default;

Device Buffer::device() const {
  return engine_->device();
}
int Buffer::num_sms() const {
  return engine_->num_sms();
}

DispatchResult Buffer::dispatch(const DispatchInputs& inputs, const DispatchOptions& options,
                                void* stream) {
  return run_operation(
      "dispatch", stream,
      [&](uint64_t sequence) {
        const plan::OpFingerprint op =
            detail::dispatch_fingerprint(inputs, options, sequence, config_hash_);
        detail::check_dispatch(inputs, options, config_, device());
        return op;
      },
      [&](const plan::OpFingerprint& op) {
        DispatchResult result = engine_->dispatch(inputs, options, nullptr, op, stream);
        result.handle.origin = op.sequence;
        return result;
      });
}

DispatchResult Buffer::dispatch(const DispatchInputs& inputs, const Handle& handle, void* stream) {
  return run_operation(
      "cached dispatch", stream,
      [&](uint64_t sequence) {
        detail::check_handle(handle, id_, rank(), num_ranks(), "cached dispatch");
        const plan::OpFingerprint op =
            detail::cached_dispatch_fingerprint(inputs, handle, sequence, config_hash_);
        detail::check_cached_dispatch(inputs, handle, config_, device());
        return op;
      },
      [&](const plan::OpFingerprint& op) {
        DispatchOptions options;
        options.expand = handle.expand;
        options.expert_alignment = handle.expert_alignment;
        options.zero_padding = handle.zero_padding;
        options.sync_counts = handle.counts_synced;
        return engine_->dispatch(inputs, options, &handle, op, stream);
      });
}

CombineResult Buffer::combine(const CombineInputs& inputs, const Handle& handle,
                              const CombineOptions& options, void* stream) {
  return run_operation(
      "combine", stream,
      [&](uint64_t sequence) {
        detail::check_handle(handle, id_, rank(), num_ranks(), "combine");
        const plan::OpFingerprint op =
            detail::combine_fingerprint(inputs, handle, options.reduce_at, sequence, config_hash_);
        detail::check_combine(inputs, handle, config_, device());
        return op;
      },
      [&](const plan::OpFingerprint& op) {
        return engine_->combine(inputs, handle, options.reduce_at, op, stream);
      });
}

CombineBackwardResult Buffer::combine_backward(const TensorView& grad_y, const Handle& handle,
                                               const TensorView& x, const TensorView& weights,
                                               void* stream) {
  return run_operation(
      "combine_backward", stream,
      [&](uint64_t sequence) {
        detail::check_handle(handle, id_, rank(), num_ranks(), "combine_backward");
        const plan::OpFingerprint op =
            detail::combine_backward_fingerprint(handle, sequence, config_hash_);
        detail::check_combine_backward(grad_y, handle, x, weights, config_, device());
        return op;
      },
      [&](const plan::OpFingerprint& op) {
        return engine_->combine_backward(grad_y, handle, x, weights, op, stream);
      });
}

void Buffer::abort(void* stream) {
  if (!unusable_.empty()) return;  // the peers learn of a failed buffer from its poison mark
  ++sequence_;
  engine_->abort(plan::OpFingerprint{.sequence = sequence_, .config_hash = config_hash_}, stream);
}

void Buffer::synchronize(void* stream) {
  check_usable("synchronize");
  try {
    engine_->synchronize(stream);
  } catch (const Error& error) {
    note_failure(error, stream);
    throw;
  }
}

// The low-latency calls (below) go through run_operation too; the wait of a hook is part of a
// call already numbered.
void Buffer::run_low_latency(const char* operation, void* stream,
                             const detail::LowLatencyCall& call) {
  if (call.check) {
    run_operation(operation, stream, call.check, call.run);
    return;
  }
  check_usable(operation);
  try {
    call.run(plan::OpFingerprint{});
  } catch (const Error& error) {
    note_failure(error, stream);
    throw;
  }
}

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
  if (config.low_latency_max_tokens > 0) {
    layout.low_latency_bytes = low_latency_layout(config, num_ranks, layout).bytes();
  }
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

// Buffer's low-latency calls (epx/low_latency.hpp): each is numbered like every operation
// (Buffer::run_low_latency), checks its inputs (core/validate.hpp; a rejected input
// aborts the call on the LL flags, so the peers raise instead of waiting), then runs the
// transport's part (core/low_latency_engine.hpp).
namespace epx {
namespace {

// Runs the input checks; a rejection goes out on the LL flags before it is raised.
template <typename Check>
void checked(detail::LowLatencyEngine& low_latency, void* stream, Check&& check) {
  try {
    check();
  } catch (const Error&) {
    low_latency.abort(stream);
    throw;
  }
}

}  // namespace

detail::LowLatencyEngine& Buffer::low_latency_engine(const char* operation) {
  detail::check_low_latency_on(config_, operation);
  detail::LowLatencyEngine& low_latency = engine_->low_latency();
  low_latency.check_can_start(operation);
  return low_latency;
}

LowLatencyDispatchResult Buffer::low_latency_dispatch(const DispatchInputs& inputs,
                                                      const LowLatencyOptions& options,
                                                      void* stream) {
  return run_low_latency_dispatch(inputs, nullptr, options, stream);
}

LowLatencyDispatchResult Buffer::low_latency_dispatch(const DispatchInputs& inputs,
                                                      const LowLatencyHandle& handle,
                                                      const LowLatencyOptions& options,
                                                      void* stream) {
  return run_low_latency_dispatch(inputs, &handle, options, stream);
}

LowLatencyDispatchResult Buffer::run_low_latency_dispatch(const DispatchInputs& inputs,
                                                          const LowLatencyHandle* cached,
                                                          const LowLatencyOptions& options,
                                                          void* stream) {
  const char* name = cached ? "cached low_latency_dispatch" : "low_latency_dispatch";
  detail::LowLatencyEngine& low_latency = low_latency_engine(name);
  std::optional<LowLatencyDispatchResult> result;
  run_low_latency(name, stream,
                  {.check =
                       [&](uint64_t sequence) {
                         return detail::low_latency_dispatch_fingerprint(inputs, cached, sequence,
                                                                         config_hash_);
                       },
                   .run =
                       [&](const plan::OpFingerprint& op) {
                         checked(low_latency, stream, [&] {
                           if (cached) {
                             detail::check_low_latency_handle(*cached, id_, rank(), num_ranks(),
                                                              name);
                             detail::check_low_latency_cached(inputs, *cached, config_, device());
                           } else {
                             detail::check_low_latency_dispatch(inputs, config_, device());
                           }
                         });
                         result.emplace(low_latency.dispatch(inputs, cached, options, op, stream));
                       }});
  return std::move(*result);
}

LowLatencyCombineResult Buffer::low_latency_combine(const LowLatencyCombineInputs& inputs,
                                                    const LowLatencyHandle& handle,
                                                    const LowLatencyOptions& options,
                                                    void* stream) {
  const char* name = "low_latency_combine";
  detail::LowLatencyEngine& low_latency = low_latency_engine(name);
  LowLatencyCombineResult result;
  run_low_latency(
      name, stream,
      {.check =
           [&](uint64_t sequence) {
             return detail::low_latency_combine_fingerprint(inputs, handle, sequence, config_hash_);
           },
       .run =
           [&](const plan::OpFingerprint&) {
             checked(low_latency, stream, [&] {
               detail::check_low_latency_handle(handle, id_, rank(), num_ranks(), name);
               detail::check_low_latency_combine(inputs, config_, num_ranks(), device());
             });
             result = low_latency.combine(inputs, handle, options, stream);
           }});
  return result;
}

CombineBackwardResult Buffer::low_latency_combine_backward(const TensorView& grad_y,
                                                           const LowLatencyHandle& handle,
                                                           const TensorView& x,
                                                           const TensorView& weights,
                                                           void* stream) {
  const char* name = "low_latency_combine_backward";
  detail::LowLatencyEngine& low_latency = low_latency_engine(name);
  CombineBackwardResult result;
  run_low_latency(name, stream,
                  {.check =
                       [&](uint64_t sequence) {
                         return detail::low_latency_combine_backward_fingerprint(handle, sequence,
                                                                                 config_hash_);
                       },
                   .run =
                       [&](const plan::OpFingerprint&) {
                         checked(low_latency, stream, [&] {
                           detail::check_low_latency_handle(handle, id_, rank(), num_ranks(), name);
                           detail::check_low_latency_backward(grad_y, handle, x, weights, config_,
                                                              num_ranks(), device());
                         });
                         result = low_latency.combine_backward(grad_y, handle, x, weights, stream);
                       }});
  return result;
}

void Buffer::low_latency_wait(void* stream) {
  const char* name = "low_latency_wait";
  detail::check_low_latency_on(config_, name);
  detail::LowLatencyEngine& low_latency = engine_->low_latency();
  run_low_latency(name, stream,
                  {.run = [&](const plan::OpFingerprint&) { low_latency.wait(stream); }});
}

void Buffer::low_latency_abort(void* stream) {
  detail::check_low_latency_on(config_, "low_latency_abort");
  ++sequence_;
  engine_->low_latency().abort(stream);
}

Tensor Buffer::low_latency_combine_input() {
  detail::check_low_latency_on(config_, "low_latency_combine_input");
  return engine_->low_latency().combine_input();
}

}  // namespace epx
