// The CUDA transport against the reference, bit for bit, with one process per rank: the random
// scenarios of the host tests (every fourth at production shapes), a CUDA-graph capture and
// replay of sync_counts=false dispatch + combine, invalid routing and bad input on one rank,
// ranks that disagree about an operation, and a peer that never arrives (a timeout naming rank
// and phase, after which the buffer is unusable on every rank).
// Two ways to join the processes, each case run on both where the machine allows:
//   - NCCL, one GPU per rank (cases of R ranks skip with fewer GPUs);
//   - CUDA IPC, any number of ranks on the visible GPUs (rank r on GPU r % GPUs), so R = 2, 3, 4
//     run on one GPU (their kernels time-slice there: slow waits, same results).
// EPX_GPU_CONFIGS=<n> sets the random configurations per case (default 60 for NCCL, 12 for
// IPC); EPX_TEST_SEED=<n> replays a run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "common/cuda_device_ops.hpp"
#include "common/multi_process.hpp"
#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  return ::epx::testing::base_seed("epx-gpu");
}

struct GpuCase {
  GpuTransport transport;
  int num_ranks;
};

std::string case_name(const GpuCase& c) {
  return std::string(c.transport == GpuTransport::kNccl ? "Nccl" : "Ipc") + "R" +
         std::to_string(c.num_ranks);
}

// NCCL needs a GPU per rank; IPC runs any number of ranks on one GPU.
#define REQUIRE_CASE(c) EPX_REQUIRE_GPUS((c).transport == GpuTransport::kNccl ? (c).num_ranks : 1)

// Runs fn on every rank of `c`, each in a process of its own with its communicator open.
std::string on_ranks(const GpuCase& c, double timeout_seconds,
                     const std::function<std::string(RankContext&)>& fn) {
  const std::string rendezvous = unique_name("epx-gpu");
  return failures(run_ranks(
      c.num_ranks,
      [&](int rank) -> std::string {
        RankContext ctx = open_rank(c.transport, rank, c.num_ranks, rendezvous);
        return fn(ctx);
      },
      timeout_seconds));
}

class GpuRandom : public ::testing::TestWithParam<GpuCase> {};

TEST_P(GpuRandom, MatchesReferenceBitForBit) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  const int count = env_int("EPX_GPU_CONFIGS", c.transport == GpuTransport::kNccl ? 60 : 12);
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(c.num_ranks) * 10007ull +
                         (c.transport == GpuTransport::kIpc ? 7777ull : 0);
  const std::string failed = on_ranks(c, 560, [&](RankContext& ctx) -> std::string {
    for (int i = 0; i < count; ++i) {
      const uint64_t seed = seed0 + i;
      const RandomConfig config = draw_suite_config(seed, c.num_ranks, i);
      Buffer buffer(ctx.comm, buffer_config_for(config), poisoned_cuda_allocator());
      for (const RandomConfig& each : {config, other_layout_config(config)}) {
        const std::string failure = run_scenario(buffer, each, ctx.rank, ctx.ops());
        if (!failure.empty()) return "seed " + std::to_string(seed) + ": " + failure;
      }
    }
    return "";
  });
  ASSERT_TRUE(failed.empty()) << failed;
  std::cout << "[epx-gpu] " << case_name(c) << ": " << 2 * count
            << " scenarios bit-exact with the reference" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, GpuRandom,
    ::testing::Values(GpuCase{GpuTransport::kNccl, 1}, GpuCase{GpuTransport::kNccl, 2},
                      GpuCase{GpuTransport::kNccl, 4}, GpuCase{GpuTransport::kNccl, 8},
                      GpuCase{GpuTransport::kIpc, 2}, GpuCase{GpuTransport::kIpc, 3},
                      GpuCase{GpuTransport::kIpc, 4}),
    [](const auto& info) { return case_name(info.param); });

// The fixed cases: NCCL with 2 ranks where 2 GPUs exist, else 1; IPC with 2 and 3.
const auto kFixedCases =
    ::testing::Values(GpuCase{GpuTransport::kNccl, 1}, GpuCase{GpuTransport::kNccl, 2},
                      GpuCase{GpuTransport::kIpc, 2}, GpuCase{GpuTransport::kIpc, 3});

class GpuFixed : public ::testing::TestWithParam<GpuCase> {};

// A few small configurations, for compute-sanitizer (memcheck, racecheck).
TEST_P(GpuFixed, SmallScenarios) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  EXPECT_EQ(
      on_ranks(c, 540,
               [&](RankContext& ctx) -> std::string {
                 for (uint64_t seed = 11; seed < 14; ++seed) {
                   RandomConfig config = draw_config(seed, c.num_ranks);
                   config.max_tokens = 8;
                   config.hidden = 128;
                   config.fp8 = false;
                   Buffer buffer(ctx.comm, buffer_config_for(config), poisoned_cuda_allocator());
                   const std::string failure = run_scenario(buffer, config, ctx.rank, ctx.ops());
                   if (!failure.empty()) return failure;
                 }
                 return "";
               }),
      "");
}

