// The multi-rank protocol on GPUs without NCCL: R ranks as threads of one process sharing
// CUDA device 0 (Comm::cuda_local), so R = 2, 3, 4, 8 run on a single GPU. Every kernel, barrier,
// abort and timeout path of the CUDA transport is the one NCCL ranks run; only the workspace
// comes from cudaMalloc instead of an NCCL window (and nothing crosses NVLink). The same random
// scenarios as the host tests, bit for bit against the reference; invalid routing and bad input
// on one rank; a rank that never arrives. The test process stays CUDA-free: each case runs in a
// forked child that starts the rank threads.
// EPX_GPU_CONFIGS=<n> sets the configurations per rank count (default 40); EPX_TEST_SEED=<n>
// replays a run.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <random>
#include <thread>

#include "common/cuda_device_ops.hpp"
#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "cpp/multi_process.hpp"
#include "epx/error.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("EPX_TEST_SEED");
    const uint64_t value = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "[epx-gpu-local] base seed " << value << " (EPX_TEST_SEED=" << value
              << " replays this run)" << std::endl;
    return value;
  }();
  return seed;
}

// A rank thread's context: device 0, a non-blocking stream (the legacy default stream would
// wait for the other ranks' kernels), its communicator.
struct LocalRank {
  int rank;
  cudaStream_t stream;
  Comm comm;
};

// Runs fn(rank) on `num_ranks` threads of a forked child; "" when every rank returned "".
std::string run_local(int num_ranks, double group_timeout,
                      const std::function<std::string(const LocalRank&)>& fn,
                      double timeout_seconds = 600) {
  const auto outcomes = run_ranks(1, [&](int) -> std::string {
    check_cuda(cudaSetDevice(0), "cudaSetDevice");
    LocalGroup group(num_ranks, group_timeout);
    std::vector<std::string> results(num_ranks);
    std::vector<std::thread> threads;
    for (int rank = 0; rank < num_ranks; ++rank) {
      threads.emplace_back([&, rank] {
        try {
          check_cuda(cudaSetDevice(0), "cudaSetDevice");
          cudaStream_t stream;
          check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
          results[rank] = fn(LocalRank{rank, stream, Comm::cuda_local(group, rank, 0)});
        } catch (const std::exception& error) {
          results[rank] = std::string("threw: ") + error.what();
        }
      });
    }
    for (auto& thread : threads) thread.join();
    std::string failed;
    for (int rank = 0; rank < num_ranks; ++rank) {
      if (results[rank].empty()) continue;
      failed += "rank " + std::to_string(rank) + ": " + results[rank] + "\n";
    }
    return failed;
  }, timeout_seconds);
  return failures(outcomes);
}

// Blocks per rank: ranks sharing the GPU spin in kernels that wait for each other, so all of
// their blocks must be resident at once (one 512-thread block per SM at 128 registers).
BufferConfig shared_gpu_config(const RandomConfig& config, int num_ranks, double timeout) {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, 0), "properties");
  BufferConfig buffer = buffer_config_for(config, timeout);
  buffer.num_sms = std::max(1, std::min(24, properties.multiProcessorCount / num_ranks));
  return buffer;
}

class LocalRandom : public ::testing::TestWithParam<int> {};

