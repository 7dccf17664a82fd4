// The symmetric workspace every rank allocates, defined once for host sizing, the host
// transport and the CUDA kernels. All ranks use the same layout, so an offset computed locally
// addresses the same field in any peer's workspace.
//
//   flags          [R] uint64        barrier epochs; peer p writes flag p of this rank
//   records        [R] PeerRecord    peer p's abort epoch, poison mark and the fingerprint of
//                                    the operation it entered (plan/op_record.hpp)
//                                    Each flag and record has a 128-byte line of its own
//                                    (kFlagStride): one writer per line, see flag().
//   headers        [R] SourceHeader  what source s sent to this rank (count, status, channels)
//   expert_counts  [R][E_l] int32    rows source s sends to each local expert of this rank
//   slot_meta      [R][S_max]        per dispatched token: source token index and, per k, the
//                                    local expert (or -1), its per-source expert slot, weight, aux
//   scalars        [S_max][K] f32    combine: the scalar of (t, k), written by the owner rank
//   row_scales     [R][S_max][H/128] fp8 dispatch: the scales of each staged row
//   rows           row staging, used by one protocol at a time (an entry barrier separates them):
//                    dispatch / combine_backward: [R][S_max] rows, indexed (source, slot)
//                    combine, reduce at expert:   [R][S_max] rows, indexed (expert rank, token)
//                    combine, reduce at source:   [S_max][K] rows, indexed (token, k), plus
//                                                 row_weights [S_max][K] f32 (the w of each row)
#pragma once

#include <cstddef>
#include <cstdint>

#include "plan/host_device.hpp"
#include "plan/op_record.hpp"

