// The CUDA transport against the reference, bit for bit, on the GPUs of this machine: the same
// random scenarios as the host tests (one process per GPU, the NCCL unique id through a file),
// a CUDA-graph capture and replay of sync_counts=false dispatch + combine, invalid routing on one
// rank, bad input on one rank, and a peer that never arrives (timeout naming rank and phase).
// Runs on as many GPUs as are visible (up to 2 for the fixed tests; one GPU still checks every
// kernel, with the rank's own workspace as its only peer); skips with the reason where none is.
// EPX_GPU_CONFIGS=<n> sets the random configurations per rank count (default 60);
// EPX_TEST_SEED=<n> replays a run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <thread>

#include "common/arena_allocator.hpp"
#include "common/cuda_device_ops.hpp"
#include "common/gpu_test_support.hpp"
#include "common/graph_replay.hpp"
#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "common/multi_process.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() { return ::epx::testing::base_seed("epx-gpu"); }

std::string id_file() { return "/tmp/" + unique_name("epx-gpu") + ".id"; }

#define REQUIRE_GPUS(n) EPX_REQUIRE_GPUS(n)

class GpuRandom : public ::testing::TestWithParam<int> {};

TEST_P(GpuRandom, MatchesReferenceBitForBit) {
  const int num_ranks = GetParam();
  REQUIRE_GPUS(num_ranks);
  const int count = env_int("EPX_GPU_CONFIGS", 60);
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(num_ranks) * 10007ull;
  const std::string path = id_file();
  const auto outcomes = run_ranks(num_ranks, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, num_ranks, path);
    const DeviceOps ops = cuda_device_ops(rank, ctx.stream);
    for (int i = 0; i < count; ++i) {
      const uint64_t seed = seed0 + i;
      const RandomConfig config = draw_config(seed, num_ranks);
      Buffer buffer(ctx.comm, buffer_config_for(config), poisoned_cuda_allocator());
      for (const RandomConfig& c : {config, other_layout_config(config)}) {
        const std::string failure = run_scenario(buffer, c, rank, ops);
        if (!failure.empty()) return "seed " + std::to_string(seed) + ": " + failure;
      }
    }
    return "";
  }, 540);
  const std::string failed = failures(outcomes);
  ASSERT_TRUE(failed.empty()) << failed;
  std::cout << "[epx-gpu] R=" << num_ranks << ": " << 2 * count
            << " scenarios bit-exact with the reference" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Ranks, GpuRandom, ::testing::Values(1, 2, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// A few small configurations, for compute-sanitizer (memcheck, racecheck).
// Ranks for the fixed tests: 2 where possible.
int fixed_ranks() { return gpu_count() >= 2 ? 2 : 1; }

TEST(GpuSmall, Scenarios) {
  REQUIRE_GPUS(1);
  const int n = fixed_ranks();
  const std::string path = id_file();
  const auto outcomes = run_ranks(n, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, n, path);
    const DeviceOps ops = cuda_device_ops(rank, ctx.stream);
    for (uint64_t seed = 11; seed < 14; ++seed) {
      RandomConfig config = draw_config(seed, n);
      config.max_tokens = 8;
      config.hidden = 128;
      config.fp8 = false;
      Buffer buffer(ctx.comm, buffer_config_for(config), poisoned_cuda_allocator());
      const std::string failure = run_scenario(buffer, config, rank, ops);
      if (!failure.empty()) return failure;
    }
    return "";
  }, 540);
  EXPECT_EQ(failures(outcomes), "");
}

// sync_counts=false dispatch + combine captured once in a CUDA graph and replayed with new
// inputs (tests/common/graph_replay.hpp).
TEST(GpuGraph, CaptureAndReplay) {
  REQUIRE_GPUS(1);
  const int n = fixed_ranks();
  const std::string path = id_file();
  const auto outcomes = run_ranks(n, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, n, path);
    const RandomConfig config = graph_config(base_seed() ^ 0x9a9a, n);
    Buffer buffer(ctx.comm, buffer_config_for(config), std::make_shared<ArenaAllocator>(1 << 28));
    return graph_replay_scenario(buffer, config, rank, ctx.stream,
                                 cuda_device_ops(rank, ctx.stream));
  }, 300);
  EXPECT_EQ(failures(outcomes), "");
}

