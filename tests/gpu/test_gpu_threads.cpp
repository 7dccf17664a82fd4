// The multi-rank protocol on GPUs without NCCL: R ranks as threads of one process
// (ThreadGroup, Comm::cuda_threads), all on CUDA device 0, so R = 2, 3, 4, 8 run on a single
// GPU; with two or more GPUs visible, also spread over them (rank r on device r % GPUs, peer
// access between them). Every kernel, barrier, abort and timeout path is the one NCCL ranks run;
// only the workspace comes from cudaMalloc instead of an NCCL window. The same random scenarios
// as test_gpu (bit for bit against the reference), a CUDA-graph capture and replay on every rank
// thread, invalid routing and bad input on one rank, a rank that never dispatches, a rank that
// never builds its buffer.
// The test process stays CUDA-free (a process that has initialised CUDA cannot fork rank
// processes for the other tests): each case runs in one forked child that starts the threads.
// Each rank thread works on a non-blocking stream of its own and never waits for the whole
// device between operations (see Comm::cuda_threads).
// EPX_GPU_CONFIGS=<n> sets the configurations per rank count (default 40); EPX_TEST_SEED=<n>
// replays a run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <random>
#include <thread>

#include "common/cuda_device_ops.hpp"
#include "common/multi_process.hpp"
#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  return ::epx::testing::base_seed("epx-gpu-threads");
}

#define REQUIRE_GPUS(n) EPX_REQUIRE_GPUS(n)

// The buffer for a thread rank: ranks that share a device spin in kernels that wait for each
// other, so all their blocks must be resident at once (at most one 512-thread block per SM is
// assumed): each rank gets its share of the SMs, at most 24. EPX_GPU_TIMEOUT_S (default 60)
// shortens the transport's timeout to replay a hang quickly.
BufferConfig thread_buffer_config(const RandomConfig& config, const ThreadRank& r,
                                  double timeout_seconds = env_int("EPX_GPU_TIMEOUT_S", 60)) {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, r.device), "cudaGetDeviceProperties");
  BufferConfig buffer = buffer_config_for(config, timeout_seconds);
  buffer.num_sms =
      std::max(1, std::min(24, properties.multiProcessorCount / std::max(1, r.ranks_on_device)));
  return buffer;
}

struct RandomCase {
  int num_ranks;
  Placement placement;
};

class ThreadsRandom : public ::testing::TestWithParam<RandomCase> {};

