// The low-latency mode on the host transport against the reference, every output element
// compared (tests/common/low_latency_scenario.hpp: routing, cached dispatch, combine zero-copy
// and copied, the hook split, combine_backward), over random configurations (R = 1, 2, 3, 4;
// uneven and zero token counts, -1 experts, all top-k on one rank, duplicates, fp8, every
// channel) and production shapes; then its errors: the mode off, inputs one rank rejects, calls
// out of turn, a hook misused, invalid routing, an expert past its region, ranks that disagree,
// a missing peer timing out. EPX_TEST_SEED=<n> replays a run.
#include <gtest/gtest.h>

#include <chrono>
#include <functional>
#include <iostream>

#include "common/low_latency_scenario.hpp"
#include "common/multi_process.hpp"
#include "common/scenario.hpp"
#include "epx/error.hpp"

namespace epx::testing {
namespace {

uint64_t base_seed() {
  return ::epx::testing::base_seed("epx-host-low-latency");
}

// Runs `fn` on `num_ranks` rank processes sharing one host-transport buffer built for `c`.
std::string on_ranks(int num_ranks, const LowLatencyCase& c, double timeout_seconds,
                     const std::function<std::string(Buffer&, int)>& fn) {
  const std::string name = unique_name("hl");
  return failures(run_ranks(
      num_ranks,
      [&](int rank) {
        Buffer buffer(Comm::host(rank, num_ranks, name),
                      low_latency_buffer_config(c, timeout_seconds), poisoned_host_allocator());
        return fn(buffer, rank);
      },
      120));
}

class HostLowLatencyRandom : public ::testing::TestWithParam<int> {};

TEST_P(HostLowLatencyRandom, MatchesReferenceBitForBit) {
  const int num_ranks = GetParam();
  const int count = num_ranks <= 2 ? 25 : 12;
  for (int i = 0; i < count; ++i) {
    const uint64_t seed = base_seed() * 1000003ull + uint64_t(num_ranks) * 7757ull + i;
    const LowLatencyCase c = draw_low_latency_case(seed, num_ranks);
    const std::string failed = on_ranks(num_ranks, c, 30, [&](Buffer& buffer, int rank) {
      return run_low_latency_scenario(buffer, c, rank, host_device_ops());
    });
    ASSERT_EQ(failed, "") << "seed " << seed;
  }
  std::cout << "[epx] R=" << num_ranks << ": " << count
            << " low-latency scenarios bit-exact with the reference" << std::endl;
}

INSTANTIATE_TEST_SUITE_P(Ranks, HostLowLatencyRandom, ::testing::Values(1, 2, 3, 4),
                         [](const auto& info) { return "R" + std::to_string(info.param); });

// Decode rows (hidden 7168 in bf16 and fp8, and 1032), top-8, with fewer experts than in
// production (64; 24 on three ranks): every region holds E * S_ll rows, which the host tests
// read back whole.
TEST(HostLowLatencyProduction, MatchesReferenceBitForBit) {
  struct Shape {
    int ranks;
    int64_t tokens, hidden;
    bool fp8;
  };
  for (const Shape& shape :
       {Shape{2, 32, 7168, false}, Shape{2, 33, 7168, true}, Shape{3, 128, 1032, false}}) {
    const LowLatencyCase c =
        production_low_latency_case(base_seed() + uint64_t(shape.hidden), shape.ranks, shape.tokens,
                                    shape.hidden, shape.fp8, 64);
    const std::string failed = on_ranks(shape.ranks, c, 60, [&](Buffer& buffer, int rank) {
      return run_low_latency_scenario(buffer, c, rank, host_device_ops());
    });
    EXPECT_EQ(failed, "");
  }
}

// A small configuration for the error cases: 2 ranks, 4 experts, top-2, S_ll = 4, hidden 16.
LowLatencyCase small_case() {
  LowLatencyCase c = draw_low_latency_case(77, 2);
  c.config.max_tokens = 4;
  c.config.hidden = 16;
  c.config.num_experts = 4;
  c.config.num_topk = 2;
  c.config.fp8 = false;
  c.config.with_weights = true;
  c.config.with_aux = false;
  c.config.x_unaligned = false;
  return c;
}

// One rank's valid inputs: `tokens` tokens of ones, token t naming experts t and t + 1.
struct SmallInputs {
  std::vector<uint16_t> x;
  std::vector<int32_t> topk;
  std::vector<float> weights;
  DispatchInputs view(const BufferConfig& config) {
    const int64_t tokens = static_cast<int64_t>(topk.size()) / config.num_topk;
    DispatchInputs in;
    in.x = TensorView(x.data(), DType::kBFloat16, {tokens, config.hidden}, Device::cpu());
    in.topk_idx = TensorView(topk.data(), DType::kInt32, {tokens, config.num_topk}, Device::cpu());
    in.weights =
        TensorView(weights.data(), DType::kFloat32, {tokens, config.num_topk}, Device::cpu());
    return in;
  }
};

SmallInputs small_inputs(const BufferConfig& config, int64_t tokens) {
  SmallInputs in;
  in.x.assign(size_t(tokens * config.hidden), 0x3f80);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < config.num_topk; ++k) {
      in.topk.push_back(static_cast<int32_t>((t + k) % config.num_experts));
    }
  }
  in.weights.assign(in.topk.size(), 0.5f);
  return in;
}

