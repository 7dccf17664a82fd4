// The low-latency mode on the GPU against the reference, every output element compared
// (tests/common/low_latency_scenario.hpp: routing and cached dispatch, zero-copy and copied
// combines, the hook split, combine_backward):
//   - thread ranks sharing GPU 0 (R = 1, 2, 3, 4, 8), random configurations, then production
//     shapes (hidden 7168 bf16 and fp8, 2048, 1032; 128 and 256 tokens; 256 experts, top-8);
//   - one NCCL rank (R = 1), the same;
//   - IPC processes sharing GPU 0 (R = 2, 3: a process per rank, the workspaces mapped through
//     CUDA IPC), random configurations;
//   - a CUDA graph of dispatch -> expert step -> combine (zero-copy, one with hooks inside),
//     captured once and replayed with new rows and new routing written into its inputs before
//     every replay, each replay's output compared;
//   - errors: calls out of turn, a rank's bad input, a missing peer (a timeout naming the rank
//     and the phase), each raised at the next synchronisation.
// The test process stays CUDA-free (it forks the rank processes). EPX_GPU_CONFIGS=<n> sets the
// random configurations per rank count (default 12); EPX_TEST_SEED=<n> replays a run;
// EPX_GPU_TIMEOUT_S (default 60) shortens the buffers' timeout to replay a hang quickly.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <iostream>
#include <optional>
#include <random>

#include "common/cuda_device_ops.hpp"
#include "common/low_latency_scenario.hpp"
#include "common/multi_process.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  return ::epx::testing::base_seed("epx-gpu-low-latency");
}

// The buffer of a thread rank: ranks sharing the GPU wait for each other inside kernels whose
// blocks must all be resident at once, so each takes its share of the SMs.
BufferConfig shared_gpu_config(const LowLatencyCase& c, const ThreadRank& r,
                               double timeout_seconds = env_int("EPX_GPU_TIMEOUT_S", 60)) {
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, r.device), "cudaGetDeviceProperties");
  BufferConfig config = low_latency_buffer_config(c, timeout_seconds);
  config.num_sms = std::max(1, properties.multiProcessorCount / std::max(1, r.ranks_on_device));
  return config;
}

// One NCCL rank on GPU 0 (forked, so this process stays CUDA-free).
std::string on_nccl_rank(const std::function<std::string(RankContext&)>& fn, double timeout) {
  const std::string rendezvous = unique_name("epx-gpu-ll");
  return failures(run_ranks(
      1,
      [&](int rank) {
        RankContext ctx = open_rank(GpuTransport::kNccl, rank, 1, rendezvous);
        return fn(ctx);
      },
      timeout));
}

// The production shapes: {hidden, tokens, fp8}.
struct Shape {
  int64_t hidden, tokens;
  bool fp8;
};
constexpr Shape kShapes[] = {{7168, 128, false},
                             {7168, 128, true},
                             {7168, 256, true},
                             {2048, 128, false},
                             {1032, 256, false},
                             {7168, 1, false}};

// One rank's part of `count` random configurations of `num_ranks` ranks, seeds seed0 + i, each
// on a buffer of config(case): "" when every one matched the reference, else the first failure
// with its seed.
std::string random_scenarios(const Comm& comm, int rank, int num_ranks, uint64_t seed0, int count,
                             const std::function<BufferConfig(const LowLatencyCase&)>& config,
                             const DeviceOps& ops) {
  for (int i = 0; i < count; ++i) {
    const LowLatencyCase c = draw_low_latency_case(seed0 + i, num_ranks);
    Buffer buffer(comm, config(c), poisoned_cuda_allocator());
    const std::string bad = run_low_latency_scenario(buffer, c, rank, ops);
    if (!bad.empty()) return "seed " + std::to_string(seed0 + i) + ": " + bad;
  }
  return "";
}

class LowLatencyThreads : public ::testing::TestWithParam<int> {};

TEST_P(LowLatencyThreads, RandomConfigurationsMatchTheReference) {
  EPX_REQUIRE_GPUS(1);
  const int num_ranks = GetParam();
  const int count = env_int("EPX_GPU_CONFIGS", 12);
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(num_ranks) * 4099ull;
  const std::string failed = run_threads(
      num_ranks, Placement::kOneGpu, 120,
      [&](const ThreadRank& r) {
        return random_scenarios(
            r.comm, r.rank, num_ranks, seed0, count,
            [&](const LowLatencyCase& c) { return shared_gpu_config(c, r); }, r.ops());
      },
      560);
  ASSERT_EQ(failed, "");
  std::cout << "[epx-gpu-low-latency] R=" << num_ranks << ": " << count
            << " scenarios bit-exact with the reference" << std::endl;
}

