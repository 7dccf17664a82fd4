// epx::Buffer: dispatch tokens to the ranks that hold their experts, combine expert outputs
// back. The semantics (layouts, orderings, exact numerics) are those of docs/semantics.md; every
// transport produces the same bits as the reference (src/reference).
//
// Collective: every rank of the communicator calls each operation, in the same order, with the
// same options and the same optional channels (weights, aux, scalars, bias). Each operation's
// entry carries a fingerprint of the call (kind, its number in the buffer's sequence, options,
// optional tensors, the dispatch that made the handle); when ranks disagree, every rank raises
// naming both ranks and what differs, and nothing moves. All tensors live on the buffer's
// device (host memory for the host transport) and are contiguous (empty tensors always are).
//
// After a timeout (a peer that never arrived, or died) the buffer is unusable on every rank:
// later calls raise ErrorCode::kUnusable, on this rank at once and on its peers at their next
// operation, without waiting for it. Build a new Buffer on every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "epx/comm.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "epx/handle.hpp"
#include "epx/low_latency.hpp"
#include "epx/tensor.hpp"

namespace epx {

namespace detail {
class Engine;
class LowLatencyEngine;
struct LowLatencyCall;  // src/core/low_latency_engine.hpp
}  // namespace detail

struct DispatchInputs {
  TensorView x;         // [S, H] bf16, or fp8-e4m3 with x_scales (buffer built with fp8_dispatch)
  TensorView x_scales;  // [S, H/128] fp32, only with fp8 x
  TensorView topk_idx;  // [S, K] int32 or int64, values in [-1, E); omitted for cached dispatch
  TensorView weights;   // [S, K] fp32, optional
  TensorView aux;       // [S, K] fp32, optional second scalar channel
};

struct DispatchOptions {
  bool expand = false;        // expanded layout: one row per (token, local k), grouped by expert
  int expert_alignment = 1;   // expanded: pad each expert's segment to a multiple of this
  bool zero_padding = false;  // expanded: write zeros into padding rows
  bool sync_counts = true;    // false: no host sync, worst-case outputs, graph-capturable
};

struct DispatchResult {
  Tensor x;         // compact [N, H] / expanded [M, H], same dtype as the input
  Tensor x_scales;  // fp8 only: [N or M, H/128]
  Tensor topk_idx;  // compact only: [N, K] int32, local expert or -1
  Tensor weights;   // compact [N, K] / expanded [M]; when weights were given
  Tensor aux;       // compact [N, K] / expanded [M]; when aux was given
  Handle handle;
};

enum class ReduceAt { kExpert, kSource };

struct CombineInputs {
  TensorView x;        // compact [N, H] / expanded [M, H] bf16
  TensorView weights;  // expanded only: [M] fp32, optional
  TensorView scalars;  // optional side channel: expanded [M] / compact [N, K] fp32
  TensorView bias0;    // optional [S, H] bf16, added before the final rounding
  TensorView bias1;    // optional [S, H] bf16, added after bias0
};

struct CombineOptions {
  ReduceAt reduce_at = ReduceAt::kExpert;  // compact handles always reduce at the expert
};

struct CombineResult {
  Tensor x;        // [S, H] bf16
  Tensor scalars;  // [S, K] fp32, when scalars were given
};

struct CombineBackwardResult {
  Tensor grad_x;        // [M, H] bf16: bf16(w_row * grad_y[t]); padding rows 0
  Tensor grad_weights;  // [M] fp32: dot(grad_y[t], x_row); padding rows 0
};

class Buffer {
 public:
  Buffer(Comm comm, const BufferConfig& config,
         std::shared_ptr<Allocator> allocator = default_allocator());
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  // Routing dispatch: computes the plan from topk_idx.
  DispatchResult dispatch(const DispatchInputs& inputs, const DispatchOptions& options = {},
                          void* stream = nullptr);
  // Cached dispatch: replays `handle`'s layout row for row (topk_idx must be omitted; weights
  // and aux may be given again). No count exchange, no host synchronisation.
  DispatchResult dispatch(const DispatchInputs& inputs, const Handle& handle,
                          void* stream = nullptr);

  CombineResult combine(const CombineInputs& inputs, const Handle& handle,
                        const CombineOptions& options = {}, void* stream = nullptr);

  // Fused backward of an expanded weighted combine y = combine(x, handle, weights).
  CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                         const TensorView& x, const TensorView& weights,
                                         void* stream = nullptr);

