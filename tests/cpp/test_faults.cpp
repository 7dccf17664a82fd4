// The fault suite: what the surviving ranks see when a peer misbehaves, over every transport
// whose ranks are processes (the host transport here and in CI; CUDA IPC processes on one GPU
// where a GPU is visible). Each case is tried several times:
//   - ranks that call different operations;
//   - ranks that build their buffers with different configurations;
//   - a rank killed (SIGKILL) at a random moment while it builds its buffer;
//   - a rank killed at a random moment while the ranks exchange;
//   - a rank whose own code raises between two operations (its process leaves).
// After each, every survivor must raise an epx::Error that names the rank at fault (and, for a
// missing rank, the phase) within the buffer's timeout + 1 s; no rank may hang (the harness kills
// it) and no operation may return a wrong result without an error; no shared-memory segment may
// be left in /dev/shm; and the survivors' next buffer must work. The counts are printed.
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <iostream>
#include <random>
#include <thread>

#include "common/multi_process.hpp"
#include "common/scenario.hpp"
#include "epx/error.hpp"
#if defined(EPX_WITH_CUDA)
#include "common/cuda_device_ops.hpp"
#endif

namespace epx::testing {
namespace {

using Clock = std::chrono::steady_clock;
constexpr int kRanks = 3;
constexpr double kTimeout = 2.0;
constexpr int kTrials = 3;

uint64_t env_seed() {
  const char* env = std::getenv("EPX_TEST_SEED");
  return env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
}

// How a rank process joins the others and moves data.
struct Transport {
  const char* name;
  std::function<Comm(int rank, int num_ranks, const std::string& name)> comm;
  std::function<DeviceOps()> ops;
  std::function<std::shared_ptr<Allocator>()> allocator;
  std::string segment_prefix;  // of its shared-memory segments, before the communicator name
};

Transport host_transport() {
  return {"host", [](int r, int n, const std::string& name) { return Comm::host(r, n, name); },
          [] { return host_device_ops(); }, [] { return poisoned_host_allocator(); }, "epx-"};
}

#if defined(EPX_WITH_CUDA)
// Every rank on GPU 0: their kernels time-slice, which is slow but runs every fault.
Transport ipc_transport() {
  return {"ipc",
          [](int r, int n, const std::string& name) {
            check_cuda(cudaSetDevice(0), "cudaSetDevice");
            return Comm::ipc(r, n, name, 0);
          },
          [] {
            static cudaStream_t stream = [] {
              cudaStream_t s;
              check_cuda(cudaStreamCreate(&s), "cudaStreamCreate");
              return s;
            }();
            return cuda_device_ops(0, stream);
          },
          [] { return poisoned_cuda_allocator(); }, "epx-ipc-"};
}
#endif

RandomConfig fault_config(uint64_t seed, int num_ranks) {
  RandomConfig config = draw_config(seed, num_ranks);
  config.max_tokens = 8;
  config.hidden = 64;
  config.fp8 = false;
  return config;
}

// What a survivor's run came to, as the parent counts it: "" (it raised as it should: an
// epx::Error naming the faulty rank, or saying that a peer's buffer failed, within the timeout
// + 1 s), "silent: ..." (every operation returned, or one returned a wrong result), or another
// failure.
std::string expect_fault(const std::function<std::string()>& run, int faulty_rank,
                         const char* needle) {
  const auto start = Clock::now();
  const std::string result = run();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (result.empty()) return "silent: every operation returned without an error";
  if (result.rfind("threw: ", 0) != 0) return "silent: " + result;
  // faulty_rank < 0: any peer may be named (ranks that disagree name the first differing peer
  // they compared; on the GPU, whichever waiting thread recorded first).
  const bool named = faulty_rank < 0 ||
                     result.find("rank " + std::to_string(faulty_rank)) != std::string::npos ||
                     result.find("failed earlier") != std::string::npos;
  if (!named || result.find(needle) == std::string::npos) {
    return "the error names neither rank " + std::to_string(faulty_rank) +
           " nor a failed peer, "
           "or lacks '" +
           needle + "': " + result;
  }
  if (seconds > kTimeout + 1.0) return "raised after " + std::to_string(seconds) + " s: " + result;
  return "";
}

// Scenarios on `buffer` until one fails (or `count` passed): "" when all passed, "threw: ..."
// when an operation raised, else the mismatch.
std::string scenarios(Buffer& buffer, uint64_t seed, int rank, int num_ranks, const DeviceOps& ops,
                      int count) {
  RandomConfig config = fault_config(seed, num_ranks);  // the buffer's sizes and options
  for (int i = 0; i < count; ++i) {
    config.seed = seed + uint64_t(i);  // fresh data each time
    const std::string failure = run_scenario(buffer, config, rank, ops);
    if (!failure.empty()) return failure;
  }
  return "";
}

// A fresh buffer on the survivors (renumbered), which must work.
std::string survivors_recover(const Transport& t, int rank, const std::string& name, int dead,
                              uint64_t seed) {
  const int survivor = rank < dead ? rank : rank - 1;
  Buffer buffer(t.comm(survivor, kRanks - 1, name + "-again"),
                buffer_config_for(fault_config(seed, kRanks - 1), kTimeout), t.allocator());
  const std::string failure = scenarios(buffer, seed, survivor, kRanks - 1, t.ops(), 1);
  return failure.empty() ? "" : "the survivors' new buffer failed: " + failure;
}

// Segments of communicator `name` left in /dev/shm.
int leaked_segments(const Transport& t, const std::string& name) {
  int count = 0;
  DIR* dir = opendir("/dev/shm");
  if (!dir) return 0;
  while (dirent* entry = readdir(dir)) {
    if (std::string(entry->d_name).rfind(t.segment_prefix + name, 0) == 0) ++count;
  }
  closedir(dir);
  return count;
}

void kill_self_within(double max_seconds, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const auto delay = std::chrono::microseconds(
      std::uniform_int_distribution<int64_t>(0, int64_t(max_seconds * 1e6))(rng));
  std::thread([delay] {
    std::this_thread::sleep_for(delay);
    kill(getpid(), SIGKILL);
  }).detach();
}

// A tiny valid routing dispatch's inputs on the transport's device.
struct TinyDispatch {
  std::shared_ptr<void> x, topk;
  DispatchInputs in;
};
TinyDispatch tiny_dispatch(const Buffer& buffer, const DeviceOps& ops, int rank) {
  const BufferConfig& c = buffer.config();
  const int64_t tokens = 4;
  std::vector<uint16_t> x(size_t(tokens * c.hidden), 0x3f80);
  std::vector<int64_t> topk(size_t(tokens * c.num_topk));
  for (size_t i = 0; i < topk.size(); ++i) topk[i] = int64_t(i * 5 + rank) % c.num_experts;
  TinyDispatch d;
  d.x = ops.upload(x.data(), x.size() * 2);
  d.topk = ops.upload(topk.data(), topk.size() * 8);
  d.in.x = TensorView(d.x.get(), DType::kBFloat16, {tokens, c.hidden}, buffer.device());
  d.in.topk_idx = TensorView(d.topk.get(), DType::kInt64, {tokens, c.num_topk}, buffer.device());
  return d;
}

struct Counts {
  int cases = 0, hangs = 0, silent = 0, other = 0, leaks = 0;
  std::string first_problem;
  void add(const std::string& what, const std::vector<RankOutcome>& outcomes, int faulty_rank,
           int leaked) {
    ++cases;
    leaks += leaked;
    for (size_t r = 0; r < outcomes.size(); ++r) {
      if (int(r) == faulty_rank) continue;
      const RankOutcome& o = outcomes[r];
      std::string problem;
      if (!o.finished) {
        ++hangs;
        problem = "hang: " + o.message;
      } else if (o.message.rfind("silent: ", 0) == 0) {
        ++silent;
        problem = o.message;
      } else if (!o.message.empty() || o.exit_code != 0) {
        ++other;
        problem = o.message;
      }
      if (!problem.empty() && first_problem.empty()) {
        first_problem = what + ", rank " + std::to_string(r) + ": " + problem;
      }
    }
    if (leaked && first_problem.empty()) first_problem = what + ": leaked shared memory";
  }
};

class Faults : public ::testing::TestWithParam<Transport> {};

TEST_P(Faults, SurvivorsRaiseNameTheRankLeakNothingAndRecover) {
  const Transport t = GetParam();
#if defined(EPX_WITH_CUDA)
  if (std::string(t.name) == "ipc" && count_cuda_devices() < 1) GTEST_SKIP() << "needs a GPU";
#endif
  Counts counts;
  const uint64_t seed0 = env_seed();
  std::cout << "[epx-faults] " << t.name << ": base seed " << seed0 << " (EPX_TEST_SEED replays)"
            << std::endl;
  auto run = [&](const std::string& what, int faulty_rank,
                 const std::function<std::string(int rank, const std::string& name)>& fn) {
    const std::string name = unique_name("fault");
    const auto outcomes = run_ranks(
        kRanks, [&](int rank) { return fn(rank, name); }, 120);
    counts.add(what, outcomes, faulty_rank,
               leaked_segments(t, name) + leaked_segments(t, name + "-again"));
  };
  for (int trial = 0; trial < kTrials; ++trial) {
    const uint64_t seed = seed0 + uint64_t(trial) * 1000;
    const BufferConfig config = buffer_config_for(fault_config(seed, kRanks), kTimeout);

    // Rank 1 combines where the others replay the dispatch: every rank raises (each names the
    // other rank of its pair), and the same buffer goes on working.
    run("mismatched operations", -1, [&](int rank, const std::string& name) -> std::string {
      Buffer buffer(t.comm(rank, kRanks, name), config, t.allocator());
      const DeviceOps ops = t.ops();
      const TinyDispatch tiny = tiny_dispatch(buffer, ops, rank);
      const DispatchResult first = buffer.dispatch(tiny.in);
      const std::string fault = expect_fault(
          [&]() -> std::string {
            try {
              if (rank == 1) {
                CombineInputs in;
                in.x = first.x.view;
                buffer.combine(in, first.handle, {}, ops.stream);
              } else {
                DispatchInputs in = tiny.in;
                in.topk_idx = TensorView();
                buffer.dispatch(in, first.handle, ops.stream);
              }
              buffer.synchronize(ops.stream);
              return "";
            } catch (const Error& error) {
              return std::string("threw: ") + error.what();
            }
          },
          -1, "disagree");
      if (!fault.empty()) return fault;
      const std::string after = scenarios(buffer, seed, rank, kRanks, ops, 1);
      return after.empty() ? "" : "the buffer failed after the mismatch: " + after;
    });

    // Rank 1 builds its buffer with twice the hidden size: every rank raises at setup.
    run("mismatched configurations", -1, [&](int rank, const std::string& name) -> std::string {
      BufferConfig mine = config;
      if (rank == 1) mine.hidden *= 2;
      return expect_fault(
          [&]() -> std::string {
            try {
              Buffer buffer(t.comm(rank, kRanks, name), mine, t.allocator());
              return "";
            } catch (const Error& error) {
              return std::string("threw: ") + error.what();
            }
          },
          rank == 1 ? 0 : 1, "hidden");
    });

    // Rank 1 is killed at a random moment in its first milliseconds: in its buffer setup, or
    // just after.
    run("killed during setup", 1, [&](int rank, const std::string& name) -> std::string {
      if (rank == 1) kill_self_within(0.004, seed);
      const std::string fault = expect_fault(
          [&]() -> std::string {
            try {
              Buffer buffer(t.comm(rank, kRanks, name), config, t.allocator());
              return scenarios(buffer, seed, rank, kRanks, t.ops(), 200);
            } catch (const Error& error) {
              return std::string("threw: ") + error.what();
            }
          },
          1, "rank");
      return fault.empty() && rank != 1 ? survivors_recover(t, rank, name, 1, seed) : fault;
    });

    // Rank 1 is killed at a random moment while the ranks exchange.
    run("killed mid-exchange", 1, [&](int rank, const std::string& name) -> std::string {
      std::string fault;
      {
        Buffer buffer(t.comm(rank, kRanks, name), config, t.allocator());
        const DeviceOps ops = t.ops();
        const std::string warm = scenarios(buffer, seed, rank, kRanks, ops, 1);
        if (!warm.empty()) return "before the kill: " + warm;
        if (rank == 1) kill_self_within(0.02, seed + 7);
        fault = expect_fault([&] { return scenarios(buffer, seed, rank, kRanks, ops, 1000); }, 1,
                             "rank");
      }
      return fault.empty() ? survivors_recover(t, rank, name, 1, seed) : fault;
    });

    // Rank 1's own code raises between two operations: its process leaves.
    run("raised between operations", 1, [&](int rank, const std::string& name) -> std::string {
      std::string fault;
      {
        Buffer buffer(t.comm(rank, kRanks, name), config, t.allocator());
        const DeviceOps ops = t.ops();
        const std::string warm = scenarios(buffer, seed, rank, kRanks, ops, 1);
        if (!warm.empty()) return "before the fault: " + warm;
        if (rank == 1) throw std::runtime_error("the caller's own error");
        fault =
            expect_fault([&] { return scenarios(buffer, seed, rank, kRanks, ops, 1); }, 1, "rank");
      }
      return fault.empty() ? survivors_recover(t, rank, name, 1, seed) : fault;
    });
  }
  std::cout << "[epx-faults] " << t.name << ": " << counts.cases << " cases, " << counts.hangs
            << " hangs, " << counts.silent << " silent wrong results, " << counts.other
            << " other failures, " << counts.leaks << " leaked segments" << std::endl;
  EXPECT_EQ(counts.hangs + counts.silent + counts.other + counts.leaks, 0) << counts.first_problem;
}

INSTANTIATE_TEST_SUITE_P(Transports, Faults,
                         ::testing::Values(host_transport()
#if defined(EPX_WITH_CUDA)
                                               ,
                                           ipc_transport()
#endif
                                               ),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace epx::testing

// A peer that never arrives gives an epx::Error(kTimeout) naming the rank and the phase within
// the configured timeout, never a hang: a rank that is never started (buffer setup), and a rank
// that dies before an operation (the operation's entry barrier).
namespace epx::testing {
namespace {

BufferConfig small_config(double timeout_seconds) {
  BufferConfig config;
  config.max_tokens_per_rank = 4;
  config.hidden = 16;
  config.num_experts = 6;
  config.num_topk = 2;
  config.timeout_seconds = timeout_seconds;
  return config;
}

std::string expect_timeout(const std::function<void()>& fn, const std::string& phase,
                           const std::string& missing_rank, double limit_seconds) {
  const auto start = std::chrono::steady_clock::now();
  try {
    fn();
    return "no error was raised";
  } catch (const Error& error) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string what = error.what();
    if (error.code() != ErrorCode::kTimeout) return "wrong code: " + what;
    if (what.find("phase " + phase) == std::string::npos) return "phase missing: " + what;
    if (what.find("waiting for rank " + missing_rank) == std::string::npos) {
      return "missing rank not named: " + what;
    }
    if (seconds > limit_seconds) return "took " + std::to_string(seconds) + " s: " + what;
  }
  return "";
}

TEST(HostTimeout, RankNeverStarted) {
  const std::string name = unique_name("ht");
  // Three ranks, rank 2 is never started.
  const auto outcomes = run_ranks(
      3,
      [&](int rank) {
        return expect_timeout([&] { Buffer buffer(Comm::host(rank, 3, name), small_config(1.0)); },
                              "buffer-setup", "2", 10.0);
      },
      60, {0, 1});
  EXPECT_TRUE(outcomes[0].finished && outcomes[0].exit_code == 0) << outcomes[0].message;
  EXPECT_TRUE(outcomes[1].finished && outcomes[1].exit_code == 0) << outcomes[1].message;
}

TEST(HostTimeout, RankDiesBeforeDispatch) {
  const std::string name = unique_name("ht");
  const auto outcomes = run_ranks(
      2,
      [&](int rank) -> std::string {
        Buffer buffer(Comm::host(rank, 2, name), small_config(1.0));
        if (rank == 1) _exit(0);  // gone without a word, as a crashed process would be
        std::vector<uint16_t> x(3 * 16, 0x3f80);
        std::vector<int32_t> topk = {0, 5, 1, -1, 3, 4};
        DispatchInputs in;
        in.x = TensorView(x.data(), DType::kBFloat16, {3, 16}, Device::cpu());
        in.topk_idx = TensorView(topk.data(), DType::kInt32, {3, 2}, Device::cpu());
        return expect_timeout([&] { buffer.dispatch(in); }, "dispatch/entry", "1", 10.0);
      },
      60);
  EXPECT_TRUE(outcomes[0].finished && outcomes[0].exit_code == 0) << outcomes[0].message;
}

}  // namespace
}  // namespace epx::testing