// The production shapes on R = 1 and 2 (more ranks: the reference's regions, E * S_ll rows of
// every rank on every rank thread, outgrow the host).
TEST_P(LowLatencyThreads, ProductionShapesMatchTheReference) {
  EPX_REQUIRE_GPUS(1);
  const int num_ranks = GetParam();
  if (num_ranks > 2) GTEST_SKIP() << "production shapes run on 1 and 2 ranks";
  const std::string failed = run_threads(
      num_ranks, Placement::kOneGpu, 120,
      [&](const ThreadRank& r) -> std::string {
        for (const Shape& shape : kShapes) {
          const LowLatencyCase c =
              production_low_latency_case(base_seed() + uint64_t(shape.hidden * 7 + shape.tokens),
                                          num_ranks, shape.tokens, shape.hidden, shape.fp8);
          Buffer buffer(r.comm, shared_gpu_config(c, r), poisoned_cuda_allocator());
          const std::string bad = run_low_latency_scenario(buffer, c, r.rank, r.ops());
          if (!bad.empty()) return bad;
        }
        return "";
      },
      560);
  EXPECT_EQ(failed, "");
}

INSTANTIATE_TEST_SUITE_P(Ranks, LowLatencyThreads, ::testing::Values(1, 2, 3, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// Processes on one GPU time-slice it (no MPS): a rank's kernel that waits for a peer holds the
// GPU until its slice ends, so these are slower than thread ranks, not different.
class LowLatencyIpc : public ::testing::TestWithParam<int> {};

TEST_P(LowLatencyIpc, RandomConfigurationsMatchTheReference) {
  EPX_REQUIRE_GPUS(1);
  const int num_ranks = GetParam();
  const int count = env_int("EPX_GPU_CONFIGS", 12);
  const uint64_t seed0 = base_seed() * 7919ull + uint64_t(num_ranks) * 131ull;
  const std::string rendezvous = unique_name("epx-gpu-ll-ipc");
  const std::string failed = failures(run_ranks(
      num_ranks,
      [&](int rank) {
        RankContext ctx = open_rank(GpuTransport::kIpc, rank, num_ranks, rendezvous);
        return random_scenarios(
            ctx.comm, rank, num_ranks, seed0, count,
            [](const LowLatencyCase& c) {
              return low_latency_buffer_config(c, env_int("EPX_GPU_TIMEOUT_S", 60));
            },
            ctx.ops());
      },
      560));
  ASSERT_EQ(failed, "");
  std::cout << "[epx-gpu-low-latency] IPC R=" << num_ranks << ": " << count
            << " scenarios bit-exact with the reference" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Ranks, LowLatencyIpc, ::testing::Values(2, 3),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

TEST(LowLatencyNccl, OneRankMatchesTheReference) {
  EPX_REQUIRE_GPUS(1);
  const int count = env_int("EPX_GPU_CONFIGS", 12);
  EXPECT_EQ(
      on_nccl_rank(
          [&](RankContext& ctx) -> std::string {
            for (int i = 0; i < count; ++i) {
              const LowLatencyCase c = draw_low_latency_case(base_seed() + 31 * i, 1);
              Buffer buffer(ctx.comm, low_latency_buffer_config(c), poisoned_cuda_allocator());
              const std::string bad = run_low_latency_scenario(buffer, c, 0, ctx.ops());
              if (!bad.empty()) return bad;
            }
            for (const Shape& shape : kShapes) {
              const LowLatencyCase c = production_low_latency_case(
                  base_seed() ^ uint64_t(shape.hidden), 1, shape.tokens, shape.hidden, shape.fp8);
              Buffer buffer(ctx.comm, low_latency_buffer_config(c), poisoned_cuda_allocator());
              const std::string bad = run_low_latency_scenario(buffer, c, 0, ctx.ops());
              if (!bad.empty()) return bad;
            }
            return "";
          },
          560),
      "");
}

// --- CUDA graphs -------------------------------------------------------------------------------

// Dispatch (bf16 rows, weights), the expert step (the received rows copied into the combine
// region: y[t] = sum over k of w[t, k] * x[t]), combine with the dispatch's own weights: both
// zero-copy. Captured once (with hooks inside when `hook`), replayed `replays` times; before
// each replay new rows and new routing are written into the captured inputs, and the replay's y
// must equal the reference.
std::string graph_scenario(Buffer& buffer, const LowLatencyCase& c, int rank, void* stream_ptr,
                           const DeviceOps& ops, bool hook, int replays) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const RandomConfig& config = c.config;
  const reference::Problem problem = config.problem();
  const int64_t hidden = config.hidden, topk = config.num_topk, capacity = config.max_tokens;
  const int64_t region_bytes =
      int64_t(config.num_experts / config.num_ranks) * config.num_ranks * capacity * hidden * 2;
  // The captured inputs: S_ll tokens on every rank, routing redrawn per replay.
  auto x = ops.upload(std::vector<uint16_t>(capacity * hidden).data(), capacity * hidden * 2);
  auto idx = ops.upload(std::vector<int64_t>(capacity * topk, -1).data(), capacity * topk * 8);
  auto w = ops.upload(std::vector<float>(capacity * topk).data(), capacity * topk * 4);
  DispatchInputs in;
  in.x = TensorView(x.get(), DType::kBFloat16, {capacity, hidden}, buffer.device());
  in.topk_idx = TensorView(idx.get(), DType::kInt64, {capacity, topk}, buffer.device());
  in.weights = TensorView(w.get(), DType::kFloat32, {capacity, topk}, buffer.device());
  const LowLatencyOptions options{.return_hook = hook};
  const Tensor combine_input = buffer.low_latency_combine_input();
  auto round = [&]() {
    LowLatencyDispatchResult recv = buffer.low_latency_dispatch(in, options, stream);
    if (hook) buffer.low_latency_wait(stream);
    check_cuda(cudaMemcpyAsync(combine_input.view.data, recv.x.view.data, region_bytes,
                               cudaMemcpyDeviceToDevice, stream),
               "expert step");
    LowLatencyCombineResult y = buffer.low_latency_combine(
        {.x = combine_input.view, .weights = recv.weights.view}, recv.handle, options, stream);
    if (hook) buffer.low_latency_wait(stream);
    return y;
  };
  (void)round();  // a warm-up outside the capture (collective, like every call)
  buffer.synchronize(stream);
  cudaGraph_t graph;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  const LowLatencyCombineResult out = round();
  check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
  cudaGraphExec_t exec;
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
  std::string bad;
  for (int replay = 0; replay < replays && bad.empty(); ++replay) {
    RandomConfig fresh = config;
    fresh.seed = config.seed + 1000 * uint64_t(replay + 1);
    std::vector<reference::RankInputs> inputs = draw_low_latency_inputs(fresh);
    // Every rank sends S_ll tokens (the captured shape); tokens past a rank's draw name no
    // expert.
    for (reference::RankInputs& r : inputs) {
      r.x.resize(size_t(capacity * hidden * 2), 0);
      r.topk_idx.resize(size_t(capacity * topk), -1);
      r.weights.resize(size_t(capacity * topk), 0.0f);
      r.num_tokens = capacity;
    }
    ops.write(x.get(), inputs[rank].x.data(), inputs[rank].x.size());
    ops.write(idx.get(), inputs[rank].topk_idx.data(), inputs[rank].topk_idx.size() * 8);
    ops.write(w.get(), inputs[rank].weights.data(), inputs[rank].weights.size() * 4);
    check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
    buffer.synchronize(stream);
    const auto want = reference::low_latency_dispatch(problem, inputs);
    std::vector<reference::LowLatencyCombineRankInputs> expert(config.num_ranks);
    for (int32_t r = 0; r < config.num_ranks; ++r) {
      expert[r].x.resize(want[r].x.size() / 2);
      std::memcpy(expert[r].x.data(), want[r].x.data(), want[r].x.size());
      expert[r].weights = want[r].weights;
    }
    const auto want_y = reference::low_latency_combine(problem, inputs, want, expert)[rank];
    std::vector<uint16_t> y(size_t(capacity * hidden));
    ops.download(y.data(), out.x.view.data, y.size() * 2);
    bad = first_mismatch(y.data(), want_y.x.data(), 2, y.size(), "graph replay y");
    if (!bad.empty()) bad = "replay " + std::to_string(replay) + ": " + bad;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return bad.empty() ? bad : bad + "\n  case: " + c.describe();
}

LowLatencyCase graph_case(uint64_t seed, int num_ranks) {
  LowLatencyCase c = draw_low_latency_case(seed, num_ranks);
  c.config.fp8 = false;
  c.config.with_weights = true;
  c.config.with_aux = false;
  c.config.x_unaligned = false;
  return c;
}

class LowLatencyGraph : public ::testing::TestWithParam<int> {};

TEST_P(LowLatencyGraph, ReplaysWithNewRouting) {
  EPX_REQUIRE_GPUS(1);
  const int num_ranks = GetParam();
  const std::string failed = run_threads(
      num_ranks, Placement::kOneGpu, 120,
      [&](const ThreadRank& r) -> std::string {
        for (bool hook : {false, true}) {
          const LowLatencyCase c = graph_case(base_seed() ^ (hook ? 0x9b : 0x9a), num_ranks);
          Buffer buffer(r.comm, shared_gpu_config(c, r),
                        std::make_shared<ArenaAllocator>(size_t(1) << 28));
          const std::string bad = graph_scenario(buffer, c, r.rank, r.stream, r.ops(), hook, 4);
          if (!bad.empty()) return std::string(hook ? "hooks: " : "") + bad;
        }
        // The headline shape: 128 tokens x 7168, top-8 of 256.
        LowLatencyCase c = graph_case(base_seed() ^ 0x7168, num_ranks);
        c.config.max_tokens = 128;
        c.config.hidden = 7168;
        c.config.num_experts = 256;
        c.config.num_topk = 8;
        Buffer buffer(r.comm, shared_gpu_config(c, r),
                      std::make_shared<ArenaAllocator>(size_t(1) << 28));
        return graph_scenario(buffer, c, r.rank, r.stream, r.ops(), false, 3);
      },
      300);
  EXPECT_EQ(failed, "");
}

// R = 8: bench_gpu's 8-rank graph stage did not finish in 180 s at the headline shape
// (docs/performance.md, "Low-latency mode"); here it either passes or names what failed.
INSTANTIATE_TEST_SUITE_P(Ranks, LowLatencyGraph, ::testing::Values(1, 2, 4, 8),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

TEST(LowLatencyNccl, GraphReplaysWithNewRouting) {
  EPX_REQUIRE_GPUS(1);
  EXPECT_EQ(on_nccl_rank(
                [](RankContext& ctx) {
                  const LowLatencyCase c = graph_case(base_seed() ^ 0x9c, 1);
                  Buffer buffer(ctx.comm, low_latency_buffer_config(c),
                                std::make_shared<ArenaAllocator>(size_t(1) << 28));
                  return graph_scenario(buffer, c, 0, ctx.stream, ctx.ops(), true, 4);
                },
                300),
            "");
}

// --- errors ------------------------------------------------------------------------------------

LowLatencyCase error_case() {
  LowLatencyCase c = graph_case(4242, 3);
  c.config.max_tokens = 4;
  c.config.hidden = 64;
  c.config.num_experts = 6;
  c.config.num_topk = 2;
  return c;
}

// `num_ranks` ranks (3 unless told) on GPU 0 run `bad` and then synchronise: "" when every rank
// raised `code` with `needle` (the rank `bad_rank`, where its own message differs, is not held
// to it).
void expect_all_raise(ErrorCode code, int bad_rank, const std::string& needle,
                      const std::function<void(Buffer&, const ThreadRank&)>& bad,
                      double timeout_seconds = 20, int num_ranks = 3) {
  const LowLatencyCase c = error_case();
  const std::string failed = run_threads(
      num_ranks, Placement::kOneGpu, 60,
      [&](const ThreadRank& r) -> std::string {
        Buffer buffer(r.comm, shared_gpu_config(c, r, timeout_seconds), poisoned_cuda_allocator());
        return expect_raise(buffer, r, code, bad_rank, needle, bad, "[epx-gpu-low-latency]");
      },
      300);
  EXPECT_EQ(failed, "");
}

// Rank `rank`'s small inputs on the device: `tokens` tokens (2 unless told), token t naming
// experts t + k + rank (mod E) at its k, or every (t, k) naming `only_expert` where given.
struct SmallInputs {
  std::shared_ptr<void> x, topk;
  DispatchInputs view;
};
SmallInputs small_inputs(const Buffer& buffer, const ThreadRank& r, int64_t tokens = 2,
                         std::optional<int32_t> only_expert = std::nullopt) {
  const BufferConfig& config = buffer.config();
  std::vector<uint16_t> x(size_t(tokens * config.hidden), 0x3f80);
  std::vector<int32_t> topk;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < config.num_topk; ++k) {
      topk.push_back(only_expert ? *only_expert
                                 : static_cast<int32_t>((t + k + r.rank) % config.num_experts));
    }
  }
  const DeviceOps ops = r.ops();
  SmallInputs in;
  in.x = ops.upload(x.data(), x.size() * 2);
  in.topk = ops.upload(topk.data(), topk.size() * 4);
  in.view.x = TensorView(in.x.get(), DType::kBFloat16, {tokens, config.hidden}, buffer.device());
  in.view.topk_idx =
      TensorView(in.topk.get(), DType::kInt32, {tokens, config.num_topk}, buffer.device());
  return in;
}

TEST(LowLatencyErrors, TwoDispatchesInARowRaiseEverywhere) {
  EPX_REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidArgument, -1, "out of turn",
                   [](Buffer& b, const ThreadRank& r) {
                     SmallInputs in = small_inputs(b, r);
                     b.low_latency_dispatch(in.view, {}, r.stream);
                     b.low_latency_dispatch(in.view, {}, r.stream);
                   });
}

TEST(LowLatencyErrors, BadInputOnOneRankRaisesEverywhere) {
  EPX_REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidArgument, 1, "rank 1 dropped its part",
                   [](Buffer& b, const ThreadRank& r) {
                     SmallInputs in = small_inputs(b, r);
                     if (r.rank == 1) in.view.x.dtype = DType::kFloat32;
                     b.low_latency_dispatch(in.view, {}, r.stream);
                   });
}