// "" when `fn` raises `code` with `needle` in its message.
std::string expect_raise(ErrorCode code, const std::string& needle,
                         const std::function<void()>& fn) {
  try {
    fn();
    return "no error was raised (expected '" + needle + "')";
  } catch (const Error& error) {
    const std::string what = error.what();
    if (error.code() != code)
      return std::string("wrong code ") + to_string(error.code()) + ": " + what;
    if (what.find(needle) == std::string::npos) return "message lacks '" + needle + "': " + what;
  }
  return "";
}

// After an LL error the mode raises kUnusable; the buffer's normal operations still work.
std::string expect_mode_failed(Buffer& buffer, int rank) {
  SmallInputs in = small_inputs(buffer.config(), 2);
  std::string bad = expect_raise(ErrorCode::kUnusable, "low-latency mode failed",
                                 [&] { buffer.low_latency_dispatch(in.view(buffer.config())); });
  if (!bad.empty()) return "after the error: " + bad;
  RandomConfig normal = small_case().config;
  normal.max_tokens = 1;
  normal.expand = true;
  return run_scenario(buffer, normal, rank, host_device_ops());
}

TEST(HostLowLatencyErrors, ModeOffRaises) {
  LowLatencyCase c = small_case();
  const std::string name = unique_name("hl");
  EXPECT_EQ(failures(run_ranks(2,
                               [&](int rank) {
                                 BufferConfig config = low_latency_buffer_config(c);
                                 config.low_latency_max_tokens = 0;
                                 Buffer buffer(Comm::host(rank, 2, name), config);
                                 SmallInputs in = small_inputs(config, 1);
                                 return expect_raise(
                                     ErrorCode::kInvalidArgument, "low_latency_max_tokens is 0",
                                     [&] { buffer.low_latency_dispatch(in.view(config)); });
                               })),
            "");
}

TEST(HostLowLatencyErrors, TooManyTokensOnOneRankRaisesEverywhere) {
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int rank) {
                       SmallInputs in = small_inputs(b.config(), rank == 1 ? 5 : 2);
                       const std::string bad =
                           rank == 1
                               ? expect_raise(ErrorCode::kInvalidArgument,
                                              "more than low_latency_max_tokens",
                                              [&] { b.low_latency_dispatch(in.view(b.config())); })
                               : expect_raise(ErrorCode::kInvalidArgument,
                                              "rank 1 dropped its part",
                                              [&] { b.low_latency_dispatch(in.view(b.config())); });
                       return bad.empty() ? expect_mode_failed(b, rank) : bad;
                     }),
            "");
}

TEST(HostLowLatencyErrors, CallsOutOfTurnRaise) {
  // Two dispatches in a row: the second is dropped and raises on every rank.
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int rank) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       b.low_latency_dispatch(in.view(b.config()));
                       const std::string bad =
                           expect_raise(ErrorCode::kInvalidArgument, "out of turn",
                                        [&] { b.low_latency_dispatch(in.view(b.config())); });
                       return bad.empty() ? expect_mode_failed(b, rank) : bad;
                     }),
            "");
  // Two combines in a row.
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       const LowLatencyDispatchResult r =
                           b.low_latency_dispatch(in.view(b.config()));
                       b.low_latency_combine({.x = b.low_latency_combine_input().view}, r.handle);
                       return expect_raise(ErrorCode::kInvalidArgument, "out of turn", [&] {
                         b.low_latency_combine({.x = b.low_latency_combine_input().view}, r.handle);
                       });
                     }),
            "");
}