  // --- Low-latency mode (epx/low_latency.hpp: semantics and rules; BufferConfig::
  // low_latency_max_tokens > 0, else these raise). ---
  // Routing dispatch: x [S, H] (S <= S_ll), topk_idx [S, K], optional weights and aux.
  LowLatencyDispatchResult low_latency_dispatch(const DispatchInputs& inputs,
                                                const LowLatencyOptions& options = {},
                                                void* stream = nullptr);
  // Cached dispatch: `handle`'s rows again, with new x (bf16 also on an fp8 buffer), weights,
  // aux; topk_idx must be omitted. Counts come from the handle.
  LowLatencyDispatchResult low_latency_dispatch(const DispatchInputs& inputs,
                                                const LowLatencyHandle& handle,
                                                const LowLatencyOptions& options = {},
                                                void* stream = nullptr);
  LowLatencyCombineResult low_latency_combine(const LowLatencyCombineInputs& inputs,
                                              const LowLatencyHandle& handle,
                                              const LowLatencyOptions& options = {},
                                              void* stream = nullptr);
  // Backward of y = low_latency_combine({x, weights}, handle): grad_x [E_l, R*S_ll, H] bf16 =
  // bf16(w_row * grad_y[t]) and grad_weights [E_l, R*S_ll] fp32 = dot(grad_y[t], x_row), 0
  // beyond counts. It starts a round, like a dispatch (an LL combine must follow).
  CombineBackwardResult low_latency_combine_backward(const TensorView& grad_y,
                                                     const LowLatencyHandle& handle,
                                                     const TensorView& x, const TensorView& weights,
                                                     void* stream = nullptr);
  // The wait of the last LL call made with return_hook (and, for a combine, its reduction).
  void low_latency_wait(void* stream = nullptr);
  // [E_l, R*S_ll, H] bf16, a view of this rank's combine region: expert outputs written here
  // (after the round's dispatch has completed) are combined without a copy.
  Tensor low_latency_combine_input();
  // Rejects this rank's part of the LL call its peers are in (a check of a binding layer
  // failed before the call reached epx): they raise instead of waiting, and the LL mode fails.
  // Counts as an operation of the sequence, as the peers' calls do.
  void low_latency_abort(void* stream = nullptr);

  // Waits for the stream and raises any error a device-side check recorded (invalid routing
  // found on the device, a peer timeout inside a kernel, ranks that disagreed about an
  // operation). Every operation also raises, at its start, an error recorded by an earlier one
  // that has already finished on the device.
  void synchronize(void* stream = nullptr);

  // Rejects this rank's part of the operation its peers are entering (e.g. a check of a binding
  // layer failed before the call reached epx): the peers, waiting in its entry, raise at once
  // instead of timing out. Counts as an operation of the sequence, as the peers' calls do.
  void abort(void* stream = nullptr);

  const BufferConfig& config() const { return config_; }
  const Comm& comm() const { return comm_; }
  int rank() const { return comm_.rank(); }
  int num_ranks() const { return comm_.num_ranks(); }
  Device device() const;
  // The SMs (thread blocks per kernel) the CUDA transport uses: BufferConfig::num_sms, or the
  // library default (min(24, the device's SMs)) when that is 0. 0 on the host transport.
  int num_sms() const;
  uint64_t id() const { return id_; }

 private:
  template <typename Check, typename Run>
  auto run_operation(const char* operation, void* stream, Check&& check, Run&& run);
  void check_usable(const char* operation) const;
  // An LL call through run_operation (its wait part without numbering it: src/core/buffer.cpp).
  void run_low_latency(const char* operation, void* stream, const detail::LowLatencyCall& call);
  detail::LowLatencyEngine& low_latency_engine(const char* operation);
  // Both low_latency_dispatch overloads (`cached` null: a routing dispatch).
  LowLatencyDispatchResult run_low_latency_dispatch(const DispatchInputs& inputs,
                                                    const LowLatencyHandle* cached,
                                                    const LowLatencyOptions& options, void* stream);
  // A timeout or a peer's failure makes the buffer unusable (and tells the peers).
  void note_failure(const Error& error, void* stream);

  Comm comm_;
  BufferConfig config_;
  std::shared_ptr<Allocator> allocator_;
  uint64_t id_;
  uint64_t config_hash_ = 0;
  uint64_t sequence_ = 0;  // operations called so far (aborted ones included)
  std::string unusable_;   // why the buffer failed ("" while it works)
  std::unique_ptr<detail::Engine> engine_;
};

}  // namespace epx
