// The low-latency mode's part of the symmetric workspace (docs/protocol.md, "Low-latency
// mode"), appended after the regions of WorkspaceLayout when BufferConfig::low_latency_max_tokens
// (S_ll) > 0. Defined once for host sizing, the host transport and the CUDA kernels; every rank
// uses the same layout, so an address computed locally names the same field in any peer.
//
//   sent      [R] lines          peer p raises line p to (epoch, tags) once its rows are here
//   claimed   [R] lines          peer p raises line p once its claims on the counters are done
//   ready     [R] lines          peer p raises line p once its combine rows can be read
//   failed    [R] lines          peer p sets line p when its LL mode failed: a wait for it ends
//   counters  [E_l] int32        the local experts' slot counters (sources claim rows with atomics)
//   combine   rows [E_l][R*S_ll] bf16, weights and scalars [E_l][R*S_ll] f32: what the sources
//                                pull back in a combine (one region: docs/decisions.md)
//   half h in {0, 1}, the region a round uses (rounds alternate):
//     recv rows    [E_l][R*S_ll] rows of the dispatched dtype (sized for bf16, the widest: the
//                  rows of an fp8 dispatch pack into the front, so every dtype's view is dense)
//     recv scales  [E_l][R*S_ll][H/128] f32, fp8 buffers only
//     recv weights, recv aux [E_l][R*S_ll] f32; src_info [E_l][R*S_ll] int32
//     counts       [E_l] int32: rows of each expert this round (what the dispatch returns)
//
// Expert e's rows are rows e * R*S_ll + [0, counts[e]) of each [E_l][R*S_ll] region.
#pragma once

#include <cstdint>

#include "plan/host_device.hpp"
#include "plan/op_record.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::plan {

// The flag lines a rank raises in its peers' workspaces (the failed lines aside): a dispatch's
// claims and rows, a combine's readiness.
enum class LowLatencyFlag { kClaimed, kSent, kReady };

struct LowLatencyLayout {
  int32_t num_ranks = 0;
  int32_t num_experts = 0;
  int32_t num_topk = 0;
  int64_t max_tokens = 0;  // S_ll
  int64_t hidden = 0;
  bool fp8 = false;
  int64_t base = 0;  // offset of the region in the workspace (WorkspaceLayout::low_latency_offset)

  static constexpr int64_t kAlignment = WorkspaceLayout::kRegionAlignment;
  static constexpr int64_t kLineBytes = kPeerLineBytes;  // one writer per flag line

  EPX_HD int32_t local_experts() const { return num_experts / num_ranks; }
  EPX_HD int64_t expert_rows() const { return int64_t(num_ranks) * max_tokens; }
  EPX_HD int64_t rows() const { return local_experts() * expert_rows(); }
  EPX_HD int64_t row_index(int32_t local_expert, int64_t slot) const {
    return local_expert * expert_rows() + slot;
  }
  EPX_HD int64_t scales_per_row() const { return fp8 ? hidden / WorkspaceLayout::kScaleBlock : 0; }
  // The wire id of (source rank, token, k), what src_info holds.
  EPX_HD int32_t source_id(int32_t source, int64_t token, int32_t k) const {
    return static_cast<int32_t>((source * max_tokens + token) * num_topk + k);
  }

  EPX_HD int64_t sent_offset() const { return base; }
  EPX_HD int64_t ready_offset() const { return sent_offset() + kLineBytes * num_ranks; }
  EPX_HD int64_t failed_offset() const { return ready_offset() + kLineBytes * num_ranks; }
  EPX_HD int64_t claimed_offset() const { return failed_offset() + kLineBytes * num_ranks; }
  EPX_HD int64_t counters_offset() const {
    return align_up(claimed_offset() + kLineBytes * num_ranks, kAlignment);
  }
  EPX_HD int64_t combine_rows_offset() const {
    return align_up(counters_offset() + 4 * int64_t(local_experts()), kAlignment);
  }
  EPX_HD int64_t combine_weights_offset() const {
    return align_up(combine_rows_offset() + rows() * hidden * 2, kAlignment);
  }
  EPX_HD int64_t combine_scalars_offset() const {
    return align_up(combine_weights_offset() + rows() * 4, kAlignment);
  }
  EPX_HD int64_t halves_offset() const {
    return align_up(combine_scalars_offset() + rows() * 4, kAlignment);
  }
  // Within a half.
  EPX_HD int64_t recv_scales_in_half() const { return align_up(rows() * hidden * 2, kAlignment); }
  EPX_HD int64_t recv_weights_in_half() const {
    return align_up(recv_scales_in_half() + rows() * scales_per_row() * 4, kAlignment);
  }
  EPX_HD int64_t recv_aux_in_half() const {
    return align_up(recv_weights_in_half() + rows() * 4, kAlignment);
  }
  EPX_HD int64_t src_info_in_half() const {
    return align_up(recv_aux_in_half() + rows() * 4, kAlignment);
  }
  EPX_HD int64_t counts_in_half() const {
    return align_up(src_info_in_half() + rows() * 4, kAlignment);
  }
  EPX_HD int64_t half_bytes() const {
    return align_up(counts_in_half() + 4 * int64_t(local_experts()), kAlignment);
  }
  EPX_HD int64_t half_offset(int half) const { return halves_offset() + half * half_bytes(); }
  // Bytes from `base` to the end of the region.
  EPX_HD int64_t bytes() const { return half_offset(2) - base; }