TEST(LowLatencyErrors, InvalidRoutingOnOneRankRaisesEverywhere) {
  EPX_REQUIRE_GPUS(1);
  expect_all_raise(ErrorCode::kInvalidRouting, 2, "rank 2 passed a topk_idx value",
                   [](Buffer& b, const ThreadRank& r) {
                     SmallInputs in = small_inputs(b, r);
                     if (r.rank == 2) {
                       const int32_t bad = static_cast<int32_t>(b.config().num_experts);
                       r.ops().write(in.topk.get(), &bad, 4);
                     }
                     b.low_latency_dispatch(in.view, {}, r.stream);
                   });
}

// One rank, which has no peer to learn of its errors from and whose own flags are never read:
// misuse raises as with several: out of turn, a value outside [-1, E), an expert named more
// times than its region has rows (4 tokens naming expert 0 at both k: 8 rows for a region of 4;
// the only test of that overflow on the GPU).
TEST(LowLatencyErrors, OneRankRaisesAsSeveralDo) {
  EPX_REQUIRE_GPUS(1);
  expect_all_raise(
      ErrorCode::kInvalidArgument, -1, "out of turn",
      [](Buffer& b, const ThreadRank& r) {
        SmallInputs in = small_inputs(b, r);
        b.low_latency_dispatch(in.view, {}, r.stream);
        b.low_latency_dispatch(in.view, {}, r.stream);
      },
      20, 1);
  expect_all_raise(
      ErrorCode::kInvalidRouting, -1, "passed topk_idx value -2",
      [](Buffer& b, const ThreadRank& r) {
        SmallInputs in = small_inputs(b, r);
        const int32_t bad = -2;
        r.ops().write(static_cast<char*>(in.topk.get()) + 4, &bad, 4);
        b.low_latency_dispatch(in.view, {}, r.stream);
      },
      20, 1);
  expect_all_raise(
      ErrorCode::kInvalidRouting, -1, "expert 0 received 8 rows, more than its region's 4",
      [](Buffer& b, const ThreadRank& r) {
        SmallInputs in = small_inputs(b, r, b.config().low_latency_max_tokens, 0);
        b.low_latency_dispatch(in.view, {}, r.stream);
        b.synchronize(r.stream);
      },
      20, 1);
}

