// The routing plan and the workspace layout on hand-worked cases.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "plan/routing.hpp"
#include "plan/source_plan.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::plan {
namespace {

// 3 tokens, K=2, E=4 over R=2 ranks (E_l=2): experts 0,1 on rank 0; 2,3 on rank 1.
TEST(Plan, SourceSlotsAndCounts) {
  const std::vector<int32_t> topk = {1, 3,    // token 0 -> ranks 0, 1
                                     2, 2,    // token 1 -> rank 1 (expert 2 twice)
                                     -1, 0};  // token 2 -> rank 0
  const SourcePlan p = plan_source(topk.data(), nullptr, 3, 2, 4, 2);
  ASSERT_EQ(p.status, kRoutingOk);
  EXPECT_EQ(p.send_slot, (std::vector<int32_t>{0, 0, -1, 1, 1, -1}));
  EXPECT_EQ(p.expert_slot, (std::vector<int32_t>{0, 0, 0, 1, -1, 0}));
  EXPECT_EQ(p.rank_counts, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(p.expert_counts, (std::vector<int32_t>{1, 1, 2, 1}));
}

TEST(Plan, RejectsOutOfRangeExperts) {
  const std::vector<int64_t> topk = {0, 4};
  const SourcePlan p = plan_source(nullptr, topk.data(), 1, 2, 4, 2);
  EXPECT_EQ(p.status, kRoutingBadExpert);
  EXPECT_EQ(p.bad_value, 4);
}

TEST(Plan, ReceiveOffsetsWithAlignment) {
  // 2 sources, 2 local experts; source 0 sends 3 tokens, source 1 sends 1.
  const std::vector<int32_t> recv_counts = {3, 1};
  const std::vector<int32_t> source_expert_counts = {2, 3,   // source 0: expert 0: 2, expert 1: 3
                                                     1, 0};  // source 1
  std::vector<int32_t> recv_offsets(3), tokens(2), offsets(3), expert_source(4);
  compute_receive_offsets(recv_counts.data(), source_expert_counts.data(), 2, 2, 4,
                          recv_offsets.data(), tokens.data(), offsets.data(), expert_source.data());
  EXPECT_EQ(recv_offsets, (std::vector<int32_t>{0, 3, 4}));
  EXPECT_EQ(tokens, (std::vector<int32_t>{3, 3}));
  EXPECT_EQ(offsets, (std::vector<int32_t>{0, 4, 8}));
  EXPECT_EQ(expert_source, (std::vector<int32_t>{0, 2, 4, 7}));
  // K = 3 > E_l = 2: a token naming one expert twice fills K rows, so the bound is K per token.
  EXPECT_EQ(worst_case_expanded_rows(2, 8, 3, 2, 4), 2 * 8 * 3 + 2 * 3);
}

TEST(Plan, WorkspaceRegionsAreOrderedAndAligned) {
  WorkspaceLayout layout;
  layout.num_ranks = 3;
  layout.num_topk = 9;
  layout.num_experts = 24;
  layout.max_tokens = 17;
  layout.hidden = 256;
  layout.fp8 = true;
  const std::vector<int64_t> offsets = {
      layout.flags_offset(),       layout.headers_offset(),    layout.expert_counts_offset(),
      layout.slot_meta_offset(),   layout.scalars_offset(),    layout.row_weights_offset(),
      layout.row_scales_offset(),  layout.rows_offset(),       layout.total_bytes()};
  for (size_t i = 0; i < offsets.size(); ++i) {
    EXPECT_EQ(offsets[i] % WorkspaceLayout::kRegionAlignment, 0) << i;
    if (i) EXPECT_GT(offsets[i], offsets[i - 1]) << i;
  }
  // Every flag and peer record on a 128-byte line of its own, all before the headers.
  std::vector<char> workspace(static_cast<size_t>(layout.headers_offset()));
  char* base = workspace.data();
  std::vector<int64_t> lines;
  for (int p = 0; p < layout.num_ranks; ++p) {
    const char* record = reinterpret_cast<const char*>(layout.record(base, p));
    for (const char* word : {reinterpret_cast<const char*>(layout.flag(base, p)), record}) {
      const int64_t offset = word - base;
      EXPECT_LE(offset + int64_t(sizeof(plan::PeerRecord)), layout.headers_offset());
      EXPECT_LE(int64_t(sizeof(plan::PeerRecord)), 128);
      lines.push_back(offset / 128);
    }
  }
  std::sort(lines.begin(), lines.end());
  EXPECT_EQ(std::adjacent_find(lines.begin(), lines.end()), lines.end());
  // Row staging holds max(R, K) * S_max rows: both combine indexings fit.
  EXPECT_EQ(layout.staging_rows(), 9 * 17);
  EXPECT_LT(layout.source_combine_row_index(16, 8), layout.staging_rows());
  EXPECT_LT(layout.expert_combine_row_index(2, 16), layout.staging_rows());
}

}  // namespace
}  // namespace epx::plan