TEST(HostLowLatencyErrors, HookMisuseRaisesAndChangesNothing) {
  const LowLatencyCase c = small_case();
  EXPECT_EQ(on_ranks(2, c, 10,
                     [&](Buffer& b, int rank) {
                       std::string bad = expect_raise(ErrorCode::kInvalidArgument,
                                                      "no low-latency call returned a hook",
                                                      [&] { b.low_latency_wait(); });
                       SmallInputs in = small_inputs(b.config(), 2);
                       const LowLatencyDispatchResult r =
                           b.low_latency_dispatch(in.view(b.config()), {.return_hook = true});
                       if (bad.empty()) {
                         bad = expect_raise(ErrorCode::kInvalidArgument, "wait has not run", [&] {
                           b.low_latency_combine({.x = b.low_latency_combine_input().view},
                                                 r.handle);
                         });
                       }
                       if (!bad.empty()) return bad;
                       b.low_latency_wait();
                       b.low_latency_combine({.x = b.low_latency_combine_input().view}, r.handle);
                       return run_low_latency_scenario(b, c, rank, host_device_ops());
                     }),
            "");
}

TEST(HostLowLatencyErrors, InvalidRoutingOnOneRankRaisesEverywhere) {
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int rank) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       if (rank == 0) in.topk[1] = 4;  // E = 4: outside [-1, E)
                       const std::string needle = rank == 0 ? "this rank passed topk_idx value 4"
                                                            : "rank 0 passed a topk_idx value";
                       const std::string bad =
                           expect_raise(ErrorCode::kInvalidRouting, needle,
                                        [&] { b.low_latency_dispatch(in.view(b.config())); });
                       return bad.empty() ? expect_mode_failed(b, rank) : bad;
                     }),
            "");
}

TEST(HostLowLatencyErrors, AnExpertPastItsRegionRaises) {
  LowLatencyCase c = small_case();
  c.config.num_experts = 2;
  c.config.max_tokens = 2;  // R * S_ll = 4 rows per expert
  EXPECT_EQ(on_ranks(2, c, 10,
                     [](Buffer& b, int rank) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       // Both tokens of both ranks name expert 1 twice: 8 rows for its 4.
                       for (int32_t& e : in.topk) e = 1;
                       const std::string needle =
                           rank == 1 ? "received 8 rows, more than its region's 4" : "";
                       std::string bad;
                       try {
                         b.low_latency_dispatch(in.view(b.config()));
                         if (rank == 1) bad = "no error was raised";
                       } catch (const Error& error) {
                         const std::string what = error.what();
                         if (rank == 0 || error.code() != ErrorCode::kInvalidRouting ||
                             what.find(needle) == std::string::npos) {
                           bad = "unexpected: " + what;
                         }
                       }
                       return bad;
                     }),
            "");
}

TEST(HostLowLatencyErrors, RanksThatDisagreeRaise) {
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int rank) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       DispatchInputs view = in.view(b.config());
                       if (rank == 1) view.weights = TensorView();
                       const std::string bad = expect_raise(
                           ErrorCode::kInvalidArgument, "weights given on rank 0, not on rank 1",
                           [&] { b.low_latency_dispatch(view); });
                       return bad.empty() ? expect_mode_failed(b, rank) : bad;
                     }),
            "");
}

TEST(HostLowLatencyErrors, HandleOfAnotherBufferRaises) {
  EXPECT_EQ(on_ranks(2, small_case(), 10,
                     [](Buffer& b, int) {
                       SmallInputs in = small_inputs(b.config(), 2);
                       LowLatencyHandle handle = b.low_latency_dispatch(in.view(b.config())).handle;
                       handle.buffer_id ^= 1;
                       return expect_raise(ErrorCode::kHandleMismatch, "another buffer", [&] {
                         b.low_latency_combine({.x = b.low_latency_combine_input().view}, handle);
                       });
                     }),
            "");
}

// Rank 1 builds its buffer but never dispatches: rank 0 raises kTimeout naming the phase and
// rank 1 after the buffer's 1 s, and its buffer is unusable afterwards.
TEST(HostLowLatencyTimeout, MissingPeerTimesOut) {
  EXPECT_EQ(
      on_ranks(
          2, small_case(), 1.0,
          [](Buffer& b, int rank) -> std::string {
            if (rank == 1) return "";
            SmallInputs in = small_inputs(b.config(), 2);
            const auto start = std::chrono::steady_clock::now();
            std::string bad =
                expect_raise(ErrorCode::kTimeout,
                             "low-latency-dispatch/wait timed out after 1 s waiting for rank 1",
                             [&] { b.low_latency_dispatch(in.view(b.config())); });
            const double seconds =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            if (bad.empty() && seconds > 10) bad = "took " + std::to_string(seconds) + " s";
            if (bad.empty()) {
              bad = expect_raise(ErrorCode::kUnusable, "failed earlier",
                                 [&] { b.low_latency_dispatch(in.view(b.config())); });
            }
            return bad;
          }),
      "");
}

}  // namespace
}  // namespace epx::testing
