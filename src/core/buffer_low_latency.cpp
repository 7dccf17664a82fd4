// Buffer's low-latency calls (epx/low_latency.hpp): each is numbered like every operation
// (Buffer::run_low_latency), checks its inputs (core/validate_low_latency.hpp; a rejected input
// aborts the call on the LL flags, so the peers raise instead of waiting), then runs the
// transport's part (core/low_latency_engine.hpp).
#include <optional>

#include "core/engine.hpp"
#include "core/low_latency_call.hpp"
#include "core/low_latency_engine.hpp"
#include "core/validate_low_latency.hpp"
#include "epx/buffer.hpp"
#include "epx/error.hpp"

namespace epx {
namespace {

uint32_t bit_if(const TensorView& tensor, uint32_t bit) {
  return tensor.defined() ? bit : 0u;
}

uint32_t dispatch_tensor_bits(const DispatchInputs& in) {
  const bool fp8 = in.x.defined() && in.x.dtype == DType::kFloat8E4M3;
  return bit_if(in.weights, plan::kTensorWeights) | bit_if(in.aux, plan::kTensorAux) |
         (fp8 ? uint32_t(plan::kTensorFp8) : 0u);
}

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
  const char* name = "low_latency_dispatch";
  detail::LowLatencyEngine& low_latency = low_latency_engine(name);
  std::optional<LowLatencyDispatchResult> result;
  run_low_latency(name, stream,
                  {.check =
                       [&](uint64_t sequence) {
                         return plan::OpFingerprint{.sequence = sequence,
                                                    .config_hash = config_hash_,
                                                    .kind = plan::kOpLowLatencyDispatch,
                                                    .tensors = dispatch_tensor_bits(inputs)};
                       },
                   .run =
                       [&](const plan::OpFingerprint& op) {
                         checked(low_latency, stream, [&] {
                           detail::check_low_latency_dispatch(inputs, config_, device());
                         });
                         result.emplace(low_latency.dispatch(inputs, nullptr, options, op, stream));
                       }});
  return std::move(*result);
}

LowLatencyDispatchResult Buffer::low_latency_dispatch(const DispatchInputs& inputs,
                                                      const LowLatencyHandle& handle,
                                                      const LowLatencyOptions& options,
                                                      void* stream) {
  const char* name = "cached low_latency_dispatch";
  detail::LowLatencyEngine& low_latency = low_latency_engine(name);
  std::optional<LowLatencyDispatchResult> result;
  run_low_latency(name, stream,
                  {.check =
                       [&](uint64_t sequence) {
                         return plan::OpFingerprint{.sequence = sequence,
                                                    .handle_origin = handle.origin,
                                                    .config_hash = config_hash_,
                                                    .kind = plan::kOpLowLatencyCachedDispatch,
                                                    .tensors = dispatch_tensor_bits(inputs)};
                       },
                   .run =
                       [&](const plan::OpFingerprint& op) {
                         checked(low_latency, stream, [&] {
                           detail::check_low_latency_handle(handle, id_, rank(), num_ranks(), name);
                           detail::check_low_latency_cached(inputs, handle, config_, device());
                         });
                         result.emplace(low_latency.dispatch(inputs, &handle, options, op, stream));
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
             return plan::OpFingerprint{.sequence = sequence,
                                        .handle_origin = handle.origin,
                                        .config_hash = config_hash_,
                                        .kind = plan::kOpLowLatencyCombine,
                                        .tensors = bit_if(inputs.weights, plan::kTensorWeights) |
                                                   bit_if(inputs.scalars, plan::kTensorScalars)};
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
                         return plan::OpFingerprint{.sequence = sequence,
                                                    .handle_origin = handle.origin,
                                                    .config_hash = config_hash_,
                                                    .kind = plan::kOpLowLatencyCombineBackward};
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