// The expected error on every rank, then a valid scenario on the same buffer.
void expect_all_raise(int n, ErrorCode code, const std::string& needle,
                      const std::function<void(Buffer&, int, cudaStream_t)>& bad) {
  const std::string path = id_file();
  const auto outcomes = run_ranks(n, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, n, path);
    RandomConfig config = draw_config(4242, n);
    config.fp8 = false;
    config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);  // R=2 draws S_max=2
    Buffer buffer(ctx.comm, buffer_config_for(config, 20), poisoned_cuda_allocator());
    try {
      bad(buffer, rank, ctx.stream);
      buffer.synchronize(ctx.stream);
      return "no error was raised";
    } catch (const Error& error) {
      const std::string what = error.what();
      std::cout << "[epx-gpu] rank " << rank << " raised as expected: " << what << std::endl;
      if (error.code() != code) return "wrong code: " + what;
      if (what.find(needle) == std::string::npos) return "message lacks '" + needle + "': " + what;
    }
    return run_scenario(buffer, config, rank, cuda_device_ops(rank, ctx.stream));
  }, 120);
  EXPECT_EQ(failures(outcomes), "");
}

TEST(GpuErrors, InvalidRoutingOnOneRankRaisesEverywhere) {
  REQUIRE_GPUS(1);
  const int n = fixed_ranks();  // the last rank passes the bad value
  expect_all_raise(n, ErrorCode::kInvalidRouting,
                   "rank " + std::to_string(n - 1) + " passed topk_idx value",
                   [n](Buffer& b, int rank, cudaStream_t stream) {
                     TinyInputs in =
                         tiny_inputs(b, rank, rank == n - 1 ? b.config().num_experts : 0, rank, stream);
                     b.dispatch(in.view, DispatchOptions{}, stream);
                   });
}

TEST(GpuErrors, BadInputOnOneRankAbortsThePeer) {
  REQUIRE_GPUS(2);
  expect_all_raise(2, ErrorCode::kInvalidArgument, "", [](Buffer& b, int rank, cudaStream_t stream) {
    TinyInputs in = tiny_inputs(b, rank, 0, rank, stream);
    if (rank == 0) in.view.x.dtype = DType::kFloat32;
    b.dispatch(in.view, DispatchOptions{}, stream);
  });
}

TEST(GpuErrors, WrongDeviceTensor) {
  REQUIRE_GPUS(1);
  expect_all_raise(fixed_ranks(), ErrorCode::kInvalidArgument, "must be on cuda",
                   [](Buffer& b, int rank, cudaStream_t stream) {
                     TinyInputs in = tiny_inputs(b, rank, 0, rank, stream);
                     in.view.x.device = Device::cpu();
                     b.dispatch(in.view, DispatchOptions{}, stream);
                   });
}

// Buffer::num_sms(): the blocks per kernel, BufferConfig::num_sms or else min(24, the SMs).
TEST(GpuBuffer, NumSmsIsTheBlockBudget) {
  REQUIRE_GPUS(1);
  const std::string path = id_file();
  const auto outcomes = run_ranks(1, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, 1, path);
    cudaDeviceProp properties{};
    check_cuda(cudaGetDeviceProperties(&properties, rank), "cudaGetDeviceProperties");
    BufferConfig config = buffer_config_for(draw_config(7, 1));
    const int by_default = Buffer(ctx.comm, config).num_sms();
    config.num_sms = 5;
    const int chosen = Buffer(ctx.comm, config).num_sms();
    if (by_default != std::min(24, properties.multiProcessorCount) || chosen != 5) {
      return "num_sms() " + std::to_string(by_default) + " by default (" +
             std::to_string(properties.multiProcessorCount) + " SMs), " +
             std::to_string(chosen) + " for 5";
    }
    return "";
  }, 120);
  EXPECT_EQ(failures(outcomes), "");
}

// Rank 1 never calls dispatch: rank 0's kernel gives up after the timeout and the host raises
// kTimeout naming the phase and the missing rank, instead of hanging.
TEST(GpuTimeout, MissingPeerTimesOut) {
  REQUIRE_GPUS(2);
  const std::string path = id_file();
  const auto outcomes = run_ranks(2, [&](int rank) -> std::string {
    RankContext ctx = open_rank(rank, 2, path);
    RandomConfig config = draw_config(99, 2);
    config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
    Buffer buffer(ctx.comm, buffer_config_for(config, 2.0));
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::seconds(6));  // alive, but never arrives
      return "";
    }
    TinyInputs in = tiny_inputs(buffer, rank, 0, rank, ctx.stream);
    return dispatch_expecting_missing_peer(buffer, in.view, ctx.stream, "epx-gpu", rank, 1);
  }, 120);
  EXPECT_EQ(failures(outcomes), "");
}

}  // namespace
}  // namespace epx::testing