// Rank 1 builds its buffer but never dispatches: the others raise kTimeout naming the phase and
// rank 1 after the buffer's 2 s.
TEST(LowLatencyErrors, MissingPeerTimesOut) {
  EPX_REQUIRE_GPUS(1);
  const LowLatencyCase c = error_case();
  const std::string failed = run_threads(
      3, Placement::kOneGpu, 60,
      [&](const ThreadRank& r) -> std::string {
        Buffer buffer(r.comm, shared_gpu_config(c, r, 2.0));
        if (r.rank == 1) return "";
        SmallInputs in = small_inputs(buffer, r);
        const auto start = std::chrono::steady_clock::now();
        try {
          buffer.low_latency_dispatch(in.view, {}, r.stream);
          buffer.synchronize(r.stream);
          return "no error was raised";
        } catch (const Error& error) {
          const double seconds =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          const std::string what = error.what();
          std::cout << "[epx-gpu-low-latency] rank " << r.rank << " after " << seconds
                    << " s: " << what << std::endl;
          if (error.code() != ErrorCode::kTimeout ||
              what.find("low-latency-dispatch/wait") == std::string::npos ||
              what.find("waiting for rank 1") == std::string::npos) {
            return "unexpected: " + what;
          }
          if (seconds > 20) return "took " + std::to_string(seconds) + " s";
        }
        return "";
      },
      120);
  EXPECT_EQ(failed, "");
}

}  // namespace
}  // namespace epx::testing
