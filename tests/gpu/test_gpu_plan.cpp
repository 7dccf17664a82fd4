// The device routing plan (src/cuda/kernels/plan_kernels.cu) against plan::plan_source, entry for
// entry, on fresh random routings: token counts around the tile size (0, 1, 255, 256, 257, ...),
// K from 1 to 64, 1 to 16 ranks (the plan is per source, so more ranks than GPUs is fine),
// -1 experts, repeated experts within a token, int32 and int64 indices, and invalid indices
// (status and the first bad value). Runs in a forked child, as the other GPU suites do.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <iostream>
#include <random>
#include <sstream>
#include <vector>

#include "common/cuda_device_ops.hpp"
#include "common/multi_process.hpp"
#include "cuda/kernels/kernels.hpp"
#include "plan/source_plan.hpp"

namespace epx::testing {
namespace {

template <typename T>
T* to_device(const std::vector<T>& host) {
  void* p = nullptr;
  check_cuda(cudaMalloc(&p, std::max<size_t>(16, host.size() * sizeof(T))), "cudaMalloc");
  if (!host.empty()) {
    check_cuda(cudaMemcpy(p, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice),
               "upload");
  }
  return static_cast<T*>(p);
}

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  if (count) {
    check_cuda(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost),
               "download");
  }
  return host;
}

template <typename T>
std::string first_difference(const char* what, const std::vector<T>& got,
                             const std::vector<T>& want) {
  if (got.size() != want.size()) return std::string(what) + ": size differs";
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      std::ostringstream out;
      out << what << "[" << i << "] = " << got[i] << ", expected " << want[i];
      return out.str();
    }
  }
  return "";
}

// One random routing through the kernel and the host plan; "" when they agree.
std::string check_one(uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto pick = [&](std::initializer_list<int64_t> values) {
    return *(values.begin() + rng() % values.size());
  };
  const int64_t tokens = pick({0, 1, 7, 128, 255, 256, 257, 511, 512, 513, 1000, 4096, 5000});
  const int32_t topk = static_cast<int32_t>(pick({1, 2, 3, 6, 8, 9, 16, 64}));
  const int32_t ranks = static_cast<int32_t>(pick({1, 2, 3, 4, 8, 16}));
  const int32_t experts = ranks * static_cast<int32_t>(pick({1, 3, 32}));
  const bool int64 = rng() % 2;
  const int masked_percent = static_cast<int>(pick({0, 10, 60}));
  const bool bad = rng() % 5 == 0 && tokens > 0;
  std::vector<int64_t> topk64(tokens * topk);
  for (auto& e : topk64) {
    e = int64_t(rng() % 100) < masked_percent ? -1 : int64_t(rng() % experts);
  }
  if (bad) topk64[rng() % topk64.size()] = rng() % 2 ? experts + int64_t(rng() % 5) : -7;
  std::vector<int32_t> topk32(topk64.begin(), topk64.end());
  const plan::SourcePlan want =
      plan::plan_source(int64 ? nullptr : topk32.data(), int64 ? topk64.data() : nullptr, tokens,
                        topk, experts, ranks);

  const void* idx = int64 ? static_cast<const void*>(to_device(topk64))
                          : static_cast<const void*>(to_device(topk32));
  cuda::PlanParams p{};
  p.topk_idx = idx;
  p.topk_int64 = int64;
  p.num_tokens = tokens;
  p.num_topk = topk;
  p.num_experts = experts;
  p.num_ranks = ranks;
  p.send_slot = to_device(std::vector<int32_t>(tokens * ranks, 0x7f7f7f7f));
  p.expert_slot = to_device(std::vector<int32_t>(tokens * topk, 0x7f7f7f7f));
  p.topk32 = to_device(std::vector<int32_t>(tokens * topk, 0));
  p.rank_counts = to_device(std::vector<int32_t>(ranks, -5));
  p.expert_counts = to_device(std::vector<int32_t>(experts, -5));
  p.plan_status = to_device(std::vector<int64_t>(2, -5));
  p.tile_counts = to_device(
      std::vector<int32_t>(int64_t(cuda::plan_tiles(tokens, topk)) * (experts + ranks), -5));
  p.first_bad = to_device(std::vector<unsigned long long>(1, ~0ull));
  // Twice on the same scratch: the plan must leave it ready for the next one.
  std::string failure;
  for (int round = 0; round < 2 && failure.empty(); ++round) {
    cuda::launch_plan(p, nullptr);
    check_cuda(cudaDeviceSynchronize(), "plan");
    const auto status = to_host(p.plan_status, 2);
    failure = first_difference("status", status,
                               std::vector<int64_t>{want.status, want.status ? want.bad_value : 0});
    if (!failure.empty() || want.status != plan::kRoutingOk) continue;
    for (const std::string& f :
         {first_difference("send_slot", to_host(p.send_slot, tokens * ranks), want.send_slot),
          first_difference("expert_slot", to_host(p.expert_slot, tokens * topk), want.expert_slot),
          first_difference("rank_counts", to_host(p.rank_counts, ranks), want.rank_counts),
          first_difference("expert_counts", to_host(p.expert_counts, experts), want.expert_counts),
          first_difference("topk32", to_host(p.topk32, tokens * topk), topk32)}) {
      if (failure.empty()) failure = f;
    }
  }
  for (const void* ptr :
       {idx, static_cast<const void*>(p.send_slot), static_cast<const void*>(p.expert_slot),
        static_cast<const void*>(p.topk32), static_cast<const void*>(p.rank_counts),
        static_cast<const void*>(p.expert_counts), static_cast<const void*>(p.plan_status),
        static_cast<const void*>(p.tile_counts), static_cast<const void*>(p.first_bad)}) {
    cudaFree(const_cast<void*>(ptr));
  }
  if (failure.empty()) return "";
  std::ostringstream out;
  out << "seed " << seed << " (S=" << tokens << " K=" << topk << " R=" << ranks << " E=" << experts
      << (int64 ? " int64" : " int32") << " masked " << masked_percent << "%"
      << (bad ? " with a bad index" : "") << "): " << failure;
  return out.str();
}

TEST(GpuPlan, MatchesHostPlan) {
  EPX_REQUIRE_GPUS(1);
  const uint64_t base = base_seed("epx-gpu-plan");
  const int count = 300;
  const auto outcomes = run_ranks(
      1,
      [&](int) -> std::string {
        check_cuda(cudaSetDevice(0), "cudaSetDevice");
        for (int i = 0; i < count; ++i) {
          const std::string failure = check_one(base * 7919 + i);
          if (!failure.empty()) return failure;
        }
        return "";
      },
      300);
  ASSERT_EQ(failures(outcomes), "");
  std::cout << "[epx-gpu-plan] " << count << " routings: device plan == host plan" << std::endl;
}

}  // namespace
}  // namespace epx::testing
