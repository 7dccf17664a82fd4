// The oracle's semantics pinned by hand-worked cases (every expected value below was derived on
// paper from docs/semantics.md, not computed by the code under test), plus invariants of the
// reference on the random configurations every transport test draws.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <set>
#include <stdexcept>

#include "common/random_problem.hpp"
#include "plan/numerics.hpp"
#include "reference/reference.hpp"

namespace epx::reference {
namespace {

using Topk = std::vector<std::vector<int64_t>>;

// bf16 bit patterns used below.
constexpr uint16_t kOne = 0x3f80;          // 1.0
constexpr uint16_t kOnePlus2m7 = 0x3f81;   // 1 + 2^-7
constexpr uint16_t kTwoM8 = 0x3b80;        // 2^-8
constexpr uint16_t kTwoM23 = 0x3400;       // 2^-23
constexpr uint16_t kTwoM24 = 0x3380;       // 2^-24
constexpr uint16_t kMinusTwoM24 = 0xb380;  // -2^-24

Problem make_problem(int32_t ranks, int64_t max_tokens, int64_t hidden, int32_t experts,
                     int32_t topk, bool fp8 = false) {
  Problem p;
  p.num_ranks = ranks;
  p.max_tokens = max_tokens;
  p.hidden = hidden;
  p.num_experts = experts;
  p.num_topk = topk;
  p.fp8 = fp8;
  return p;
}

// A bf16 pattern unique to (source, token, h), so a misplaced row cannot look right.
uint16_t tag(int32_t s, int64_t t, int64_t h) {
  return uint16_t(0x4000 | s << 8 | t << 4 | h);
}
float weight_of(int32_t s, int64_t t, int32_t k) {
  return float(100 * s + 10 * t + k + 1);
}

// Rank `s`'s inputs: tagged rows, weights 100 s + 10 t + k + 1 when `weights`.
RankInputs make_rank(const Problem& p, int32_t s, const Topk& topk, bool weights) {
  RankInputs in;
  in.num_tokens = int64_t(topk.size());
  for (int64_t t = 0; t < in.num_tokens; ++t) {
    for (int64_t h = 0; h < p.hidden; ++h) {
      const uint16_t bits = tag(s, t, h);
      in.x.push_back(uint8_t(bits & 0xff));
      in.x.push_back(uint8_t(bits >> 8));
    }
    for (int32_t k = 0; k < p.num_topk; ++k) {
      in.topk_idx.push_back(topk[size_t(t)][size_t(k)]);
      if (weights) in.weights.push_back(weight_of(s, t, k));
    }
  }
  return in;
}

// Rows of one bf16 value each (H = 1) for combine inputs.
RankInputs one_token(const Problem& p, const std::vector<int64_t>& topk) {
  return make_rank(p, 0, Topk{topk}, false);
}

// Row `row` of bf16 rows stored as bytes.
std::vector<uint16_t> row_bits_of(const std::vector<uint8_t>& rows, int64_t row, int64_t hidden) {
  std::vector<uint16_t> bits(static_cast<size_t>(hidden));
  std::memcpy(bits.data(), &rows[size_t(row * hidden * 2)], size_t(hidden * 2));
  return bits;
}

std::vector<uint16_t> row_bits(const DispatchOutput& out, int64_t row, int64_t hidden) {
  return row_bits_of(out.x, row, hidden);
}

std::vector<uint16_t> tags(int32_t s, int64_t t, int64_t hidden) {
  std::vector<uint16_t> bits;
  for (int64_t h = 0; h < hidden; ++h) bits.push_back(tag(s, t, h));
  return bits;
}

using I = std::vector<int32_t>;
using F = std::vector<float>;

TEST(ReferenceDispatch, CompactOrderingUnevenTokens) {
  const Problem p = make_problem(3, 4, 2, 6, 2);  // E_l = 2
  const std::vector<RankInputs> in = {make_rank(p, 0, {{0, 5}, {3, 2}, {-1, -1}}, true),
                                      make_rank(p, 1, {}, true),
                                      make_rank(p, 2, {{4, 1}, {1, -1}, {2, 5}, {-1, 4}}, true)};
  const auto out = dispatch(p, in, /*expand=*/false, 1, false);
  ASSERT_EQ(out.size(), 3u);

  EXPECT_EQ(out[0].num_recv_tokens, 3);
  EXPECT_EQ(out[0].num_rows, 3);
  EXPECT_EQ(out[0].src_token, (I{0, 8, 9}));
  EXPECT_EQ(out[0].topk_idx, (I{0, -1, -1, 1, 1, -1}));
  EXPECT_EQ(out[0].weights, (F{1, 0, 0, 202, 211, 0}));
  EXPECT_EQ(out[0].expanded_rows, (I{0, -1, -1, 1, 2, -1}));
  EXPECT_EQ(out[0].tokens_per_expert, (I{1, 2}));
  EXPECT_EQ(out[0].expert_offsets, (I{0, 1, 3}));
  EXPECT_EQ(row_bits(out[0], 0, 2), tags(0, 0, 2));
  EXPECT_EQ(row_bits(out[0], 1, 2), tags(2, 0, 2));
  EXPECT_EQ(row_bits(out[0], 2, 2), tags(2, 1, 2));

  EXPECT_EQ(out[1].src_token, (I{1, 10}));
  EXPECT_EQ(out[1].topk_idx, (I{1, 0, 0, -1}));
  EXPECT_EQ(out[1].weights, (F{11, 12, 221, 0}));
  EXPECT_EQ(out[1].expanded_rows, (I{2, 0, 1, -1}));
  EXPECT_EQ(out[1].tokens_per_expert, (I{2, 1}));
  EXPECT_EQ(out[1].expert_offsets, (I{0, 2, 3}));
  EXPECT_EQ(row_bits(out[1], 1, 2), tags(2, 2, 2));

  EXPECT_EQ(out[2].src_token, (I{0, 8, 10, 11}));
  EXPECT_EQ(out[2].topk_idx, (I{-1, 1, 0, -1, -1, 1, -1, 0}));
  EXPECT_EQ(out[2].weights, (F{0, 2, 201, 0, 0, 222, 0, 232}));
  EXPECT_EQ(out[2].expanded_rows, (I{-1, 2, 0, -1, -1, 3, -1, 1}));
  EXPECT_EQ(out[2].expert_offsets, (I{0, 2, 4}));
  EXPECT_EQ(row_bits(out[2], 3, 2), tags(2, 3, 2));
  for (const DispatchOutput& o : out) {
    EXPECT_TRUE(o.aux.empty()) << "aux was not given";
    EXPECT_EQ(o.is_padding, std::vector<uint8_t>(size_t(o.num_rows), 0));
  }
}

TEST(ReferenceDispatch, ExpandedOrderingDuplicatesAndPadding) {
  const Problem p = make_problem(2, 3, 2, 4, 3);  // E_l = 2
  const std::vector<RankInputs> in = {make_rank(p, 0, {{1, 0, 1}, {3, 1, -1}, {-1, -1, -1}}, true),
                                      make_rank(p, 1, {{0, 2, 1}, {2, -1, 3}}, true)};
  const auto out = dispatch(p, in, /*expand=*/true, /*alignment=*/4, /*zero_padding=*/false);

  // Rank 0: expert 0 holds (0,0,k1), (1,0,k0); expert 1 holds (0,0,k0), (0,0,k2), (0,1,k1),
  // (1,0,k2): token (0,0) names expert 1 twice and gets two rows.
  EXPECT_EQ(out[0].num_recv_tokens, 3);
  EXPECT_EQ(out[0].num_rows, 8);
  EXPECT_EQ(out[0].tokens_per_expert, (I{2, 4}));
  EXPECT_EQ(out[0].expert_offsets, (I{0, 4, 8}));
  EXPECT_EQ(out[0].is_padding, (std::vector<uint8_t>{0, 0, 1, 1, 0, 0, 0, 0}));
  EXPECT_EQ(out[0].src_token, (I{0, 1, 3}));
  EXPECT_EQ(out[0].expanded_rows, (I{4, 0, 5, -1, 6, -1, 1, -1, 7}));
  EXPECT_EQ(out[0].weights, (F{2, 101, 0, 0, 1, 3, 12, 103}));
  EXPECT_TRUE(out[0].topk_idx.empty());
  const std::vector<uint16_t> zeros(2, 0);
  const std::vector<std::vector<uint16_t>> want_rows = {tags(0, 0, 2), tags(1, 0, 2), zeros,
                                                        zeros,         tags(0, 0, 2), tags(0, 0, 2),
                                                        tags(0, 1, 2), tags(1, 0, 2)};
  for (int64_t row = 0; row < 8; ++row) EXPECT_EQ(row_bits(out[0], row, 2), want_rows[row]);

  EXPECT_EQ(out[1].num_rows, 8);
  EXPECT_EQ(out[1].tokens_per_expert, (I{2, 2}));
  EXPECT_EQ(out[1].expert_offsets, (I{0, 4, 8}));
  EXPECT_EQ(out[1].is_padding, (std::vector<uint8_t>{0, 0, 1, 1, 0, 0, 1, 1}));
  EXPECT_EQ(out[1].src_token, (I{1, 3, 4}));
  EXPECT_EQ(out[1].expanded_rows, (I{4, -1, -1, -1, 0, -1, 1, -1, 5}));
  EXPECT_EQ(out[1].weights, (F{102, 111, 0, 0, 11, 113, 0, 0}));

  // Alignment 1: no padding, same order.
  const auto tight = dispatch(p, in, true, 1, true);
  EXPECT_EQ(tight[0].num_rows, 6);
  EXPECT_EQ(tight[0].expert_offsets, (I{0, 2, 6}));
  EXPECT_EQ(tight[0].expanded_rows, (I{2, 0, 3, -1, 4, -1, 1, -1, 5}));
  EXPECT_EQ(tight[0].is_padding, std::vector<uint8_t>(6, 0));

  // The compact layout carries the same bookkeeping for the same alignment.
  const auto compact = dispatch(p, in, false, 4, false);
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(compact[r].expanded_rows, out[r].expanded_rows);
    EXPECT_EQ(compact[r].expert_offsets, out[r].expert_offsets);
    EXPECT_EQ(compact[r].tokens_per_expert, out[r].tokens_per_expert);
  }
}

TEST(ReferenceDispatch, Fp8RowsAndScalesMoveVerbatim) {
  const Problem p = make_problem(2, 2, 256, 2, 1, /*fp8=*/true);
  std::vector<RankInputs> in(2);
  for (int32_t s = 0; s < 2; ++s) {
    in[s].num_tokens = 2;
    for (int i = 0; i < 2 * 256; ++i) in[s].x.push_back(uint8_t(s * 101 + i * 7));
    in[s].x_scales = {float(s) + 0.5f, float(s) + 1.5f, float(s) + 2.5f, float(s) + 3.5f};
    in[s].topk_idx = {1, -1};  // token 0 to rank 1, token 1 nowhere
  }
  for (bool expand : {false, true}) {
    const auto out = dispatch(p, in, expand, 4, true);
    EXPECT_EQ(out[0].num_rows, 0);
    ASSERT_EQ(out[1].num_rows, expand ? 4 : 2);
    for (int32_t s = 0; s < 2; ++s) {
      EXPECT_EQ(0, std::memcmp(&out[1].x[s * 256], &in[s].x[0], 256)) << "expand " << expand;
      EXPECT_EQ(out[1].x_scales[s * 2], float(s) + 0.5f);
      EXPECT_EQ(out[1].x_scales[s * 2 + 1], float(s) + 1.5f);
    }
    if (expand) {
      EXPECT_EQ(out[1].x_scales[4], 0.0f);
      EXPECT_EQ(out[1].x[2 * 256 + 3], 0);
    }
  }
}

TEST(ReferenceCombine, NoExpertsGivesBiasesOnly) {
  const Problem p = make_problem(2, 2, 1, 2, 2);
  std::vector<RankInputs> in = {make_rank(p, 0, {{-1, -1}, {-1, -1}}, false),
                                make_rank(p, 1, {}, false)};
  const auto layout = dispatch(p, in, true, 128, true);
  EXPECT_EQ(layout[0].num_rows, 0);
  EXPECT_EQ(layout[0].expert_offsets, (I{0, 0}));
  EXPECT_EQ(layout[1].num_recv_tokens, 0);
  std::vector<CombineRankInputs> cin(2);
  cin[0].scalars = {};
  auto y = combine(p, in, layout, true, cin, false);
  EXPECT_EQ(y[0].x, (std::vector<uint16_t>{0, 0}));
  EXPECT_TRUE(y[1].x.empty());
  // 0 + 1 + 3 * 2^-9 rounds up to 1 + 2^-7.
  cin[0].bias0 = {kOne, kOne};
  cin[0].bias1 = {0x3bc0, 0};
  y = combine(p, in, layout, true, cin, false);
  EXPECT_EQ(y[0].x, (std::vector<uint16_t>{kOnePlus2m7, kOne}));
}

// Two weighted terms on one expert rank: -1 * 1, then w * (1 + 2^-7) with the exact product
// 1 + 2^-15 + 2^-23 + 119 * 2^-31. The fma keeps the tail, the sum sits just above a bf16 tie
// and rounds up to 2^-15 (1 + 2^-7); rounding the product first loses it and lands on the tie.
TEST(ReferenceCombine, WeightedTermIsOneFusedMultiplyAdd) {
  const Problem p = make_problem(1, 1, 1, 2, 2);
  const float w = std::ldexp(16647671.0f, -24);
  for (bool at_source : {false, true}) {
    const std::vector<RankInputs> in = {one_token(p, {0, 1})};
    const auto layout = dispatch(p, in, true, 1, true);
    std::vector<CombineRankInputs> cin(1);
    cin[0].x = {kOne, kOnePlus2m7};  // row 0: expert 0 (k=0), row 1: expert 1 (k=1)
    cin[0].weights = {-1.0f, w};
    EXPECT_EQ(combine(p, in, layout, true, cin, at_source)[0].x[0], 0x3801);
    // Naming the experts the other way round flips k: the product is rounded first.
    const std::vector<RankInputs> swapped = {one_token(p, {1, 0})};
    const auto layout2 = dispatch(p, swapped, true, 1, true);
    EXPECT_EQ(combine(p, swapped, layout2, true, cin, at_source)[0].x[0], 0x3800);
  }
  volatile float product = w * 1.0078125f;  // the test's own premise: the two orders differ
  EXPECT_EQ(product - 1.0f, std::ldexp(1.0f, -15) + std::ldexp(1.0f, -23));
}

// Rows 1 and 2^-8 on rank 0, 2^-8 on rank 1: rank 0 rounds 1 + 2^-8 to even (1.0), so the
// expert reduction ends at 1.0; summing all three at the source gives 1 + 2^-7 exactly.
TEST(ReferenceCombine, ReduceAtExpertRoundsPerRank) {
  const Problem p = make_problem(2, 1, 1, 4, 3);
  const std::vector<RankInputs> in = {one_token(p, {0, 1, 2}), make_rank(p, 1, {}, false)};
  const auto layout = dispatch(p, in, true, 1, true);
  std::vector<CombineRankInputs> cin(2);
  cin[0].x = {kOne, kTwoM8};
  cin[1].x = {kTwoM8};
  EXPECT_EQ(combine(p, in, layout, true, cin, false)[0].x[0], kOne);
  EXPECT_EQ(combine(p, in, layout, true, cin, true)[0].x[0], kOnePlus2m7);
}

// Rows 1, 2^-8, 2^-24, 2^-24 from ranks 0..3: ascending rank order absorbs each 2^-24 into a
// tie that stays at 1 + 2^-8 (then 1.0 in bf16); k order (3, 2, 1, 0) would add 2^-23 first.
TEST(ReferenceCombine, CompactSumsRanksAscending) {
  const Problem p = make_problem(4, 1, 1, 4, 4);
  std::vector<RankInputs> in = {one_token(p, {3, 2, 1, 0})};
  for (int32_t r = 1; r < 4; ++r) in.push_back(make_rank(p, r, {}, false));
  const auto layout = dispatch(p, in, false, 1, false);
  std::vector<CombineRankInputs> cin(4);
  const uint16_t rows[4] = {kOne, kTwoM8, kTwoM24, kTwoM24};
  for (int32_t r = 0; r < 4; ++r) cin[r].x = {rows[r]};
  EXPECT_EQ(combine(p, in, layout, false, cin, false)[0].x[0], kOne);
  EXPECT_EQ(combine(p, in, layout, false, cin, true)[0].x[0], kOne) << "compact ignores source";
}

TEST(ReferenceCombine, BiasesAddedAfterRowsOneAtATime) {
  // Rows sum to 1 + 2^-8; each 2^-24 bias alone rounds away (tie to even), together they'd not.
  const Problem p2 = make_problem(2, 1, 1, 2, 2);
  const std::vector<RankInputs> in2 = {one_token(p2, {0, 1}), make_rank(p2, 1, {}, false)};
  const auto layout2 = dispatch(p2, in2, false, 1, false);
  std::vector<CombineRankInputs> cin2(2);
  cin2[0].x = {kOne};
  cin2[1].x = {kTwoM8};
  cin2[0].bias0 = {kTwoM24};
  cin2[0].bias1 = {kTwoM24};
  EXPECT_EQ(combine(p2, in2, layout2, false, cin2, false)[0].x[0], kOne);

  // Rows sum to A = 1 + 2^-8 + 2^-23 (odd last bit). A + 2^-24 - 2^-24 ends at 1 + 2^-8 + 2^-22
  // (rounds up in bf16); A - 2^-24 + 2^-24 ends at 1 + 2^-8 (a bf16 tie, rounds down).
  const Problem p = make_problem(1, 1, 1, 3, 3);
  const std::vector<RankInputs> in = {one_token(p, {0, 1, 2})};
  const auto layout = dispatch(p, in, true, 1, true);
  std::vector<CombineRankInputs> cin(1);
  cin[0].x = {kOne, kTwoM8, kTwoM23};
  cin[0].bias0 = {kTwoM24};
  cin[0].bias1 = {kMinusTwoM24};
  EXPECT_EQ(combine(p, in, layout, true, cin, true)[0].x[0], kOnePlus2m7);
  std::swap(cin[0].bias0, cin[0].bias1);
  EXPECT_EQ(combine(p, in, layout, true, cin, true)[0].x[0], kOne);
}

TEST(ReferenceCombine, ScalarsArePickedFromTheOwnerRank) {
  const Problem p = make_problem(2, 2, 1, 4, 3);  // E_l = 2
  const std::vector<RankInputs> in = {make_rank(p, 0, {{2, 0, -1}, {3, 3, 1}}, false),
                                      make_rank(p, 1, {{1, -1, 2}}, false)};
  // Compact: every (n, k) slot of rank r holds 1000 (r + 1) + 10 n + k, local or not.
  const auto compact = dispatch(p, in, false, 1, false);
  std::vector<CombineRankInputs> cin(2);
  for (int32_t r = 0; r < 2; ++r) {
    ASSERT_EQ(compact[r].num_recv_tokens, 3);
    cin[r].x.assign(3, 0);
    for (int n = 0; n < 3; ++n) {
      for (int k = 0; k < 3; ++k) cin[r].scalars.push_back(float(1000 * (r + 1) + 10 * n + k));
    }
  }
  auto y = combine(p, in, compact, false, cin, false);
  EXPECT_EQ(y[0].scalars, (F{2000, 1001, 0, 2010, 2011, 1012}));
  EXPECT_EQ(y[1].scalars, (F{1020, 0, 2022}));

  // Expanded: row holds 1000 (r + 1) + row.
  const auto expanded = dispatch(p, in, true, 1, false);
  ASSERT_EQ(expanded[0].num_rows, 3);
  ASSERT_EQ(expanded[1].num_rows, 4);
  for (int32_t r = 0; r < 2; ++r) {
    const int64_t rows = expanded[r].num_rows;
    cin[r].x.assign(size_t(rows), 0);
    cin[r].scalars.clear();
    for (int64_t row = 0; row < rows; ++row) cin[r].scalars.push_back(float(1000 * (r + 1) + row));
  }
  y = combine(p, in, expanded, true, cin, true);
  EXPECT_EQ(y[0].scalars, (F{2000, 1000, 0, 2002, 2003, 1001}));
  EXPECT_EQ(y[1].scalars, (F{1002, 0, 2001}));
}

TEST(ReferenceCombineBackward, HandWorkedRows) {
  const Problem p = make_problem(2, 2, 2, 2, 2);  // one expert per rank
  const std::vector<RankInputs> in = {make_rank(p, 0, {{0, 1}, {1, -1}}, false),
                                      make_rank(p, 1, {{0, 0}}, false)};
  const auto layout = dispatch(p, in, true, 2, true);
  // Rank 0 rows: (0,0,k0), (1,0,k0), (1,0,k1), padding. Rank 1 rows: (0,0,k1), (0,1,k0).
  ASSERT_EQ(layout[0].num_rows, 4);
  ASSERT_EQ(layout[1].num_rows, 2);
  auto bf = [](float v) {
    uint32_t w;
    std::memcpy(&w, &v, 4);
    return uint16_t(w >> 16);  // exact for the values used here
  };
  const std::vector<std::vector<uint16_t>> grad_y = {{bf(1), bf(3), bf(-2), bf(0.5f)},
                                                     {bf(1), bf(-1)}};
  const std::vector<std::vector<uint16_t>> x = {
      {bf(2), bf(4), bf(0.5f), bf(1), bf(-1), bf(1), bf(7), bf(7)}, {bf(1), bf(1), bf(3), bf(-2)}};
  const std::vector<std::vector<float>> w = {{1.0f / 3.0f, 0.5f, -2.0f, 9.0f}, {4.0f, 0.25f}};
  const auto out = combine_backward(p, in, layout, grad_y, x, w);
  // bf16(1/3) rounds up to 0x3eab; (1/3) * 3 is 1.0 in fp32.
  EXPECT_EQ(out[0].grad_x,
            (std::vector<uint16_t>{0x3eab, kOne, 0x3f00, 0xbf00, 0xc000, 0x4000, 0, 0}));
  EXPECT_EQ(out[0].grad_weights, (std::vector<double>{14, -0.5, -2, 0}));
  EXPECT_EQ(out[0].magnitude, (std::vector<double>{14, 1.5, 2, 0}));
  EXPECT_EQ(out[1].grad_x, (std::vector<uint16_t>{0x4080, 0x4140, 0xbf00, 0x3e00}));
  EXPECT_EQ(out[1].grad_weights, (std::vector<double>{4, -7}));
  EXPECT_EQ(out[1].magnitude, (std::vector<double>{4, 7}));
  EXPECT_TRUE(grad_weight_ok(-7.00001f, -7.0, 7.0));
  EXPECT_FALSE(grad_weight_ok(-7.001f, -7.0, 7.0));
}

TEST(ReferenceErrors, RejectsOutOfRangeExperts) {
  const Problem p = make_problem(1, 1, 1, 2, 1);
  EXPECT_THROW(dispatch(p, {one_token(p, {2})}, false, 1, false), std::invalid_argument);
  EXPECT_THROW(dispatch(p, {one_token(p, {-2})}, false, 1, false), std::invalid_argument);
}

// The random inputs cover what the transport tests rely on, and the reference's two layouts
// agree with each other on them.
TEST(ReferenceRandom, CoverageAndLayoutInvariants) {
  using testing::RandomConfig;
  std::set<int64_t> hiddens, alignments;
  int zero_rank = 0, full_rank = 0, empty_token = 0, one_rank_token = 0, duplicate = 0, fp8 = 0;
  for (int32_t num_ranks : {1, 2, 3, 4, 8}) {
    for (uint64_t seed = 0; seed < 60; ++seed) {
      const RandomConfig c = testing::draw_config(seed * 7919 + 3, num_ranks);
      SCOPED_TRACE(c.describe());
      ASSERT_EQ(c.num_experts % num_ranks, 0);
      ASSERT_LE(c.num_experts, std::max(64, num_ranks));
      ASSERT_TRUE(c.num_topk >= 1 && c.num_topk <= 9);
      ASSERT_TRUE(c.max_tokens >= 1 && c.max_tokens <= 48 && c.hidden <= 256);
      ASSERT_TRUE(!c.fp8 || c.hidden % 128 == 0);
      hiddens.insert(c.hidden);
      alignments.insert(c.expert_alignment);
      fp8 += c.fp8;
      const Problem p = c.problem();
      const auto in = testing::draw_dispatch_inputs(c);
      const auto again = testing::draw_dispatch_inputs(c);
      for (int32_t s = 0; s < num_ranks; ++s) {
        ASSERT_EQ(in[s].topk_idx, again[s].topk_idx);
        ASSERT_EQ(in[s].x, again[s].x);
        zero_rank += in[s].num_tokens == 0;
        full_rank += in[s].num_tokens == c.max_tokens;
        ASSERT_EQ(in[s].weights.size(), c.with_weights ? in[s].topk_idx.size() : 0);
        for (float w : in[s].weights) ASSERT_NE(w, 0.0f);
        for (int64_t t = 0; t < in[s].num_tokens; ++t) {
          std::set<int64_t> experts, ranks;
          int valid = 0;
          for (int32_t k = 0; k < c.num_topk; ++k) {
            const int64_t e = in[s].topk_idx[t * c.num_topk + k];
            if (e < 0) continue;
            ++valid;
            experts.insert(e);
            ranks.insert(e / p.local_experts());
          }
          empty_token += valid == 0;
          one_rank_token += valid > 1 && ranks.size() == 1;
          duplicate += int(experts.size()) < valid;
        }
      }
      const auto compact = dispatch(p, in, false, c.expert_alignment, c.zero_padding);
      const auto expanded = dispatch(p, in, true, c.expert_alignment, c.zero_padding);
      const int64_t row_bytes = p.row_bytes();
      for (int32_t r = 0; r < num_ranks; ++r) {
        const DispatchOutput& a = compact[r];
        const DispatchOutput& b = expanded[r];
        ASSERT_EQ(a.src_token, b.src_token);
        ASSERT_EQ(a.expanded_rows, b.expanded_rows);
        ASSERT_EQ(b.expert_offsets.back(), b.num_rows);
        for (size_t e = 0; e + 1 < b.expert_offsets.size(); ++e) {
          ASSERT_EQ(b.expert_offsets[e] % c.expert_alignment, 0);
        }
        std::vector<int> hits(size_t(b.num_rows), 0);
        for (int64_t n = 0; n < a.num_recv_tokens; ++n) {
          if (n > 0) {
            ASSERT_LT(a.src_token[n - 1], a.src_token[n]);
          }
          for (int32_t k = 0; k < c.num_topk; ++k) {
            const int32_t row = a.expanded_rows[n * c.num_topk + k];
            ASSERT_EQ(row >= 0, a.topk_idx[n * c.num_topk + k] >= 0);
            if (row < 0) continue;
            ++hits[size_t(row)];
            ASSERT_EQ(0, std::memcmp(&b.x[row * row_bytes], &a.x[n * row_bytes], row_bytes));
          }
        }
        for (int64_t row = 0; row < b.num_rows; ++row)
          ASSERT_EQ(hits[row], b.is_padding[row] ? 0 : 1);
      }
      // Combine and backward run on every drawn shape (their values are pinned above).
      const auto& layout = c.expand ? expanded : compact;
      const auto cin = testing::draw_combine_inputs(c, in, layout);
      const auto y = combine(p, in, layout, c.expand, cin, c.reduce_at_source);
      for (int32_t s = 0; s < num_ranks; ++s) {
        ASSERT_EQ(y[s].x.size(), size_t(in[s].num_tokens * c.hidden));
      }
    }
  }
  EXPECT_EQ(hiddens.size(), 6u);
  EXPECT_EQ(alignments, (std::set<int64_t>{1, 4, 128}));
  EXPECT_GT(fp8, 20);
  EXPECT_GT(zero_rank, 20);
  EXPECT_GT(full_rank, 20);
  EXPECT_GT(empty_token, 100);
  EXPECT_GT(one_rank_token, 100);
  EXPECT_GT(duplicate, 10);
}

TEST(RandomProblem, FirstMismatchNamesTheElement) {
  const uint16_t got[4] = {1, 2, 0xabcd, 5};
  const uint16_t want[4] = {1, 2, 0x1234, 4};
  EXPECT_EQ(testing::first_mismatch(got, got, 2, 4, "x"), "");
  EXPECT_EQ(testing::first_mismatch(got, want, 2, 4, "x"),
            "x: element 2 got 0xabcd want 0x1234 (2 of 4 elements differ)");
  std::mt19937_64 rng(1);
  for (int i = 0; i < 1000; ++i) {
    const uint16_t bits = testing::random_bf16(rng);
    const float value = plan::bf16_bits_to_float(bits);
    ASSERT_TRUE(std::isfinite(value) && value != 0.0f);
  }
}

// The low-latency oracle: R = 2, E_l = 2, K = 2, S_ll = 3. Rank 0 routes token 0 to {1, 2},
// token 1 to {3, 3}, token 2 to {-1, 0}; rank 1 its token 0 to {2, 0}. Regions hold R * S_ll = 6
// rows per expert; src_info is (s * 3 + t) * 2 + k, the canonical order is its ascending order.
TEST(ReferenceLowLatency, CanonicalRowsCombineAndBackward) {
  const Problem p = make_problem(2, 3, 1, 4, 2);
  const std::vector<RankInputs> in = {make_rank(p, 0, {{1, 2}, {3, 3}, {-1, 0}}, true),
                                      make_rank(p, 1, {{2, 0}}, true)};
  const auto out = low_latency_dispatch(p, in);
  ASSERT_EQ(out.size(), 2u);
  auto region = [&](I expert0, I expert1) {  // src_info of both experts, -1 past the counts
    expert0.resize(6, -1);
    expert1.resize(6, -1);
    expert0.insert(expert0.end(), expert1.begin(), expert1.end());
    return expert0;
  };
  EXPECT_EQ(out[0].counts, (I{2, 1}));
  EXPECT_EQ(out[0].src_info, region({5, 7}, {0}));
  EXPECT_EQ(out[1].counts, (I{2, 2}));
  EXPECT_EQ(out[1].src_info, region({1, 6}, {2, 3}));  // token 1 names expert 3 twice: two rows
  F w0(12, 0.0f), w1(12, 0.0f);
  w0[0] = 22, w0[1] = 102, w0[6] = 1;
  w1[0] = 2, w1[1] = 101, w1[6] = 11, w1[7] = 12;
  EXPECT_EQ(out[0].weights, w0);
  EXPECT_EQ(out[1].weights, w1);
  EXPECT_TRUE(out[0].aux.empty());
  EXPECT_EQ(row_bits_of(out[1].x, 7, 1), tags(0, 1, 1));  // expert 3's second row: token 1 again
  EXPECT_EQ(row_bits_of(out[0].x, 1, 1), tags(1, 0, 1));

  // Expert outputs and per-row weights: y[t] = sum over k of w_row * x_row, one rounding.
  std::vector<LowLatencyCombineRankInputs> cin(2);
  cin[0].x.assign(12, 0);
  cin[1].x.assign(12, 0);
  cin[0].weights.assign(12, 0.0f);
  cin[1].weights.assign(12, 0.0f);
  cin[0].scalars.assign(12, 0.0f);
  cin[1].scalars.assign(12, 0.0f);
  cin[0].x[0] = 0x3f80, cin[0].x[1] = 0x4000, cin[0].x[6] = 0x4080;  // 1, 2, 4
  cin[1].x[0] = 0x4100, cin[1].x[1] = 0x4180, cin[1].x[6] = 0x3f00, cin[1].x[7] = 0x3e80;
  cin[0].weights[0] = 1, cin[0].weights[1] = 2, cin[0].weights[6] = 3;
  cin[1].weights[0] = 1, cin[1].weights[1] = -1, cin[1].weights[6] = 2, cin[1].weights[7] = 4;
  cin[0].scalars[0] = 0.5f, cin[0].scalars[1] = 0.25f, cin[0].scalars[6] = 0.125f;
  cin[1].scalars[0] = 10, cin[1].scalars[1] = 20, cin[1].scalars[6] = 30, cin[1].scalars[7] = 40;
  const auto y = low_latency_combine(p, in, out, cin);
  EXPECT_EQ(y[0].x, (std::vector<uint16_t>{0x41a0, 0x4000, 0x3f80}));  // 4*3 + 8*1, 1 + 1, 1
  EXPECT_EQ(y[1].x, (std::vector<uint16_t>{0xc140}));                  // 16*-1 + 2*2
  EXPECT_EQ(y[0].scalars, (F{0.125f, 10, 30, 40, 0, 0.5f}));
  EXPECT_EQ(y[1].scalars, (F{20, 0.25f}));

  // Backward: grad_x = bf16(w_row * grad_y[t]), grad_weights = grad_y[t] * x_row (H = 1).
  const std::vector<std::vector<uint16_t>> grad_y = {{0x3f80, 0x4000, 0x4080}, {0x4100}};
  const auto back = low_latency_combine_backward(p, in, out, grad_y, cin);
  EXPECT_EQ(back[0].grad_x[0], 0x4080);  // (0, 2): 1 * 4
  EXPECT_EQ(back[0].grad_x[1], 0x4180);  // (1, 0): 2 * 8
  EXPECT_EQ(back[0].grad_x[6], 0x4040);  // (0, 0): 3 * 1
  EXPECT_EQ(back[0].grad_x[2], 0);
  EXPECT_EQ(back[0].grad_weights[0], 4.0);
  EXPECT_EQ(back[0].grad_weights[1], 16.0);
  EXPECT_EQ(back[0].grad_weights[6], 4.0);
  EXPECT_EQ(back[1].grad_x[7], 0x4100);  // (0, 1, k 1): 4 * 2
  EXPECT_EQ(back[1].grad_weights[7], 0.5);
}

TEST(ReferenceLowLatency, AnExpertPastItsRegionIsInvalid) {
  const Problem p = make_problem(1, 1, 1, 1, 2);  // one expert, R * S_ll = 1 row
  EXPECT_THROW(low_latency_dispatch(p, {make_rank(p, 0, {{0, 0}}, false)}), std::invalid_argument);
  EXPECT_NO_THROW(low_latency_dispatch(p, {make_rank(p, 0, {{0, -1}}, false)}));
}

}  // namespace
}  // namespace epx::reference