// The headline size: 4096 tokens per rank, hidden 7168, top-8 of 256 experts.
TEST_P(GpuFixed, FourThousandTokensAtHidden7168) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  EXPECT_EQ(
      on_ranks(c, 540,
               [&](RankContext& ctx) -> std::string {
                 RandomConfig config = draw_production_config(base_seed() ^ 0x4096, c.num_ranks);
                 config.max_tokens = 4096;
                 config.hidden = 7168;
                 config.num_experts = 256 - 256 % c.num_ranks;  // the experts must split evenly
                 config.num_topk = 8;
                 config.fp8 = false;
                 Buffer buffer(ctx.comm, buffer_config_for(config), poisoned_cuda_allocator());
                 return run_scenario(buffer, config, ctx.rank, ctx.ops());
               }),
      "");
}

// sync_counts=false dispatch + combine captured once in a CUDA graph and replayed with new
// inputs (tests/common/cuda_device_ops.hpp).
TEST_P(GpuFixed, GraphCaptureAndReplay) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  EXPECT_EQ(on_ranks(c, 300,
                     [&](RankContext& ctx) -> std::string {
                       const RandomConfig config = graph_config(base_seed() ^ 0x9a9a, c.num_ranks);
                       Buffer buffer(ctx.comm, buffer_config_for(config),
                                     std::make_shared<ArenaAllocator>(1 << 28));
                       return graph_replay_scenario(buffer, config, ctx.rank, ctx.stream,
                                                    ctx.ops());
                     }),
            "");
}

// `bad` raises `code` (with `needle` in the message) on every rank, then a valid scenario on
// the same buffer passes: the failure left nothing behind.
void expect_all_raise(const GpuCase& c, ErrorCode code, const std::string& needle,
                      const std::function<void(Buffer&, RankContext&)>& bad) {
  EXPECT_EQ(on_ranks(c, 120,
                     [&](RankContext& ctx) -> std::string {
                       RandomConfig config = draw_config(4242, c.num_ranks);
                       config.fp8 = false;
                       config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
                       Buffer buffer(ctx.comm, buffer_config_for(config, 20),
                                     poisoned_cuda_allocator());
                       try {
                         bad(buffer, ctx);
                         buffer.synchronize(ctx.stream);
                         return "no error was raised";
                       } catch (const Error& error) {
                         const std::string what = error.what();
                         std::cout << "[epx-gpu] rank " << ctx.rank
                                   << " raised as expected: " << what << std::endl;
                         if (error.code() != code) return "wrong code: " + what;
                         if (what.find(needle) == std::string::npos)
                           return "message lacks '" + needle + "': " + what;
                       }
                       return run_scenario(buffer, config, ctx.rank, ctx.ops());
                     }),
            "");
}

TEST_P(GpuFixed, InvalidRoutingOnOneRankRaisesEverywhere) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  const int last = c.num_ranks - 1;  // the last rank passes the bad value
  expect_all_raise(
      c, ErrorCode::kInvalidRouting, "rank " + std::to_string(last) + " passed topk_idx value",
      [last](Buffer& b, RankContext& ctx) {
        TinyInputs in = tiny_inputs(b, ctx.rank, ctx.rank == last ? b.config().num_experts : 0,
                                    ctx.device, ctx.stream);
        b.dispatch(in.view, DispatchOptions{}, ctx.stream);
      });
}

TEST_P(GpuFixed, BadInputOnOneRankAbortsThePeers) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  if (c.num_ranks < 2) GTEST_SKIP() << "needs a peer";
  expect_all_raise(c, ErrorCode::kInvalidArgument, "", [](Buffer& b, RankContext& ctx) {
    TinyInputs in = tiny_inputs(b, ctx.rank, 0, ctx.device, ctx.stream);
    if (ctx.rank == 0) in.view.x.dtype = DType::kFloat32;
    b.dispatch(in.view, DispatchOptions{}, ctx.stream);
  });
}

TEST_P(GpuFixed, WrongDeviceTensor) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  expect_all_raise(c, ErrorCode::kInvalidArgument, "", [](Buffer& b, RankContext& ctx) {
    TinyInputs in = tiny_inputs(b, ctx.rank, 0, ctx.device, ctx.stream);
    if (ctx.rank == 0) in.view.x.device = Device::cpu();
    b.dispatch(in.view, DispatchOptions{}, ctx.stream);
  });
}

// Rank 0 dispatches expanded, the others compact: every rank raises naming the layouts, before
// any row moves, and the buffer stays usable.
TEST_P(GpuFixed, RanksThatDisagreeAboutTheLayoutAllRaise) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  if (c.num_ranks < 2) GTEST_SKIP() << "needs a peer";
  expect_all_raise(c, ErrorCode::kInvalidArgument, "disagree about the operation",
                   [](Buffer& b, RankContext& ctx) {
                     TinyInputs in = tiny_inputs(b, ctx.rank, 0, ctx.device, ctx.stream);
                     DispatchOptions options;
                     options.expand = ctx.rank == 0;
                     options.sync_counts = false;
                     b.dispatch(in.view, options, ctx.stream);
                   });
}