TEST_P(LocalRandom, MatchesReferenceBitForBit) {
  if (count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
  const int num_ranks = GetParam();
  const char* env = std::getenv("EPX_GPU_CONFIGS");
  const int count = env ? std::atoi(env) : 40;
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(num_ranks) * 7919ull;
  const std::string failed = run_local(num_ranks, 120, [&](const LocalRank& r) -> std::string {
    const DeviceOps ops = cuda_device_ops(0, r.stream);
    for (int i = 0; i < count; ++i) {
      const uint64_t seed = seed0 + i;
      const RandomConfig config = draw_config(seed, num_ranks);
      RandomConfig again = config;
      again.seed = seed ^ 0xa5a5a5a5ull;
      again.expand = !config.expand;
      again.sync_counts = !config.sync_counts;
      Buffer buffer(r.comm, shared_gpu_config(config, num_ranks, 60), poisoned_cuda_allocator());
      for (const RandomConfig* c : {&config, static_cast<const RandomConfig*>(&again)}) {
        const std::string failure = run_scenario(buffer, *c, r.rank, ops);
        if (!failure.empty()) return "seed " + std::to_string(seed) + ": " + failure;
      }
    }
    return "";
  });
  ASSERT_EQ(failed, "");
  std::cout << "[epx-gpu-local] R=" << num_ranks << " on one GPU: " << 2 * count
            << " scenarios bit-exact with the reference" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Ranks, LocalRandom, ::testing::Values(2, 3, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// The expected error on every rank of a 3-rank group, then a valid scenario on the same buffer.
void expect_all_raise(ErrorCode code, const std::string& needle,
                      const std::function<void(Buffer&, const LocalRank&)>& bad) {
  const int n = 3;
  const std::string failed = run_local(n, 60, [&](const LocalRank& r) -> std::string {
    RandomConfig config = draw_config(4242, n);
    config.fp8 = false;
    config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
    Buffer buffer(r.comm, shared_gpu_config(config, n, 20), poisoned_cuda_allocator());
    try {
      bad(buffer, r);
      buffer.synchronize(r.stream);
      return "no error was raised";
    } catch (const Error& error) {
      const std::string what = error.what();
      std::cout << "[epx-gpu-local] rank " << r.rank << " raised as expected: " << what
                << std::endl;
      if (error.code() != code) return "wrong code: " + what;
      if (what.find(needle) == std::string::npos) return "message lacks '" + needle + "': " + what;
    }
    return run_scenario(buffer, config, r.rank, cuda_device_ops(0, r.stream));
  }, 300);
  EXPECT_EQ(failed, "");
}

TEST(LocalErrors, InvalidRoutingOnOneRankRaisesEverywhere) {
  if (count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
  expect_all_raise(ErrorCode::kInvalidRouting, "rank 2 passed topk_idx value",
                   [](Buffer& b, const LocalRank& r) {
                     TinyInputs in = tiny_inputs(b, r.rank, r.rank == 2 ? b.config().num_experts
                                                                        : 0, 0, r.stream);
                     b.dispatch(in.view, DispatchOptions{}, r.stream);
                   });
}

TEST(LocalErrors, BadInputOnOneRankAbortsThePeers) {
  if (count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
  expect_all_raise(ErrorCode::kInvalidArgument, "", [](Buffer& b, const LocalRank& r) {
    TinyInputs in = tiny_inputs(b, r.rank, 0, 0, r.stream);
    if (r.rank == 1) in.view.x.dtype = DType::kFloat32;
    b.dispatch(in.view, DispatchOptions{}, r.stream);
  });
}

// Rank 1 never calls dispatch: ranks 0 and 2 raise kTimeout naming the phase and rank 1.
TEST(LocalTimeout, MissingPeerTimesOut) {
  if (count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
  const std::string failed = run_local(3, 60, [](const LocalRank& r) -> std::string {
    RandomConfig config = draw_config(99, 3);
    config.max_tokens = std::max<int64_t>(config.max_tokens, kTinyTokens);
    Buffer buffer(r.comm, shared_gpu_config(config, 3, 2.0));
    if (r.rank == 1) return "";  // alive (it joins the buffer's teardown) but never dispatches
    TinyInputs in = tiny_inputs(buffer, r.rank, 0, 0, r.stream);
    const auto start = std::chrono::steady_clock::now();
    try {
      buffer.dispatch(in.view, DispatchOptions{}, r.stream);
      return "no error was raised";
    } catch (const Error& error) {
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const std::string what = error.what();
      std::cout << "[epx-gpu-local] rank " << r.rank << " after " << seconds << " s: " << what
                << std::endl;
      if (error.code() != ErrorCode::kTimeout) return "wrong code: " + what;
      if (what.find("phase dispatch/entry") == std::string::npos ||
          what.find("waiting for rank 1") == std::string::npos) {
        return "phase or rank missing: " + what;
      }
      if (seconds > 20) return "took " + std::to_string(seconds) + " s";
    }
    return "";
  }, 120);
  EXPECT_EQ(failed, "");
}

// A rank that never creates its buffer: the others' buffer setup raises kTimeout naming them.
TEST(LocalTimeout, MissingRankAtSetup) {
  if (count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
  const std::string failed = run_local(2, 1.0, [](const LocalRank& r) -> std::string {
    if (r.rank == 1) return "";
    RandomConfig config = draw_config(7, 2);
    try {
      Buffer buffer(r.comm, shared_gpu_config(config, 2, 2.0));
      return "no error was raised";
    } catch (const Error& error) {
      const std::string what = error.what();
      std::cout << "[epx-gpu-local] rank 0: " << what << std::endl;
      if (error.code() != ErrorCode::kTimeout || what.find("buffer setup") == std::string::npos) {
        return "unexpected: " + what;
      }
    }
    return "";
  }, 60);
  EXPECT_EQ(failed, "");
}

}  // namespace
}  // namespace epx::testing