// As test_gpu's GpuRandom: EPX_GPU_CONFIGS configurations, two scenarios each (the second
// flips expand and sync_counts), one buffer per configuration.
TEST_P(ThreadsRandom, MatchesReferenceBitForBit) {
  const RandomCase param = GetParam();
  REQUIRE_GPUS(param.placement == Placement::kOneGpu ? 1 : 2);
  const int num_ranks = param.num_ranks;
  const int count = env_int("EPX_GPU_CONFIGS", 40);
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(num_ranks) * 7919ull +
                         (param.placement == Placement::kSpread ? 104729ull : 0);
  const std::string failed = run_threads(
      num_ranks, param.placement, 120,
      [&](const ThreadRank& r) -> std::string {
        const DeviceOps ops = r.ops();
        for (int i = 0; i < count; ++i) {
          const uint64_t seed = seed0 + i;
          const RandomConfig config = draw_suite_config(seed, num_ranks, i);
          Buffer buffer(r.comm, thread_buffer_config(config, r), poisoned_cuda_allocator());
          for (const RandomConfig& c : {config, other_layout_config(config)}) {
            const std::string failure = run_scenario(buffer, c, r.rank, ops);
            if (!failure.empty()) return "seed " + std::to_string(seed) + ": " + failure;
          }
        }
        return "";
      },
      560);
  ASSERT_EQ(failed, "");
  std::cout << "[epx-gpu-threads] R=" << num_ranks << ": " << 2 * count
            << " scenarios bit-exact with the reference ("
            << (param.placement == Placement::kOneGpu ? "all on device 0"
                                                      : "spread over the visible GPUs")
            << ")" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(
    Ranks, ThreadsRandom,
    ::testing::Values(RandomCase{2, Placement::kOneGpu}, RandomCase{3, Placement::kOneGpu},
                      RandomCase{4, Placement::kOneGpu}, RandomCase{8, Placement::kOneGpu},
                      RandomCase{2, Placement::kSpread}, RandomCase{4, Placement::kSpread},
                      RandomCase{8, Placement::kSpread}),
    [](const auto& info) {
      return "R" + std::to_string(info.param.num_ranks) +
             (info.param.placement == Placement::kOneGpu ? "OneGpu" : "Spread");
    });

// A few small configurations on two ranks sharing device 0, for compute-sanitizer.
TEST(GpuThreadsSmall, Scenarios) {
  REQUIRE_GPUS(1);
  const std::string failed = run_threads(
      2, Placement::kOneGpu, 120,
      [](const ThreadRank& r) -> std::string {
        for (uint64_t seed = 11; seed < 14; ++seed) {
          RandomConfig config = draw_config(seed, 2);
          config.max_tokens = 8;
          config.hidden = 128;
          config.fp8 = false;
          Buffer buffer(r.comm, thread_buffer_config(config, r), poisoned_cuda_allocator());
          const std::string failure = run_scenario(buffer, config, r.rank, r.ops());
          if (!failure.empty()) return "seed " + std::to_string(seed) + ": " + failure;
        }
        // The unsynced expanded worst case (K rows per token from duplicates) fits its outputs.
        for (int32_t alignment : {1, 128}) {
          const RandomConfig config = saturated_config(17, 2, alignment);
          Buffer buffer(r.comm, thread_buffer_config(config, r), poisoned_cuda_allocator());
          const std::string failure = run_scenario(buffer, config, r.rank, r.ops());
          if (!failure.empty()) return "saturated: " + failure;
        }
        return "";
      },
      560);
  EXPECT_EQ(failed, "");
}

// The headline size on two ranks sharing the GPU: 4096 tokens per rank, hidden 7168, top-8 of
// 256 experts.
TEST(GpuThreadsProduction, FourThousandTokensAtHidden7168) {
  REQUIRE_GPUS(1);
  const std::string failed = run_threads(
      2, Placement::kOneGpu, 120,
      [](const ThreadRank& r) -> std::string {
        RandomConfig config = draw_production_config(base_seed() ^ 0x4096, 2);
        config.max_tokens = 4096;
        config.hidden = 7168;
        config.num_experts = 256;
        config.num_topk = 8;
        config.fp8 = false;
        Buffer buffer(r.comm, thread_buffer_config(config, r), poisoned_cuda_allocator());
        return run_scenario(buffer, config, r.rank, r.ops());
      },
      560);
  EXPECT_EQ(failed, "");
}

// The graph scenario (tests/common/cuda_device_ops.hpp) on every rank thread, each capturing its
// own stream (thread-local capture mode: the other threads keep issuing work meanwhile).
class ThreadsGraph : public ::testing::TestWithParam<int> {};

TEST_P(ThreadsGraph, CaptureAndReplay) {
  REQUIRE_GPUS(1);
  const int n = GetParam();
  const RandomConfig config = graph_config(base_seed() ^ 0x9a9a, n);
  const std::string failed = run_threads(
      n, Placement::kOneGpu, 120,
      [&](const ThreadRank& r) -> std::string {
        Buffer buffer(r.comm, thread_buffer_config(config, r),
                      std::make_shared<ArenaAllocator>(size_t(1) << 28));
        return graph_replay_scenario(buffer, config, r.rank, r.stream, r.ops());
      },
      300);
  EXPECT_EQ(failed, "");
}

INSTANTIATE_TEST_SUITE_P(Ranks, ThreadsGraph, ::testing::Values(2, 4),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// The expected error on every rank of a 3-rank group (the offending rank's own message may
// differ from its peers': `peer_needle` is checked on the others), then a valid scenario on the
// same buffer.
void expect_all_raise(ErrorCode code, int bad_rank, const std::string& peer_needle,
                      const std::function<void(Buffer&, const ThreadRank&)>& bad) {
  const int n = 3;
  const std::string failed = run_threads(
      n, Placement::kOneGpu, 60,
      [&](const ThreadRank& r) -> std::string {
        RandomConfig config = draw_config(4242, n);
        config.fp8 = false;
        config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
        Buffer buffer(r.comm, thread_buffer_config(config, r, 20), poisoned_cuda_allocator());
        const std::string raised =
            expect_raise(buffer, r, code, bad_rank, peer_needle, bad, "[epx-gpu-threads]");
        return raised.empty() ? run_scenario(buffer, config, r.rank, r.ops()) : raised;
      },
      300);
  EXPECT_EQ(failed, "");
}

TEST(ThreadsErrors, InvalidRoutingOnOneRankRaisesEverywhere) {
  REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidRouting, -1, "rank 2 passed topk_idx value",
                   [](Buffer& b, const ThreadRank& r) {
                     TinyInputs in = tiny_inputs(
                         b, r.rank, r.rank == 2 ? b.config().num_experts : 0, r.device, r.stream);
                     b.dispatch(in.view, DispatchOptions{}, r.stream);
                   });
}

TEST(ThreadsErrors, WrongDtypeOnOneRankAbortsThePeers) {
  REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidArgument, 1, "rank 1 rejected its input",
                   [](Buffer& b, const ThreadRank& r) {
                     TinyInputs in = tiny_inputs(b, r.rank, 0, r.device, r.stream);
                     if (r.rank == 1) in.view.x.dtype = DType::kFloat32;
                     b.dispatch(in.view, DispatchOptions{}, r.stream);
                   });
}

