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

#include "common/arena_allocator.hpp"
#include "common/cuda_device_ops.hpp"
#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "cpp/multi_process.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
namespace {

int gpu_count() {
  static const int count = count_cuda_devices();
  return count;
}

uint64_t base_seed() {
  static const uint64_t seed = [] {
    const char* env = std::getenv("EPX_TEST_SEED");
    const uint64_t value = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::cout << "[epx-gpu-threads] base seed " << value << " (EPX_TEST_SEED=" << value
              << " replays this run)" << std::endl;
    return value;
  }();
  return seed;
}

#define REQUIRE_GPUS(n)                                                          \
  if (gpu_count() < (n)) {                                                       \
    GTEST_SKIP() << "needs " << (n) << " GPU(s), " << gpu_count() << " visible"; \
  }

// Where the ranks run: all on device 0, or rank r on device r % (visible devices).
enum class Placement { kOneGpu, kSpread };

// A rank thread's context.
struct ThreadRank {
  int rank;
  int num_ranks;
  int device;
  int ranks_on_device;  // ranks sharing this rank's device (their blocks must all fit)
  cudaStream_t stream;
  Comm comm;
  DeviceOps ops() const { return cuda_device_ops(device, stream); }
};

// Runs fn on `num_ranks` threads of one forked child (a ThreadGroup with `group_timeout`);
// "" when every rank returned "", else one line per failing rank. The child is killed after
// `timeout_seconds`, so a deadlock fails the test instead of hanging it.
std::string run_threads(int num_ranks, Placement placement, double group_timeout,
                        const std::function<std::string(const ThreadRank&)>& fn,
                        double timeout_seconds) {
  const auto outcomes = run_ranks(
      1,
      [&](int) -> std::string {
        int num_devices = 0;
        check_cuda(cudaGetDeviceCount(&num_devices), "cudaGetDeviceCount");
        const int used_devices =
            placement == Placement::kOneGpu ? 1 : std::min(num_devices, num_ranks);
        const ThreadGroup group = ThreadGroup::create(num_ranks, group_timeout);
        std::vector<std::string> results(num_ranks);
        std::vector<std::thread> threads;
        for (int rank = 0; rank < num_ranks; ++rank) {
          threads.emplace_back([&, rank] {
            try {
              const int device = rank % used_devices;
              const int sharing = (num_ranks - device + used_devices - 1) / used_devices;
              check_cuda(cudaSetDevice(device), "cudaSetDevice");
              cudaStream_t stream;
              check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
              results[rank] = fn(ThreadRank{rank, num_ranks, device, sharing, stream,
                                            Comm::cuda_threads(group, rank, device)});
              // The stream is left alive: outputs still owned by the caller free on it.
            } catch (const std::exception& error) {
              results[rank] = std::string("threw: ") + error.what();
            }
          });
        }
        for (auto& thread : threads) thread.join();
        std::string failed;
        for (int rank = 0; rank < num_ranks; ++rank) {
          if (!results[rank].empty())
            failed += "rank " + std::to_string(rank) + ": " + results[rank] + "\n";
        }
        return failed;
      },
      timeout_seconds);
  return failures(outcomes);
}

// The buffer for a thread rank: ranks that share a device spin in kernels that wait for each
// other, so all their blocks must be resident at once (at most one 512-thread block per SM is
// assumed): each rank gets its share of the SMs, at most 24.
BufferConfig thread_buffer_config(const RandomConfig& config, const ThreadRank& r,
                                  double timeout_seconds = 60) {
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
  const char* env = std::getenv("EPX_GPU_CONFIGS");
  const int count = env ? std::atoi(env) : 40;
  const uint64_t seed0 = base_seed() * 1000003ull + uint64_t(num_ranks) * 7919ull +
                         (param.placement == Placement::kSpread ? 104729ull : 0);
  const std::string failed = run_threads(
      num_ranks, param.placement, 120,
      [&](const ThreadRank& r) -> std::string {
        const DeviceOps ops = r.ops();
        for (int i = 0; i < count; ++i) {
          const uint64_t seed = seed0 + i;
          const RandomConfig config = draw_config(seed, num_ranks);
          RandomConfig again = config;
          again.seed = seed ^ 0xa5a5a5a5ull;
          again.expand = !config.expand;
          again.sync_counts = !config.sync_counts;
          Buffer buffer(r.comm, thread_buffer_config(config, r), poisoned_cuda_allocator());
          for (const RandomConfig* c : {&config, static_cast<const RandomConfig*>(&again)}) {
            const std::string failure = run_scenario(buffer, *c, r.rank, ops);
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
        return "";
      },
      560);
  EXPECT_EQ(failed, "");
}

const char* cuda_error(cudaError_t status) {
  return cudaGetErrorString(status);
}

// As test_gpu's GpuGraph, on every rank thread: sync_counts=false dispatch + combine captured
// once per rank (thread-local capture mode: the other threads keep issuing work meanwhile),
// then replayed with new input values written into the captured inputs; every replay matches
// the reference.
class ThreadsGraph : public ::testing::TestWithParam<int> {};

TEST_P(ThreadsGraph, CaptureAndReplay) {
  REQUIRE_GPUS(1);
  const int n = GetParam();
  const uint64_t seed = base_seed() ^ 0x9a9a;
  const std::string failed = run_threads(
      n, Placement::kOneGpu, 120,
      [&](const ThreadRank& r) -> std::string {
        RandomConfig config = draw_config(seed, n);
        config.fp8 = false;
        config.expand = true;
        config.sync_counts = false;
        config.with_weights = true;
        config.with_aux = false;
        config.with_scalars = false;
        config.with_bias0 = config.with_bias1 = false;
        config.reduce_at_source = false;
        config.topk_int64 = true;
        const reference::Problem problem = config.problem();
        Buffer buffer(r.comm, thread_buffer_config(config, r),
                      std::make_shared<ArenaAllocator>(size_t(1) << 28));
        const DeviceOps ops = r.ops();
        auto inputs = draw_dispatch_inputs(config);
        const int64_t tokens = inputs[r.rank].num_tokens, hidden = config.hidden;
        const int64_t k = config.num_topk;
        auto x = ops.upload(inputs[r.rank].x.data(), inputs[r.rank].x.size());
        auto topk = ops.upload(inputs[r.rank].topk_idx.data(), inputs[r.rank].topk_idx.size() * 8);
        auto w = ops.upload(inputs[r.rank].weights.data(), inputs[r.rank].weights.size() * 4);
        DispatchInputs din;
        din.x = TensorView(x.get(), DType::kBFloat16, {tokens, hidden}, buffer.device());
        din.topk_idx = TensorView(topk.get(), DType::kInt64, {tokens, k}, buffer.device());
        din.weights = TensorView(w.get(), DType::kFloat32, {tokens, k}, buffer.device());
        DispatchOptions options;
        options.expand = true;
        options.expert_alignment = config.expert_alignment;
        options.sync_counts = false;

        // Warm-up outside the capture (collective, like every operation), then the capture, which
        // runs nothing: the peers' captures need nothing from this rank.
        (void)buffer.dispatch(din, options, r.stream);
        buffer.synchronize(r.stream);
        cudaGraph_t graph;
        cudaError_t status = cudaStreamBeginCapture(r.stream, cudaStreamCaptureModeThreadLocal);
        EPX_CHECK(status == cudaSuccess, kTransport, "begin capture: " << cuda_error(status));
        DispatchResult recv = buffer.dispatch(din, options, r.stream);
        CombineInputs cin;
        cin.x = recv.x.view;  // combine the dispatched rows themselves, weighted
        cin.weights = recv.weights.view;
        CombineResult out = buffer.combine(cin, recv.handle, {}, r.stream);
        status = cudaStreamEndCapture(r.stream, &graph);
        EPX_CHECK(status == cudaSuccess, kTransport, "end capture: " << cuda_error(status));
        cudaGraphExec_t exec;
        status = cudaGraphInstantiate(&exec, graph, 0);
        EPX_CHECK(status == cudaSuccess, kTransport, "instantiate: " << cuda_error(status));

        std::string bad;
        for (int replay = 0; replay < 3 && bad.empty(); ++replay) {
          // Every thread draws the same new values for every rank (the reference needs them all).
          std::mt19937_64 rng(config.seed + 100 * replay);
          for (auto& in : inputs) {
            for (size_t i = 0; i + 1 < in.x.size(); i += 2) {
              const uint16_t bits = random_bf16(rng);
              std::memcpy(&in.x[i], &bits, 2);
            }
          }
          status = cudaMemcpyAsync(x.get(), inputs[r.rank].x.data(), inputs[r.rank].x.size(),
                                   cudaMemcpyHostToDevice, r.stream);
          EPX_CHECK(status == cudaSuccess, kTransport, "new inputs: " << cuda_error(status));
          status = cudaGraphLaunch(exec, r.stream);
          EPX_CHECK(status == cudaSuccess, kTransport, "graph launch: " << cuda_error(status));
          buffer.synchronize(r.stream);
          const auto want =
              reference::dispatch(problem, inputs, true, config.expert_alignment, false);
          std::vector<reference::CombineRankInputs> cin_ref(n);
          for (int q = 0; q < n; ++q) {
            cin_ref[q].x.resize(want[q].x.size() / 2);
            std::memcpy(cin_ref[q].x.data(), want[q].x.data(), want[q].x.size());
            cin_ref[q].weights = want[q].weights;
          }
          const auto want_y = reference::combine(problem, inputs, want, true, cin_ref, false);
          std::vector<uint16_t> y(tokens * hidden);
          ops.download(y.data(), out.x.view.data, y.size() * 2);
          bad = first_mismatch(y.data(), want_y[r.rank].x.data(), 2, y.size(),
                               "graph replay combine y");
          if (!bad.empty()) bad = "replay " + std::to_string(replay) + ": " + bad;
        }
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        return bad;
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
        try {
          bad(buffer, r);
          buffer.synchronize(r.stream);
          return "no error was raised";
        } catch (const Error& error) {
          const std::string what = error.what();
          std::cout << "[epx-gpu-threads] rank " << r.rank << " raised as expected: " << what
                    << std::endl;
          if (error.code() != code) return "wrong code: " + what;
          if (r.rank != bad_rank && what.find(peer_needle) == std::string::npos) {
            return "message lacks '" + peer_needle + "': " + what;
          }
        }
        return run_scenario(buffer, config, r.rank, r.ops());
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
        const auto start = std::chrono::steady_clock::now();
        try {
          buffer.dispatch(in.view, DispatchOptions{}, r.stream);
          return "no error was raised";
        } catch (const Error& error) {
          const double seconds =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          const std::string what = error.what();
          std::cout << "[epx-gpu-threads] rank " << r.rank << " after " << seconds << " s: " << what
                    << std::endl;
          if (error.code() != ErrorCode::kTimeout) return "wrong code: " + what;
          if (what.find("phase dispatch/entry") == std::string::npos ||
              what.find("waiting for rank 1") == std::string::npos) {
            return "phase or rank missing: " + what;
          }
          if (seconds > 20) return "took " + std::to_string(seconds) + " s";
        }
        return "";
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

}  // namespace
}  // namespace epx::testing