namespace epx::plan {

// One per (source, destination) pair, written by the source into the destination's workspace.
struct SourceHeader {
  int32_t num_tokens;  // tokens staged (dispatch) or rows sent (combine), for checks
  int32_t status;      // 0, or a RoutingStatus: the source found its own input invalid
  int32_t channels;    // bit 0: weights sent, bit 1: aux sent
  int32_t unused = 0;
  int64_t bad_value;  // the offending topk_idx value when status != 0
};

enum RoutingStatus : int32_t { kRoutingOk = 0, kRoutingBadExpert = 1 };
enum ChannelBits : int32_t { kChannelWeights = 1, kChannelAux = 2 };

EPX_HD int64_t align_up(int64_t value, int64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

struct WorkspaceLayout {
  int32_t num_ranks = 0;
  int32_t num_topk = 0;
  int32_t num_experts = 0;
  int64_t max_tokens = 0;
  int64_t hidden = 0;
  bool fp8 = false;
  int64_t low_latency_bytes =
      0;  // the low-latency region after these (plan/low_latency_layout.hpp)

  static constexpr int64_t kRegionAlignment = 256;
  static constexpr int64_t kScaleBlock = 128;             // fp8: one fp32 scale per 128 elements
  static constexpr int64_t kFlagStride = kPeerLineBytes;  // one cache line per flag

  EPX_HD int32_t local_experts() const { return num_experts / num_ranks; }
  // Row staging always fits a bf16 row: an fp8 row (H bytes) is smaller, and gradients are bf16.
  EPX_HD int64_t row_bytes() const { return hidden * 2; }
  EPX_HD int64_t scales_per_row() const { return fp8 ? hidden / kScaleBlock : 0; }
  // Slot metadata: token index, then K x {expert, expert_slot, weight, aux}, padded to 16 bytes.
  EPX_HD int64_t slot_meta_bytes() const { return align_up(4 + 16 * int64_t(num_topk), 16); }
  EPX_HD int64_t staging_rows() const {
    return max_tokens * (num_ranks > num_topk ? num_ranks : num_topk);
  }

  EPX_HD int64_t flags_offset() const { return 0; }
  EPX_HD int64_t headers_offset() const {
    return align_up(flags_offset() + peer_lines_bytes(num_ranks), kRegionAlignment);
  }
  EPX_HD int64_t expert_counts_offset() const {
    return align_up(headers_offset() + int64_t(sizeof(SourceHeader)) * num_ranks, kRegionAlignment);
  }
  EPX_HD int64_t slot_meta_offset() const {
    return align_up(expert_counts_offset() + 4 * int64_t(num_ranks) * local_experts(),
                    kRegionAlignment);
  }
  EPX_HD int64_t scalars_offset() const {
    return align_up(slot_meta_offset() + slot_meta_bytes() * num_ranks * max_tokens,
                    kRegionAlignment);
  }
  EPX_HD int64_t row_weights_offset() const {
    return align_up(scalars_offset() + 4 * max_tokens * num_topk, kRegionAlignment);
  }
  EPX_HD int64_t row_scales_offset() const {
    return align_up(row_weights_offset() + 4 * max_tokens * num_topk, kRegionAlignment);
  }
  EPX_HD int64_t rows_offset() const {
    return align_up(row_scales_offset() + 4 * scales_per_row() * num_ranks * max_tokens,
                    kRegionAlignment);
  }
  EPX_HD int64_t low_latency_offset() const {
    return align_up(rows_offset() + staging_rows() * row_bytes(), kRegionAlignment);
  }
  EPX_HD int64_t total_bytes() const { return low_latency_offset() + low_latency_bytes; }

  // Typed addresses inside one rank's workspace starting at `base`.
  // The flag peer `peer` publishes its barrier epochs into. Packed eight to a line, flags of
  // ranks sharing one GPU went back to older values after their writers had read the new ones
  // back (seen in H200 stress runs; the log is in git history at 5c90d78): some write carried
  // stale copies of its neighbours. With a line per flag, nothing one writer stores can reach
  // another writer's flag.
  EPX_HD uint64_t* flag(char* base, int peer) const {
    return peer_flag(base + flags_offset(), peer);
  }
  EPX_HD PeerRecord* record(char* base, int peer) const {
    return peer_record(base + flags_offset(), num_ranks, peer);
  }
  EPX_HD SourceHeader* header(char* base, int source) const {
    return reinterpret_cast<SourceHeader*>(base + headers_offset()) + source;
  }
  EPX_HD int32_t* expert_counts(char* base, int source) const {
    return reinterpret_cast<int32_t*>(base + expert_counts_offset()) +
           int64_t(source) * local_experts();
  }
  EPX_HD char* slot_meta(char* base, int source, int64_t slot) const {
    return base + slot_meta_offset() + (int64_t(source) * max_tokens + slot) * slot_meta_bytes();
  }
  EPX_HD float* scalars(char* base) const {
    return reinterpret_cast<float*>(base + scalars_offset());
  }
  EPX_HD float* row_weights(char* base) const {
    return reinterpret_cast<float*>(base + row_weights_offset());
  }
  EPX_HD float* row_scales(char* base, int source, int64_t slot) const {
    return reinterpret_cast<float*>(base + row_scales_offset()) +
           (int64_t(source) * max_tokens + slot) * scales_per_row();
  }
  // Row `index` of the staging region; the caller picks the indexing of the protocol in use.
  EPX_HD char* row(char* base, int64_t index) const {
    return base + rows_offset() + index * row_bytes();
  }
  EPX_HD int64_t dispatch_row_index(int source, int64_t slot) const {
    return int64_t(source) * max_tokens + slot;
  }
  EPX_HD int64_t expert_combine_row_index(int expert_rank, int64_t token) const {
    return int64_t(expert_rank) * max_tokens + token;
  }
  EPX_HD int64_t source_combine_row_index(int64_t token, int k) const {
    return token * num_topk + k;
  }
};

// Accessors for one slot's metadata record (see slot_meta_bytes()).
struct SlotMeta {
  char* base;
  int32_t num_topk;
  EPX_HD int32_t* token() const { return reinterpret_cast<int32_t*>(base); }
  EPX_HD int32_t* local_expert() const { return reinterpret_cast<int32_t*>(base + 4); }
  EPX_HD int32_t* expert_slot() const {
    return reinterpret_cast<int32_t*>(base + 4 + 4 * int64_t(num_topk));
  }
  EPX_HD float* weight() const {
    return reinterpret_cast<float*>(base + 4 + 8 * int64_t(num_topk));
  }
  EPX_HD float* aux() const { return reinterpret_cast<float*>(base + 4 + 12 * int64_t(num_topk)); }
};

}  // namespace epx::plan
