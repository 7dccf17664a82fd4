// The routing plan: where every (token, destination) and every (token, k) lands. Shared by the
// host transport and the CUDA kernels so both compute positions with the same arithmetic.
//
// Source side (from topk_idx alone):
//   send_slot[t][r]   = number of earlier tokens of this source that go to rank r (-1: none);
//                       the token's slot in r's staging region for this source.
//   expert_slot[t][k] = number of earlier (t', k') of this source naming expert topk_idx[t][k],
//                       in (token, k) order (-1 where topk_idx is -1).
// Receive side (from the counts every source sent):
//   compact row of (source s, slot p)      = recv_offsets[s] + p
//   expanded row of (source s, k with local expert e, expert_slot q)
//                                          = expert_source_offsets[e][s] + q
// Positions depend only on the routing, never on timing: no atomics decide them.
#pragma once

#include <cstdint>

#include "plan/host_device.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::plan {

EPX_HD int32_t rank_of_expert(int32_t expert, int32_t local_experts) {
  return expert / local_experts;
}
EPX_HD int32_t local_index_of_expert(int32_t expert, int32_t local_experts) {
  return expert % local_experts;
}

// Worst-case receive sizes, used when counts are not synced to the host.
EPX_HD int64_t worst_case_compact_rows(int64_t num_ranks, int64_t max_tokens) {
  return num_ranks * max_tokens;
}
// K rows per token, not min(K, E_l): a token that names one expert twice gets two rows
// (docs/semantics.md), so with K > E_l a token can still fill K rows here (docs/decisions.md:
// why the contract's min(K, E_l) bound is not used).
EPX_HD int64_t worst_case_expanded_rows(int64_t num_ranks, int64_t max_tokens, int64_t num_topk,
                                        int64_t local_experts, int64_t alignment) {
  return num_ranks * max_tokens * num_topk + local_experts * (alignment - 1);
}

// The source rank of received (compact) token n: the last s with recv_offsets[s] <= n.
EPX_HD int32_t source_of_received(const int32_t* recv_offsets, int32_t num_ranks, int64_t n) {
  int32_t s = 0;
  while (s + 1 < num_ranks && recv_offsets[s + 1] <= n) ++s;
  return s;
}

// Receive-side offsets from the per-source counts. Inputs: recv_counts[R] (tokens from each
// source) and source_expert_counts[R][E_l] (rows from each source for each local expert).
// Outputs: recv_offsets[R+1], tokens_per_expert[E_l], expert_offsets[E_l+1] (padded to
// `alignment`), expert_source_offsets[E_l][R]. Sequential; the CUDA path runs it in one thread
// (R * E_l is at most a few thousand).
EPX_HD void compute_receive_offsets(const int32_t* recv_counts, const int32_t* source_expert_counts,
                                    int32_t num_ranks, int32_t local_experts, int32_t alignment,
                                    int32_t* recv_offsets, int32_t* tokens_per_expert,
                                    int32_t* expert_offsets, int32_t* expert_source_offsets) {
  recv_offsets[0] = 0;
  for (int32_t s = 0; s < num_ranks; ++s) recv_offsets[s + 1] = recv_offsets[s] + recv_counts[s];
  expert_offsets[0] = 0;
  for (int32_t e = 0; e < local_experts; ++e) {
    int32_t row = expert_offsets[e];
    for (int32_t s = 0; s < num_ranks; ++s) {
      expert_source_offsets[e * num_ranks + s] = row;
      row += source_expert_counts[s * local_experts + e];
    }
    tokens_per_expert[e] = row - expert_offsets[e];
    expert_offsets[e + 1] =
        expert_offsets[e] + static_cast<int32_t>(align_up(tokens_per_expert[e], alignment));
  }
}

}  // namespace epx::plan