// Buffer::num_sms(): the blocks per kernel, BufferConfig::num_sms or else min(24, the SMs).
TEST_P(GpuFixed, NumSmsIsTheBlockBudget) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  EXPECT_EQ(
      on_ranks(c, 120,
               [&](RankContext& ctx) -> std::string {
                 cudaDeviceProp properties{};
                 check_cuda(cudaGetDeviceProperties(&properties, ctx.device),
                            "cudaGetDeviceProperties");
                 BufferConfig config = buffer_config_for(draw_config(7, c.num_ranks));
                 const int by_default = Buffer(ctx.comm, config).num_sms();
                 config.num_sms = 5;
                 const int chosen = Buffer(ctx.comm, config).num_sms();
                 if (by_default != std::min(24, properties.multiProcessorCount) || chosen != 5) {
                   return "num_sms() " + std::to_string(by_default) + " by default (" +
                          std::to_string(properties.multiProcessorCount) + " SMs), " +
                          std::to_string(chosen) + " for 5";
                 }
                 return "";
               }),
      "");
}

// Rank 1 never calls dispatch: rank 0's kernel gives up after the timeout and the host raises
// kTimeout naming the phase and the missing rank; the buffer is then unusable on rank 0, and
// rank 1's next operation raises too (rank 0's poison mark), without waiting out a timeout.
TEST_P(GpuFixed, MissingPeerTimesOutAndTheBufferFailsEverywhere) {
  const GpuCase c = GetParam();
  REQUIRE_CASE(c);
  if (c.num_ranks < 2) GTEST_SKIP() << "needs a peer";
  EXPECT_EQ(
      on_ranks(
          c, 120,
          [&](RankContext& ctx) -> std::string {
            RandomConfig config = draw_config(99, c.num_ranks);
            config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
            Buffer buffer(ctx.comm, buffer_config_for(config, 2.0));
            TinyInputs in = tiny_inputs(buffer, ctx.rank, 0, ctx.device, ctx.stream);
            if (ctx.rank == 1) {
              std::this_thread::sleep_for(std::chrono::seconds(6));  // alive, but late
            } else {
              const std::string failure = dispatch_expecting_missing_peer(
                  buffer, in.view, ctx.stream, "epx-gpu", ctx.rank, 1);
              if (!failure.empty()) return failure;
            }
            const auto start = std::chrono::steady_clock::now();
            try {
              buffer.dispatch(in.view, DispatchOptions{}, ctx.stream);
              buffer.synchronize(ctx.stream);
              return "the failed buffer raised nothing";
            } catch (const Error& error) {
              const double seconds =
                  std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
              std::cout << "[epx-gpu] rank " << ctx.rank << " after the timeout, " << seconds
                        << " s: " << error.what() << std::endl;
              if (error.code() != ErrorCode::kUnusable)
                return std::string("wrong code: ") + error.what();
              if (seconds > 1.5) return "took " + std::to_string(seconds) + " s";
            }
            return "";
          }),
      "");
}

// Every CUDA factory given a device that does not exist raises kInvalidArgument naming the rank
// and the device (not a CUDA error from deep inside the setup).
TEST(GpuComm, DeviceThatDoesNotExistRaisesInvalidArgument) {
  EPX_REQUIRE_GPUS(1);
  const auto outcomes = run_ranks(1, [](int) -> std::string {
    constexpr int kNoDevice = 999;
    const std::vector<std::pair<const char*, std::function<void()>>> factories = {
        {"nccl", [] { (void)Comm::nccl(0, 1, Comm::nccl_unique_id(), kNoDevice, 5.0); }},
        {"ipc", [] { (void)Comm::ipc(0, 1, unique_name("epx-no-device"), kNoDevice); }},
        {"cuda_threads",
         [] { (void)Comm::cuda_threads(ThreadGroup::create(1, 5.0), 0, kNoDevice); }}};
    std::string failures;
    for (const auto& [name, open] : factories) {
      try {
        open();
        failures += std::string(name) + ": nothing raised; ";
      } catch (const Error& error) {
        const std::string what = error.what();
        std::cout << "[epx-gpu] " << name << ": " << what << std::endl;
        if (error.code() != ErrorCode::kInvalidArgument ||
            what.find("rank 0: CUDA device 999 does not exist") == std::string::npos) {
          failures += std::string(name) + ": " + what + "; ";
        }
      }
    }
    return failures;
  });
  EXPECT_EQ(failures(outcomes), "");
}

INSTANTIATE_TEST_SUITE_P(Transports, GpuFixed, kFixedCases,
                         [](const auto& info) { return case_name(info.param); });

}  // namespace
}  // namespace epx::testing