TEST(ThreadsErrors, WrongShapeOnOneRankAbortsThePeers) {
  REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidArgument, 0, "rank 0 rejected its input",
                   [](Buffer& b, const ThreadRank& r) {
                     TinyInputs in = tiny_inputs(b, r.rank, 0, r.device, r.stream);
                     if (r.rank == 0) {
                       in.view.x =
                           TensorView(in.view.x.data, in.view.x.dtype,
                                      {kTinyTokens, b.config().hidden - 1}, in.view.x.device);
                     }
                     b.dispatch(in.view, DispatchOptions{}, r.stream);
                   });
}

// Rank 2 dispatches expanded, the others compact: every rank raises naming the layouts before
// any row moves, and the buffer stays usable (the valid scenario after it passes).
TEST(ThreadsErrors, RanksThatDisagreeAboutTheLayoutAllRaise) {
  REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidArgument, -1, "disagree about the operation",
                   [](Buffer& b, const ThreadRank& r) {
                     TinyInputs in = tiny_inputs(b, r.rank, 0, r.device, r.stream);
                     DispatchOptions options;
                     options.expand = r.rank == 2;
                     options.sync_counts = false;
                     b.dispatch(in.view, options, r.stream);
                   });
}

// Rank 1 never calls dispatch (it builds and destroys its buffer): ranks 0 and 2 raise kTimeout
// naming the phase and rank 1 after the buffer's 2 s timeout.
TEST(ThreadsTimeout, MissingPeerTimesOut) {
  REQUIRE_GPUS(1);
  const std::string failed = run_threads(
      3, Placement::kOneGpu, 60,
      [](const ThreadRank& r) -> std::string {
        RandomConfig config = draw_config(99, 3);
        config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
        Buffer buffer(r.comm, thread_buffer_config(config, r, 2.0));
        if (r.rank == 1) return "";  // alive (it joins the buffer's teardown) but never dispatches
        TinyInputs in = tiny_inputs(buffer, r.rank, 0, r.device, r.stream);
        return dispatch_expecting_missing_peer(buffer, in.view, r.stream, "epx-gpu-threads", r.rank,
                                               1);
      },
      120);
  EXPECT_EQ(failed, "");
}

// A rank that never builds its buffer: the others' buffer setup raises kTimeout naming it after
// the group's 1 s timeout.
TEST(ThreadsTimeout, MissingRankAtSetup) {
  REQUIRE_GPUS(1);
  const std::string failed = run_threads(
      3, Placement::kOneGpu, 1.0,
      [](const ThreadRank& r) -> std::string {
        if (r.rank == 1) return "";
        const RandomConfig config = draw_config(7, 3);
        try {
          Buffer buffer(r.comm, thread_buffer_config(config, r, 2.0));
          return "no error was raised";
        } catch (const Error& error) {
          const std::string what = error.what();
          std::cout << "[epx-gpu-threads] rank " << r.rank << ": " << what << std::endl;
          if (error.code() != ErrorCode::kTimeout ||
              what.find("buffer setup") == std::string::npos ||
              what.find("rank 1") == std::string::npos) {
            return "unexpected: " + what;
          }
        }
        return "";
      },
      60);
  EXPECT_EQ(failed, "");
}

// Four ranks on one device with CUDA_DEVICE_MAX_CONNECTIONS=4 (set here, before the rank
// process starts CUDA): two of them could land on one hardware queue and wait for each other
// until the timeout, so every rank's buffer setup raises kInvalidArgument naming the variable.
TEST(ThreadsSetup, TooFewHardwareQueuesRaises) {
  REQUIRE_GPUS(1);
  const char* before = std::getenv("CUDA_DEVICE_MAX_CONNECTIONS");
  const std::string saved = before ? before : "";
  setenv("CUDA_DEVICE_MAX_CONNECTIONS", "4", 1);
  const std::string failed = run_threads(
      4, Placement::kOneGpu, 10.0,
      [](const ThreadRank& r) -> std::string {
        try {
          Buffer buffer(r.comm, thread_buffer_config(draw_config(5, 4), r, 2.0));
          return "no error was raised";
        } catch (const Error& error) {
          const std::string what = error.what();
          if (r.rank == 0) std::cout << "[epx-gpu-threads] " << what << std::endl;
          if (error.code() != ErrorCode::kInvalidArgument ||
              what.find("CUDA_DEVICE_MAX_CONNECTIONS is 4") == std::string::npos) {
            return "unexpected: " + what;
          }
        }
        return "";
      },
      60);
  if (before) {
    setenv("CUDA_DEVICE_MAX_CONNECTIONS", saved.c_str(), 1);
  } else {
    unsetenv("CUDA_DEVICE_MAX_CONNECTIONS");
  }
  EXPECT_EQ(failed, "");
}

}  // namespace
}  // namespace epx::testing
