// The transport-specific half of a Buffer. Buffer validates every input and then calls one of
// these; an engine may assume its inputs are well formed (shapes, dtypes, devices, handle
// identity), but must itself detect invalid routing values (topk_idx outside [-1, E)) and
// report them on every rank without writing rows to any peer.
#pragma once

#include "epx/buffer.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::detail {

class Engine {
 public:
  virtual ~Engine() = default;
  virtual Device device() const = 0;
  // Blocks each kernel of this engine uses (BufferConfig::num_sms resolved); 0: no kernels.
  virtual int num_sms() const { return 0; }
  // `cached` is null for a routing dispatch, else the handle to replay.
  virtual DispatchResult dispatch(const DispatchInputs& inputs, const DispatchOptions& options,
                                  const Handle* cached, void* stream) = 0;
  virtual CombineResult combine(const CombineInputs& inputs, const Handle& handle,
                                ReduceAt reduce_at, void* stream) = 0;
  virtual CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                                 const TensorView& x, const TensorView& weights,
                                                 void* stream) = 0;
  virtual void synchronize(void* stream) = 0;
  // This rank rejected its input to `operation` (validation failed before any exchange): mark
  // the operation's entry barrier as aborted so that the peers raise instead of waiting for a
  // timeout. Transports without that mechanism leave the peers to time out.
  virtual void abort(const char* operation, void* stream) {
    (void)operation;
    (void)stream;
  }
};

// Everything an engine is built from.
struct EngineContext {
  Comm comm;
  BufferConfig config;
  std::shared_ptr<Allocator> allocator;
  uint64_t buffer_id;
};

// The workspace layout every rank uses for `config` (src/core/buffer.cpp).
plan::WorkspaceLayout workspace_layout(const BufferConfig& config, int num_ranks);

// A routing dispatch's handle with its identity and options filled in (src/core/buffer.cpp);
// the engine adds the arrays.
Handle new_handle(const EngineContext& context, const DispatchOptions& options,
                  int64_t num_tokens);

std::unique_ptr<Engine> make_host_engine(const EngineContext& context);
std::unique_ptr<Engine> make_cuda_engine(const EngineContext& context);  // throws without CUDA

}  // namespace epx::detail
