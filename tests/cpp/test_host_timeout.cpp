// A peer that never arrives gives an epx::Error(kTimeout) naming the rank and the phase within
// the configured timeout, never a hang: a rank that is never started (buffer setup), and a rank
// that dies before an operation (the operation's entry barrier).
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>

#include "common/scenario.hpp"
#include "common/multi_process.hpp"
#include "epx/error.hpp"

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
  const auto outcomes = run_ranks(3, [&](int rank) {
    return expect_timeout([&] { Buffer buffer(Comm::host(rank, 3, name), small_config(1.0)); },
                          "buffer-setup", "2", 10.0);
  }, 60, {0, 1});
  EXPECT_TRUE(outcomes[0].finished && outcomes[0].exit_code == 0) << outcomes[0].message;
  EXPECT_TRUE(outcomes[1].finished && outcomes[1].exit_code == 0) << outcomes[1].message;
}

TEST(HostTimeout, RankDiesBeforeDispatch) {
  const std::string name = unique_name("ht");
  const auto outcomes = run_ranks(2, [&](int rank) -> std::string {
    Buffer buffer(Comm::host(rank, 2, name), small_config(1.0));
    if (rank == 1) _exit(0);  // gone without a word, as a crashed process would be
    std::vector<uint16_t> x(3 * 16, 0x3f80);
    std::vector<int32_t> topk = {0, 5, 1, -1, 3, 4};
    DispatchInputs in;
    in.x = TensorView(x.data(), DType::kBFloat16, {3, 16}, Device::cpu());
    in.topk_idx = TensorView(topk.data(), DType::kInt32, {3, 2}, Device::cpu());
    return expect_timeout([&] { buffer.dispatch(in); }, "dispatch/entry", "1", 10.0);
  }, 60);
  EXPECT_TRUE(outcomes[0].finished && outcomes[0].exit_code == 0) << outcomes[0].message;
}

}  // namespace
}  // namespace epx::testing
