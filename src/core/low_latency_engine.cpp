#include "core/low_latency_engine.hpp"

#include <sstream>

#include "core/engine.hpp"
#include "core/output_batch.hpp"
#include "epx/error.hpp"
#include "plan/low_latency_layout.hpp"

namespace epx::detail {

plan::LowLatencyLayout low_latency_layout(const BufferConfig& config, int num_ranks,
                                          const plan::WorkspaceLayout& workspace) {
  plan::LowLatencyLayout layout;
  layout.num_ranks = num_ranks;
  layout.num_experts = static_cast<int32_t>(config.num_experts);
  layout.num_topk = static_cast<int32_t>(config.num_topk);
  layout.max_tokens = config.low_latency_max_tokens;
  layout.hidden = config.hidden;
  layout.fp8 = config.fp8_dispatch;
  layout.base = workspace.low_latency_offset();
  return layout;
}

const char* low_latency_state_name(uint32_t state) {
  switch (state) {
    case plan::kStateIdle:
      return "between rounds (a dispatch may start)";
    case plan::kStateDispatchSent:
      return "a dispatch's wait is due";
    case plan::kStateDispatched:
      return "dispatched (a combine must come next)";
    case plan::kStateCombineSent:
      return "a combine's wait is due";
    default:
      return "unknown";
  }
}

std::string describe_low_latency_tags(uint32_t mine, uint32_t theirs, int rank, int peer,
                                      bool dispatch) {
  static const char* const kinds[] = {"a dispatch", "a cached dispatch", "a combine_backward",
                                      "a combine"};
  auto kind = [](uint32_t tags) {
    return kinds[(tags & plan::kTagKindMask) >> plan::kTagKindShift];
  };
  std::ostringstream out;
  auto differs = [&](uint32_t bit) { return (mine & bit) != (theirs & bit); };
  auto given = [&](uint32_t bit, const char* what) {
    if (!differs(bit)) return;
    out << "; " << what << " given on rank " << ((theirs & bit) ? peer : rank) << ", not on rank "
        << ((theirs & bit) ? rank : peer);
  };
  out << "rank " << peer << "'s low-latency call differs from rank " << rank << "'s";
  if (differs(plan::kTagKindMask))
    out << "; rank " << peer << " runs " << kind(theirs) << ", rank " << rank << " " << kind(mine);
  if (differs(plan::kTagHalf)) {
    out << "; they use different halves of the receive regions (their rounds are out of step: "
           "CUDA graphs replayed differently, or a call skipped)";
  }
  given(plan::kTagWeights, dispatch ? "weights" : "weights (a weighted sum)");
  given(plan::kTagSecondScalar, dispatch ? "aux" : "scalars");
  if (dispatch) given(plan::kTagFp8, "fp8 x");
  return out.str();
}

void raise_low_latency_failure(const LowLatencyFailure& f, int rank,
                               const plan::LowLatencyLayout& layout, double timeout_seconds) {
  std::ostringstream out;
  out << "rank " << rank << ": phase " << plan::low_latency_phase_name(f.phase);
  ErrorCode code = ErrorCode::kInvalidArgument;
  switch (f.kind) {
    case LowLatencyFailure::kTimeout:
      code = ErrorCode::kTimeout;
      out << " timed out after " << timeout_seconds << " s waiting for rank " << f.peer
          << " (expected epoch " << f.expected << ", saw " << f.seen << ")";
      break;
    case LowLatencyFailure::kPeerDropped:
      out << ": rank " << f.peer << " dropped its part of this low-latency round (its "
          << "low-latency mode failed; see that rank's error)";
      break;
    case LowLatencyFailure::kPeerBufferFailed:
      code = ErrorCode::kUnusable;
      out << ": rank " << f.peer << "'s buffer failed earlier (see that rank's error); build a "
          << "new Buffer on every rank";
      break;
    case LowLatencyFailure::kBadRouting:
      code = ErrorCode::kInvalidRouting;
      if (f.peer == rank) {
        out << ": this rank passed topk_idx value " << f.value;
      } else {
        out << ": rank " << f.peer << " passed a topk_idx value";
      }
      out << " outside [-1, " << layout.num_experts << "); this round delivered nothing usable";
      break;
    case LowLatencyFailure::kOrder:
      out << ": out of turn: low-latency dispatches and combines must alternate, and this rank "
          << "is " << low_latency_state_name(static_cast<uint32_t>(f.value));
      break;
    case LowLatencyFailure::kOverflow:
      code = ErrorCode::kInvalidRouting;
      out << ": expert " << int64_t(rank) * layout.local_experts() + f.value << " received "
          << f.seen << " rows, more than its region's " << layout.expert_rows()
          << " (R * low_latency_max_tokens; a token naming one expert twice takes two rows)";
      break;
    case LowLatencyFailure::kMismatch: {
      const bool combine = f.phase >= plan::low_latency_send_phase(plan::kKindCombine);
      out << ": "
          << describe_low_latency_tags(static_cast<uint32_t>(f.expected),
                                       static_cast<uint32_t>(f.seen), rank, f.peer, !combine);
      break;
    }
  }
  throw_error(code, __FILE__, __LINE__, out.str());
}

uint32_t LowLatencyEngine::dispatch_tags(const DispatchInputs& in, uint32_t kind, int half) {
  return plan::low_latency_kind_tag(kind) | (half ? plan::kTagHalf : 0u) |
         (in.weights.defined() ? plan::kTagWeights : 0u) |
         (in.aux.defined() ? plan::kTagSecondScalar : 0u) |
         (in.x.dtype == DType::kFloat8E4M3 ? plan::kTagFp8 : 0u);
}

uint32_t LowLatencyEngine::combine_tags(const LowLatencyCombineInputs& in, int half) {
  return plan::low_latency_kind_tag(plan::kKindCombine) | (half ? plan::kTagHalf : 0u) |
         (in.weights.defined() ? plan::kTagWeights : 0u) |
         (in.scalars.defined() ? plan::kTagSecondScalar : 0u);
}

LowLatencyHandle LowLatencyEngine::new_handle(const EngineContext& context, int64_t num_tokens,
                                              Device device, void* stream) const {
  LowLatencyHandle handle(context.buffer_id, context.comm.rank(), context.comm.num_ranks(),
                          num_tokens);
  OutputBatch batch;
  batch.pack(&handle.topk_idx, DType::kInt32, {num_tokens, layout_.num_topk});
  batch.pack(&handle.slots, DType::kInt32, {num_tokens, layout_.num_topk});
  batch.pack(&handle.counts, DType::kInt32, {layout_.local_experts()});
  batch.allocate(*context.allocator, device, stream);
  return handle;
}

LowLatencyDispatchResult LowLatencyEngine::receive_views(char* ws, int half,
                                                         const DispatchInputs& in,
                                                         const LowLatencyHandle& handle,
                                                         Device device) const {
  const int64_t experts = layout_.local_experts(), rows = layout_.expert_rows();
  auto view = [&](void* data, DType dtype, std::vector<int64_t> shape) {
    return Tensor{TensorView(data, dtype, std::move(shape), device), nullptr};
  };
  LowLatencyDispatchResult result{.handle = handle};
  result.x = view(layout_.recv_rows(ws, half), in.x.dtype, {experts, rows, layout_.hidden});
  if (in.x_scales.defined()) {
    result.x_scales = view(layout_.recv_scales(ws, half), DType::kFloat32,
                           {experts, rows, layout_.scales_per_row()});
  }
  if (in.weights.defined()) {
    result.weights = view(layout_.recv_weights(ws, half), DType::kFloat32, {experts, rows});
  }
  if (in.aux.defined()) {
    result.aux = view(layout_.recv_aux(ws, half), DType::kFloat32, {experts, rows});
  }
  result.src_info = view(layout_.src_info(ws, half), DType::kInt32, {experts, rows});
  result.counts = view(layout_.counts(ws, half), DType::kInt32, {experts});
  return result;
}

LowLatencyEngine& Engine::low_latency() {
  EPX_FAIL(kInvalidArgument, "the low-latency mode is not supported by this transport");
}

void LowLatencyEngine::check_can_start(const char* operation) const {
  EPX_CHECK(failed_.empty(), kUnusable,
            operation << ": this buffer's low-latency mode failed earlier (" << failed_
                      << "); build a new Buffer on every rank");
  EPX_CHECK(!wait_due_, kInvalidArgument,
            operation << ": the previous low-latency call returned a hook whose wait has not "
                         "run (call Buffer::low_latency_wait first)");
}

void LowLatencyEngine::fail(const std::string& why) {
  if (failed_.empty()) failed_ = why;
}

// Runs a transport part; an error it raises fails the mode (the ranks' LL exchanges are out of
// step after it: docs/semantics.md), and the peers are told.
template <typename Part>
auto LowLatencyEngine::guarded(Part&& part, void* stream) {
  try {
    return part();
  } catch (const Error& error) {
    fail(error.what());
    publish_failed(stream);
    throw;
  }
}

LowLatencyDispatchResult LowLatencyEngine::dispatch(const DispatchInputs& in,
                                                    const LowLatencyHandle* cached,
                                                    const LowLatencyOptions& options,
                                                    const plan::OpFingerprint& op, void* stream) {
  half_ ^= 1;
  LowLatencyDispatchResult result = guarded(
      [&] { return send_dispatch(in, cached, half_, !options.return_hook, stream); }, stream);
  if (!cached) result.handle.origin = op.sequence;
  wait_due_ = options.return_hook;
  return result;
}

LowLatencyCombineResult LowLatencyEngine::combine(const LowLatencyCombineInputs& in,
                                                  const LowLatencyHandle& handle,
                                                  const LowLatencyOptions& options, void* stream) {
  LowLatencyCombineResult result = guarded(
      [&] { return send_combine(in, handle, half_, !options.return_hook, stream); }, stream);
  wait_due_ = options.return_hook;
  return result;
}

CombineBackwardResult LowLatencyEngine::combine_backward(const TensorView& grad_y,
                                                         const LowLatencyHandle& handle,
                                                         const TensorView& x,
                                                         const TensorView& weights, void* stream) {
  half_ ^= 1;
  return guarded([&] { return run_combine_backward(grad_y, handle, x, weights, half_, stream); },
                 stream);
}

void LowLatencyEngine::wait(void* stream) {
  EPX_CHECK(failed_.empty(), kUnusable,
            "low_latency_wait: this buffer's low-latency mode failed earlier (" << failed_ << ")");
  EPX_CHECK(wait_due_, kInvalidArgument,
            "low_latency_wait: no low-latency call returned a hook since the last wait");
  wait_due_ = false;
  guarded([&] { wait_part(stream); }, stream);
}

void LowLatencyEngine::abort(void* stream) {
  fail("this rank rejected its input to a low-latency call");
  publish_failed(stream);
}

}  // namespace epx::detail