  // Typed addresses inside the workspace of one rank starting at `ws`.
  EPX_HD uint64_t* sent_flag(char* ws, int peer) const {
    return reinterpret_cast<uint64_t*>(ws + sent_offset() + peer * kLineBytes);
  }
  EPX_HD uint64_t* ready_flag(char* ws, int peer) const {
    return reinterpret_cast<uint64_t*>(ws + ready_offset() + peer * kLineBytes);
  }
  EPX_HD uint64_t* claimed_flag(char* ws, int peer) const {
    return reinterpret_cast<uint64_t*>(ws + claimed_offset() + peer * kLineBytes);
  }
  EPX_HD uint64_t* flag(LowLatencyFlag kind, char* ws, int peer) const {
    return kind == LowLatencyFlag::kClaimed ? claimed_flag(ws, peer)
           : kind == LowLatencyFlag::kSent  ? sent_flag(ws, peer)
                                            : ready_flag(ws, peer);
  }
  EPX_HD uint64_t* failed_flag(char* ws, int peer) const {
    return reinterpret_cast<uint64_t*>(ws + failed_offset() + peer * kLineBytes);
  }
  EPX_HD int32_t* counters(char* ws) const {
    return reinterpret_cast<int32_t*>(ws + counters_offset());
  }
  EPX_HD uint16_t* combine_rows(char* ws) const {
    return reinterpret_cast<uint16_t*>(ws + combine_rows_offset());
  }
  EPX_HD float* combine_weights(char* ws) const {
    return reinterpret_cast<float*>(ws + combine_weights_offset());
  }
  EPX_HD float* combine_scalars(char* ws) const {
    return reinterpret_cast<float*>(ws + combine_scalars_offset());
  }
  // The rows of the dispatched dtype, `row_bytes` each (H for fp8, 2H for bf16).
  EPX_HD char* recv_rows(char* ws, int half) const { return ws + half_offset(half); }
  EPX_HD float* recv_scales(char* ws, int half) const {
    return reinterpret_cast<float*>(ws + half_offset(half) + recv_scales_in_half());
  }
  EPX_HD float* recv_weights(char* ws, int half) const {
    return reinterpret_cast<float*>(ws + half_offset(half) + recv_weights_in_half());
  }
  EPX_HD float* recv_aux(char* ws, int half) const {
    return reinterpret_cast<float*>(ws + half_offset(half) + recv_aux_in_half());
  }
  EPX_HD int32_t* src_info(char* ws, int half) const {
    return reinterpret_cast<int32_t*>(ws + half_offset(half) + src_info_in_half());
  }
  EPX_HD int32_t* counts(char* ws, int half) const {
    return reinterpret_cast<int32_t*>(ws + half_offset(half) + counts_in_half());
  }
};

// Where the regions one call touches begin, in bytes from the start of any rank's workspace,
// for the call's half, and the layout's derived sizes: what the CUDA kernels take instead of
// evaluating the offset chains above (a division, alignments, products) on the device, where
// they sat inside the loops that store rows and counts and cost ~0.6 us per iteration
// (docs/performance.md, "Low-latency mode"). Resolved once per call on the host.
struct LowLatencyRegions {
  int64_t counters = 0, combine_rows = 0, combine_weights = 0, combine_scalars = 0;
  int64_t recv_rows = 0, recv_scales = 0, recv_weights = 0, recv_aux = 0, src_info = 0;
  int64_t counts = 0;
  int64_t expert_rows = 0;  // R * S_ll, the rows of each expert's region
  int64_t scales_per_row = 0;
  int32_t local_experts = 0;
};

inline LowLatencyRegions low_latency_regions(const LowLatencyLayout& layout, int half) {
  const int64_t h = layout.half_offset(half);
  return {.counters = layout.counters_offset(),
          .combine_rows = layout.combine_rows_offset(),
          .combine_weights = layout.combine_weights_offset(),
          .combine_scalars = layout.combine_scalars_offset(),
          .recv_rows = h,
          .recv_scales = h + layout.recv_scales_in_half(),
          .recv_weights = h + layout.recv_weights_in_half(),
          .recv_aux = h + layout.recv_aux_in_half(),
          .src_info = h + layout.src_info_in_half(),
          .counts = h + layout.counts_in_half(),
          .expert_rows = layout.expert_rows(),
          .scales_per_row = layout.scales_per_row(),
          .local_experts = layout.local_experts()};
}

// The region at `offset` of workspace `ws` (any rank's), as T.
template <typename T>
EPX_HD T* region(char* ws, int64_t offset) {
  return reinterpret_cast<T*>(ws + offset);
}

}  // namespace epx::plan

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
