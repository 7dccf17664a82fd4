// The low-latency mode's part of the symmetric workspace (docs/protocol.md, "Low-latency
// mode"), appended after the regions of WorkspaceLayout when BufferConfig::low_latency_max_tokens
// (S_ll) > 0. Defined once for host sizing, the host transport and the CUDA kernels; every rank
// uses the same layout, so an address computed locally names the same field in any peer.
//
//   sent      [R] lines          peer p raises line p to (epoch, tags) once its rows are here
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
  EPX_HD int64_t counters_offset() const {
    return align_up(failed_offset() + kLineBytes * num_ranks, kAlignment);
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

}  // namespace epx::plan
