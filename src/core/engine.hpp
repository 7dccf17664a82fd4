// The transport-specific half of a Buffer. Buffer validates every input and then calls one of
// these; an engine may assume its inputs are well formed (shapes, dtypes, devices, handle
// identity), but must itself detect invalid routing values (topk_idx outside [-1, E)) and
// report them on every rank without writing rows to any peer.
#pragma once

#include <cstdint>

#include "core/setup_record.hpp"
#include "epx/buffer.hpp"
#include "epx/comm.hpp"
#include "plan/op_record.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::detail {

// The transport-specific state behind an epx::Comm. Each transport derives its own.
struct CommState {
  virtual ~CommState() = default;
  int rank = 0;
  int num_ranks = 1;
  uint64_t next_buffer = 0;  // buffers are created in the same order on every rank
  virtual Transport transport() const = 0;
};

class LowLatencyEngine;  // core/low_latency_engine.hpp

class Engine {
 public:
  virtual ~Engine() = default;
  virtual Device device() const = 0;
  // Blocks each kernel of this engine uses (BufferConfig::num_sms resolved); 0: no kernels.
  virtual int num_sms() const { return 0; }
  // `cached` is null for a routing dispatch, else the handle to replay. `op` is the call's
  // fingerprint: it goes out with the operation's entry, and a peer whose fingerprint differs
  // makes the operation raise on every rank (plan/op_record.hpp).
  virtual DispatchResult dispatch(const DispatchInputs& inputs, const DispatchOptions& options,
                                  const Handle* cached, const plan::OpFingerprint& op,
                                  void* stream) = 0;
  virtual CombineResult combine(const CombineInputs& inputs, const Handle& handle,
                                ReduceAt reduce_at, const plan::OpFingerprint& op,
                                void* stream) = 0;
  virtual CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                                 const TensorView& x, const TensorView& weights,
                                                 const plan::OpFingerprint& op, void* stream) = 0;
  virtual void synchronize(void* stream) = 0;
  // Raises an error an earlier operation recorded on the device, if one has (no waiting).
  virtual void raise_recorded_error(void* stream) { (void)stream; }
  // This rank rejected its input to the operation `op` (validation failed before any
  // exchange): mark the operation's entry barrier as aborted so that the peers raise instead of
  // waiting for a timeout.
  virtual void abort(const plan::OpFingerprint& op, void* stream) = 0;
  // This rank's buffer failed (a timeout): mark it in every peer's records, so that their next
  // operation raises instead of waiting for this rank.
  virtual void poison(void* stream) = 0;
  // The low-latency mode's half (Buffer asks only when the mode is on). The default raises:
  // the transport does not support it.
  virtual LowLatencyEngine& low_latency();
};

// Everything an engine is built from.
struct EngineContext {
  Comm comm;
  BufferConfig config;
  std::shared_ptr<Allocator> allocator;
  uint64_t buffer_id;
  SetupRecord setup;  // what this rank states at setup; every peer's must match
};

// The workspace layout every rank uses for `config` (src/core/buffer.cpp).
plan::WorkspaceLayout workspace_layout(const BufferConfig& config, int num_ranks);

// A routing dispatch's handle with its identity and options filled in (src/core/buffer.cpp);
// the engine adds the arrays.
Handle new_handle(const EngineContext& context, const DispatchOptions& options, int64_t num_tokens);

// What each transport provides: its engine, and the allocator behind default_allocator() for
// its memory (the CUDA ones throw in a build without CUDA: src/core/no_cuda.cpp).
std::unique_ptr<Engine> make_host_engine(const EngineContext& context);
std::unique_ptr<Engine> make_cuda_engine(const EngineContext& context);
std::shared_ptr<Allocator> make_host_allocator();  // src/core/tensor.cpp
std::shared_ptr<Allocator> make_cuda_allocator();  // src/cuda/runtime/cuda_allocator.cpp

}  // namespace epx::detail
