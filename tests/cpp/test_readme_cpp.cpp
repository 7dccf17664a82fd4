// README.md's C++ snippets as README shows them (extract_snippets.cmake copies them into
// readme_snippets.hpp at build time), and the layer they define run on one host-transport rank.
// README's make_buffer (the CUDA transport) is compiled and linked, not run: CI has no GPU.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "readme_snippets.hpp"

// The `experts` README declares and leaves to its reader: here every expert is the identity.
epx::TensorView experts(const epx::TensorView& rows, const std::vector<int64_t>& offsets) {
  EXPECT_EQ(offsets.back(), rows.size(0));  // the segments cover every row
  return rows;
}

namespace {

uint16_t bf16_bits(float exact) {  // `exact` must be a bf16 value: its upper 16 bits
  uint32_t bits;
  std::memcpy(&bits, &exact, sizeof(bits));
  return uint16_t(bits >> 16);
}

TEST(Readme, MoeLayerRunsOnTheHostTransport) {
  constexpr int64_t kTokens = 6, kHidden = 16, kExperts = 4, kTopk = 2;
  epx::Buffer buffer(epx::Comm::host(0, 1, "readme-" + std::to_string(getpid())),
                     {.max_tokens_per_rank = kTokens,
                      .hidden = kHidden,
                      .num_experts = kExperts,
                      .num_topk = kTopk});
  // Weights 1/4 and 3/4 of two identity experts: y = x exactly, in bf16 as in fp32.
  std::vector<uint16_t> x(kTokens * kHidden);
  std::vector<int32_t> topk_idx(kTokens * kTopk);
  std::vector<float> weights(kTokens * kTopk);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t h = 0; h < kHidden; ++h) x[t * kHidden + h] = bf16_bits(0.5f * float(t - h));
    topk_idx[t * kTopk] = int32_t(t % kExperts);
    topk_idx[t * kTopk + 1] = int32_t((t + 1) % kExperts);
    weights[t * kTopk] = 0.25f;
    weights[t * kTopk + 1] = 0.75f;
  }
  const epx::Device cpu = epx::Device::cpu();
  const epx::Tensor y = moe_layer(
      buffer, epx::TensorView(x.data(), epx::DType::kBFloat16, {kTokens, kHidden}, cpu),
      epx::TensorView(topk_idx.data(), epx::DType::kInt32, {kTokens, kTopk}, cpu),
      epx::TensorView(weights.data(), epx::DType::kFloat32, {kTokens, kTopk}, cpu), nullptr);
  ASSERT_EQ(y.view.shape, (std::vector<int64_t>{kTokens, kHidden}));
  const std::vector<uint16_t> got(y.ptr<uint16_t>(), y.ptr<uint16_t>() + x.size());
  EXPECT_EQ(got, x);
}

}  // namespace
