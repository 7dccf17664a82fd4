// The words of the low-latency protocol that both transports share (docs/protocol.md,
// "Low-latency mode"): what a flag value says, and the per-buffer state that makes dispatches
// and combines alternate.
//
// A flag (sent, ready: plan/low_latency_layout.hpp) holds (epoch << 8) | tags. The epoch of
// round n is n + 1 (the round counter counts finished combines), so flags only grow and are
// raised with an atomic max. The tags say what the writer did in that round, and a reader
// compares them with its own call: ranks that disagree (another half, other channels, another
// kind of call) raise instead of reading rows laid out differently. A rank whose LL mode failed
// (it dropped a call: bad input, out of turn, an error) sets its line of the peers' `failed`
// flags instead, which ends their waits for it; a flag that did arrive is never overruled by it.
#pragma once

#include <cstdint>

#include "plan/host_device.hpp"

namespace epx::plan {

enum LowLatencyTag : uint32_t {
  kTagHalf = 1,       // the round's half of the receive regions
  kTagKindShift = 1,  // bits 1-2: a LowLatencyKind
  kTagKindMask = 6,
  kTagWeights = 8,         // dispatch: weights sent; combine: the sum is weighted
  kTagSecondScalar = 16,   // dispatch: aux sent; combine: scalars sent back
  kTagFp8 = 32,            // dispatch: fp8 rows
  kTagWeightsInRecv = 32,  // combine, per writer: its weights are its recv weights (not compared)
  kTagBadRouting = 64,     // dispatch: the writer found a topk_idx value outside [-1, E)
  kTagsCompared = kTagHalf | kTagKindMask | kTagWeights | kTagSecondScalar,
};

enum LowLatencyKind : uint32_t {
  kKindDispatch = 0,  // routing dispatch: slots from the experts' counters
  kKindCached = 1,    // cached dispatch: slots from the handle
  kKindBackward = 2,  // combine_backward: grad_y rows to the handle's slots
  kKindCombine = 3,
};

EPX_HD uint64_t low_latency_flag(uint64_t epoch, uint32_t tags) {
  return epoch << 8 | tags;
}
EPX_HD uint64_t low_latency_epoch(uint64_t flag) {
  return flag >> 8;
}
EPX_HD uint32_t low_latency_tags(uint64_t flag) {
  return static_cast<uint32_t>(flag & 0xff);
}
EPX_HD uint32_t low_latency_kind_tag(uint32_t kind) {
  return kind << kTagKindShift;
}

// What a reader expects of a writer's tags, given its own; the fp8 bit is compared for
// dispatches only (it means something else in a combine).
EPX_HD bool low_latency_tags_agree(uint32_t mine, uint32_t theirs, bool dispatch) {
  const uint32_t mask = kTagsCompared | (dispatch ? uint32_t(kTagFp8) : 0u);
  return (mine & mask) == (theirs & mask);
}

// The state word: where this rank is in the round. A dispatch (routing, cached, or
// combine_backward, which moves rows the dispatch way) starts a round, a combine ends it; each
// has a send part and a wait part, which run in one kernel unless the call returned a hook.
enum LowLatencyState : uint32_t {
  kStateIdle = 0,          // between rounds: a dispatch may start
  kStateDispatchSent = 1,  // the dispatch's send part ran: its wait may run
  kStateDispatched = 2,    // the round's rows are here: a combine may start
  kStateCombineSent = 3,   // the combine's send part ran: its wait may run
};

// The state a part needs and the one it leaves.
struct LowLatencyStep {
  uint32_t before;
  uint32_t after;
};
EPX_HD LowLatencyStep low_latency_step(bool combine, bool wait_part) {
  if (!combine) {
    return wait_part ? LowLatencyStep{kStateDispatchSent, kStateDispatched}
                     : LowLatencyStep{kStateIdle, kStateDispatchSent};
  }
  return wait_part ? LowLatencyStep{kStateCombineSent, kStateIdle}
                   : LowLatencyStep{kStateDispatched, kStateCombineSent};
}

// Where a rank is when an LL error is recorded (the CUDA transport's phases are these after
// its own: cuda::kPhaseLowLatency + a LowLatencyPhase).
enum LowLatencyPhase : int32_t {
  kPhaseDispatchSend,
  kPhaseDispatchWait,
  kPhaseCachedSend,
  kPhaseCachedWait,
  kPhaseBackwardSend,
  kPhaseBackwardWait,
  kPhaseCombineSend,
  kPhaseCombineWait,
  kLowLatencyPhaseCount
};
// The phases of a call of `kind` (a LowLatencyKind): its send part; its wait part is next.
EPX_HD int32_t low_latency_send_phase(uint32_t kind) {
  return 2 * int32_t(kind);
}

// The phase's name in errors ("low-latency-dispatch/wait"), the same on both transports.
inline const char* low_latency_phase_name(int32_t phase) {
  static const char* const names[kLowLatencyPhaseCount] = {
      "low-latency-dispatch/send",         "low-latency-dispatch/wait",
      "low-latency-cached-dispatch/send",  "low-latency-cached-dispatch/wait",
      "low-latency-combine-backward/send", "low-latency-combine-backward/wait",
      "low-latency-combine/send",          "low-latency-combine/wait"};
  return phase >= 0 && phase < kLowLatencyPhaseCount ? names[phase] : "unknown";
}

}  // namespace epx::plan
