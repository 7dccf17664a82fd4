// The transport-specific half of the low-latency mode (epx/low_latency.hpp), and the host-side
// state both transports keep the same way: which half of the receive regions the round uses,
// whether a hook's wait is due, whether the mode failed. Buffer validates every input first
// (src/core/validate.cpp); the transports run docs/protocol.md's LL protocol.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "core/engine.hpp"
#include "epx/buffer.hpp"
#include "plan/low_latency_layout.hpp"
#include "plan/op_record.hpp"

namespace epx::detail {

// The low-latency layout of a buffer (src/core/buffer.cpp): the region after
// `workspace`'s own (zero bytes when the mode is off).
plan::LowLatencyLayout low_latency_layout(const BufferConfig& config, int num_ranks,
                                          const plan::WorkspaceLayout& workspace);

// Words for the LL errors, the same on both transports (phases: plan::low_latency_phase_name):
// a state word, and what differs between two ranks' flag tags.
const char* low_latency_state_name(uint32_t state);
std::string describe_low_latency_tags(uint32_t mine, uint32_t theirs, int rank, int peer,
                                      bool dispatch);

// An LL error as both transports raise it (the CUDA transport's kernels record these).
struct LowLatencyFailure {
  enum Kind {
    kTimeout,           // a peer's flag did not come (expected, seen: epochs)
    kPeerDropped,       // the peer's LL mode failed: it dropped its part of the round
    kPeerBufferFailed,  // the peer's buffer failed (its poison mark)
    kBadRouting,        // a topk_idx value outside [-1, E): this rank's (value) or the peer's
    kOrder,             // a call out of turn (value: the state word)
    kOverflow,          // local expert `value` received `seen` rows, more than its region holds
    kMismatch,          // the peer's call differs (expected, seen: this rank's tags, the peer's)
  };
  Kind kind;
  int32_t phase;  // a plan::LowLatencyPhase
  int peer;
  int64_t value = 0;
  uint64_t expected = 0;
  uint64_t seen = 0;
};
[[noreturn]] void raise_low_latency_failure(const LowLatencyFailure& failure, int rank,
                                            const plan::LowLatencyLayout& layout,
                                            double timeout_seconds);

class LowLatencyEngine {
 public:
  virtual ~LowLatencyEngine() = default;

  // Buffer's entry points, each called after check_can_start: the transport's part, and the
  // mode marked failed when that part raises.
  LowLatencyDispatchResult dispatch(const DispatchInputs& in, const LowLatencyHandle* cached,
                                    const LowLatencyOptions& options, const plan::OpFingerprint& op,
                                    void* stream);
  LowLatencyCombineResult combine(const LowLatencyCombineInputs& in, const LowLatencyHandle& handle,
                                  const LowLatencyOptions& options, void* stream);
  CombineBackwardResult combine_backward(const TensorView& grad_y, const LowLatencyHandle& handle,
                                         const TensorView& x, const TensorView& weights,
                                         void* stream);
  void wait(void* stream);
  // Refuses a call when the mode failed earlier (kUnusable) or a hook's wait is due
  // (kInvalidArgument). Buffer runs it before it numbers the call: a refused call is not an
  // operation (nothing went out).
  void check_can_start(const char* operation) const;
  // An LL error was raised from the device (whose kernel told the peers): later LL calls raise
  // kUnusable.
  void fail(const std::string& why);

  // [E_l, R*S_ll, H] bf16: the combine region of this rank's workspace (Buffer's
  // low_latency_combine_input).
  virtual Tensor combine_input() = 0;
  // This rank rejected its input to an LL call: the mode fails, and the peers are told (they
  // raise instead of waiting for this rank).
  void abort(void* stream);

 protected:
  explicit LowLatencyEngine(const plan::LowLatencyLayout& layout) : layout_(layout) {}

  // The transport's parts. `half` is the round's half of the receive regions; with `wait`
  // the wait part runs right after the send part (in the same kernel on the GPU), else it is
  // due and wait_part runs it.
  virtual LowLatencyDispatchResult send_dispatch(const DispatchInputs& in,
                                                 const LowLatencyHandle* cached, int half,
                                                 bool wait, void* stream) = 0;
  virtual LowLatencyCombineResult send_combine(const LowLatencyCombineInputs& in,
                                               const LowLatencyHandle& handle, int half, bool wait,
                                               void* stream) = 0;
  virtual CombineBackwardResult run_combine_backward(const TensorView& grad_y,
                                                     const LowLatencyHandle& handle,
                                                     const TensorView& x, const TensorView& weights,
                                                     int half, void* stream) = 0;
  virtual void wait_part(void* stream) = 0;

  // What both transports build alike. The flag tags of this rank's call
  // (plan/low_latency_layout.hpp): a dispatch-direction call of `kind` with `in`, a combine.
  static uint32_t dispatch_tags(const DispatchInputs& in, uint32_t kind, int half);
  static uint32_t combine_tags(const LowLatencyCombineInputs& in, int half);
  // A routing dispatch's handle, its three arrays in one allocation (the call's only one).
  LowLatencyHandle new_handle(const EngineContext& context, int64_t num_tokens, Device device,
                              void* stream) const;
  // A dispatch's outputs: views of half `half` of this rank's workspace at `ws`.
  LowLatencyDispatchResult receive_views(char* ws, int half, const DispatchInputs& in,
                                         const LowLatencyHandle& handle, Device device) const;
  // Sets this rank's line of every peer's `failed` flags (plan/low_latency_layout.hpp).
  virtual void publish_failed(void* stream) = 0;

  plan::LowLatencyLayout layout_;

 private:
  template <typename Part>
  auto guarded(Part&& part, void* stream);

  int half_ = 1;           // the last dispatch's half (the first one uses half 0)
  bool wait_due_ = false;  // a send returned a hook and its wait has not run
  std::string failed_;     // why the mode failed ("" while it works)
};

}  // namespace epx::detail

// One low-latency call as Buffer runs it (Buffer::run_low_latency, src/core/buffer.cpp): the
// calls are in src/core/buffer.cpp, the numbering, failure and abort rules of every
// operation in buffer.cpp's run_operation.
namespace epx::detail {

struct LowLatencyCall {
  // The fingerprint of a call given its number; empty for the wait of a hook, part of a call
  // already numbered. Its input checks run in `run`: a rejected LL call tells the peers through
  // the LL flags (LowLatencyEngine::abort), not through the entry barrier of the other calls.
  std::function<plan::OpFingerprint(uint64_t sequence)> check{};
  std::function<void(const plan::OpFingerprint&)> run{};
};

}  // namespace epx::detail
