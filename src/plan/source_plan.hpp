// Source-side routing plan computed on the host (the host transport's, and the tests' view of
// what the CUDA plan kernel must produce). See routing.hpp for the definitions.
#pragma once

#include <cstdint>
#include <vector>

#include "plan/workspace_layout.hpp"

namespace epx::plan {

struct SourcePlan {
  int64_t num_tokens = 0;
  int32_t num_topk = 0;
  int32_t num_ranks = 0;
  int32_t num_experts = 0;
  std::vector<int32_t> send_slot;      // [S][R], -1 where the token does not go to rank r
  std::vector<int32_t> expert_slot;    // [S][K], -1 where topk_idx is -1
  std::vector<int32_t> rank_counts;    // [R] tokens sent to each rank
  std::vector<int32_t> expert_counts;  // [E] rows sent to each (global) expert
  int32_t status = kRoutingOk;         // kRoutingBadExpert when an index is outside [-1, E)
  int64_t bad_value = 0;               // the first offending index
};

// topk_idx is [S][K], given as int32 (topk_idx32) or int64 (topk_idx64); exactly one non-null.
SourcePlan plan_source(const int32_t* topk_idx32, const int64_t* topk_idx64, int64_t num_tokens,
                       int32_t num_topk, int32_t num_experts, int32_t num_ranks);

}  // namespace epx::plan
