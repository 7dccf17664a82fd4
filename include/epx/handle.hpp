// The handle a dispatch returns: everything needed to replay the exchange (cached dispatch) or
// to invert it (combine, combine_backward) without recomputing the routing. A plain struct;
// its tensors live on the buffer's device (host memory for the host transport).
#pragma once

#include <cstdint>
#include <vector>

#include "epx/tensor.hpp"

namespace epx {

struct Handle {
  // Identity: which buffer and layout made it.
  uint64_t buffer_id = 0;
  uint64_t origin = 0;  // the number of the dispatch that made it in its buffer's sequence
  int32_t rank = 0;
  int32_t num_ranks = 0;
  bool expand = false;
  int32_t expert_alignment = 1;
  bool zero_padding = false;  // cached replays zero the padding rows too
  int32_t num_experts = 0;
  int32_t num_topk = 0;
  int64_t max_tokens_per_rank = 0;

  int64_t num_tokens = 0;        // S of this rank (source side)
  bool counts_synced = false;    // the host knows N, M and tokens_per_expert
  int64_t num_recv_tokens = -1;  // N, or -1 when counts stay on the device
  int64_t num_rows = -1;         // M, or -1 when counts stay on the device
  // Rows the receive-side tensors were sized for: N and M when synced, else the worst case.
  int64_t recv_token_capacity = 0;
  int64_t row_capacity = 0;

  // Source side (this rank's tokens).
  Tensor send_slot;    // [S, R] int32: slot in each destination's staging, -1 where not sent
  Tensor topk_idx;     // [S, K] int32: the routing (global expert or -1)
  Tensor expert_slot;  // [S, K] int32: rank of (t, k) among this source's rows to that expert

  // Receive side (tokens this rank received).
  Tensor recv_counts;            // [R] int32: tokens from each source
  Tensor recv_offsets;           // [R+1] int32: first compact row of each source
  Tensor source_expert_counts;   // [R, E_l] int32: rows from each source per local expert
  Tensor tokens_per_expert;      // [E_l] int32: real rows per local expert
  Tensor expert_offsets;         // [E_l+1] int32: first expanded row of each local expert; last = M
  Tensor expert_source_offsets;  // [E_l, R] int32: first expanded row of (expert, source)
  Tensor src_token;              // [N] int32: global id g = source * S_max + t of each row
  Tensor expanded_rows;          // [N, K] int32: expanded row of (token, k), -1 where none
  Tensor recv_topk_idx;          // [N, K] int32: local expert of (token, k), -1 where none
  Tensor device_counts;          // [2] int64 on the device: N, M (valid without a host sync)

  std::vector<int64_t> host_tokens_per_expert;  // when counts_synced
  std::vector<int64_t> host_expert_offsets;     // when counts_synced, E_l + 1 entries

  int32_t local_experts() const { return num_ranks ? num_experts / num_ranks : 0; }
};

}  // namespace epx
