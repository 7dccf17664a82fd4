#include "plan/source_plan.hpp"

#include "plan/routing.hpp"

namespace epx::plan {

SourcePlan plan_source(const int32_t* topk_idx32, const int64_t* topk_idx64, int64_t num_tokens,
                       int32_t num_topk, int32_t num_experts, int32_t num_ranks) {
  SourcePlan plan;
  plan.num_tokens = num_tokens;
  plan.num_topk = num_topk;
  plan.num_ranks = num_ranks;
  plan.num_experts = num_experts;
  plan.send_slot.assign(num_tokens * num_ranks, -1);
  plan.expert_slot.assign(num_tokens * num_topk, -1);
  plan.rank_counts.assign(num_ranks, 0);
  plan.expert_counts.assign(num_experts, 0);
  const int32_t local_experts = num_experts / num_ranks;

  for (int64_t t = 0; t < num_tokens; ++t) {
    // Validate every index first: an invalid routing produces no slots at all.
    for (int32_t k = 0; k < num_topk; ++k) {
      const int64_t e = topk_idx32 ? topk_idx32[t * num_topk + k] : topk_idx64[t * num_topk + k];
      if (e < -1 || e >= num_experts) {
        if (plan.status == kRoutingOk) {
          plan.status = kRoutingBadExpert;
          plan.bad_value = e;
        }
      }
    }
  }
  if (plan.status != kRoutingOk) return plan;

  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int32_t k = 0; k < num_topk; ++k) {
      const int64_t idx = t * num_topk + k;
      const int32_t e = static_cast<int32_t>(topk_idx32 ? topk_idx32[idx] : topk_idx64[idx]);
      if (e < 0) continue;
      plan.expert_slot[idx] = plan.expert_counts[e]++;
      const int32_t r = rank_of_expert(e, local_experts);
      int32_t& slot = plan.send_slot[t * num_ranks + r];
      if (slot < 0) slot = plan.rank_counts[r]++;
    }
  }
  return plan;
}

}  // namespace epx::plan
