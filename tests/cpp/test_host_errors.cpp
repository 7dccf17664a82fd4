// Every bad input listed under "Errors" in docs/semantics.md gets a clear epx::Error with the
// right code, on the host transport, and leaves the buffer usable: after each rejected call a full
// valid scenario still matches the reference bit for bit (nothing corrupted, nothing left
// half-done).
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <functional>

#include "common/multi_process.hpp"
#include "common/scenario.hpp"
#include "epx/error.hpp"

namespace epx::testing {
namespace {

constexpr int kRanks = 2;

RandomConfig base_config() {
  RandomConfig config = draw_config(424242, kRanks);
  config.max_tokens = 16;
  config.hidden = 64;
  config.num_experts = 8;
  config.num_topk = 3;
  config.fp8 = false;
  config.with_weights = true;
  config.expand = true;
  return config;
}

// Host tensors for one rank's valid call.
struct Inputs {
  std::vector<uint16_t> x;
  std::vector<int64_t> topk;
  std::vector<float> weights;
  int64_t tokens;
  DispatchInputs view(const BufferConfig& c) {
    DispatchInputs in;
    in.x = TensorView(x.data(), DType::kBFloat16, {tokens, c.hidden}, Device::cpu());
    in.topk_idx = TensorView(topk.data(), DType::kInt64, {tokens, c.num_topk}, Device::cpu());
    in.weights = TensorView(weights.data(), DType::kFloat32, {tokens, c.num_topk}, Device::cpu());
    return in;
  }
};

Inputs make_inputs(const BufferConfig& c, int rank) {
  Inputs in;
  in.tokens = 5 + rank;
  in.x.assign(static_cast<size_t>(in.tokens * c.hidden), 0x3f80);  // 1.0
  for (size_t i = 0; i < in.x.size(); ++i) in.x[i] = static_cast<uint16_t>(0x3f80 + (i % 97));
  for (int64_t t = 0; t < in.tokens; ++t) {
    for (int64_t k = 0; k < c.num_topk; ++k)
      in.topk.push_back((t * 3 + k * 5 + rank) % c.num_experts);
  }
  in.weights.assign(in.topk.size(), 0.5f);
  return in;
}

// Runs `bad` on every rank (it must throw `code` with `needle` in the message), then a valid
// random scenario on the same buffer.
void expect_error_then_recovery(ErrorCode code, const std::string& needle,
                                const std::function<void(Buffer&, int rank)>& bad) {
  const RandomConfig config = base_config();
  const std::string name = unique_name("he");
  const auto outcomes = run_ranks(
      kRanks,
      [&](int rank) -> std::string {
        Buffer buffer(Comm::host(rank, kRanks, name), buffer_config_for(config, 20),
                      poisoned_host_allocator());
        try {
          bad(buffer, rank);
          return "no error was raised";
        } catch (const Error& error) {
          if (error.code() != code) {
            return std::string("wrong code ") + to_string(error.code()) + ": " + error.what();
          }
          if (std::string(error.what()).find(needle) == std::string::npos) {
            return std::string("message lacks '") + needle + "': " + error.what();
          }
        }
        return run_scenario(buffer, config, rank, host_device_ops());
      },
      60);
  EXPECT_EQ(failures(outcomes), "");
}

TEST(HostErrors, WrongDtype) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "x must be", [](Buffer& b, int rank) {
    Inputs in = make_inputs(b.config(), rank);
    DispatchInputs view = in.view(b.config());
    view.x.dtype = DType::kFloat32;
    b.dispatch(view);
  });
}

TEST(HostErrors, WrongHidden) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "hidden size", [](Buffer& b, int rank) {
    Inputs in = make_inputs(b.config(), rank);
    DispatchInputs view = in.view(b.config());
    view.x.shape[1] = b.config().hidden / 2;
    b.dispatch(view);
  });
}

TEST(HostErrors, TooManyTokens) {
  expect_error_then_recovery(
      ErrorCode::kInvalidArgument, "max_tokens_per_rank", [](Buffer& b, int) {
        const BufferConfig& c = b.config();
        const int64_t tokens = c.max_tokens_per_rank + 1;
        std::vector<uint16_t> x(tokens * c.hidden, 0x3f80);
        std::vector<int32_t> topk(tokens * c.num_topk, 0);
        DispatchInputs in;
        in.x = TensorView(x.data(), DType::kBFloat16, {tokens, c.hidden}, Device::cpu());
        in.topk_idx = TensorView(topk.data(), DType::kInt32, {tokens, c.num_topk}, Device::cpu());
        b.dispatch(in);
      });
}

TEST(HostErrors, WrongTopk) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "topk_idx must have shape",
                             [](Buffer& b, int rank) {
                               Inputs in = make_inputs(b.config(), rank);
                               DispatchInputs view = in.view(b.config());
                               view.topk_idx.shape[1] = b.config().num_topk - 1;
                               view.weights = TensorView();
                               b.dispatch(view);
                             });
}

TEST(HostErrors, NonContiguous) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "contiguous", [](Buffer& b, int rank) {
    Inputs in = make_inputs(b.config(), rank);
    DispatchInputs view = in.view(b.config());
    view.x.strides = {1, view.x.shape[0]};  // a transposed view
    b.dispatch(view);
  });
}

TEST(HostErrors, WrongDevice) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "must be on cpu",
                             [](Buffer& b, int rank) {
                               Inputs in = make_inputs(b.config(), rank);
                               DispatchInputs view = in.view(b.config());
                               view.weights.device = Device::cuda(0);
                               b.dispatch(view);
                             });
}

// One rank passes an out-of-range expert; the other is valid. Both must raise (after the
// exchange, so nobody waits forever) and no rows from the bad rank may land anywhere.
TEST(HostErrors, ExpertOutOfRangeOnOneRank) {
  expect_error_then_recovery(ErrorCode::kInvalidRouting, "rank 1 passed topk_idx value",
                             [](Buffer& b, int rank) {
                               Inputs in = make_inputs(b.config(), rank);
                               if (rank == 1) in.topk[3] = b.config().num_experts;
                               b.dispatch(in.view(b.config()));
                             });
}

TEST(HostErrors, ExpertBelowMinusOne) {
  expect_error_then_recovery(ErrorCode::kInvalidRouting, "value -2", [](Buffer& b, int rank) {
    Inputs in = make_inputs(b.config(), rank);
    in.topk[0] = -2;
    b.dispatch(in.view(b.config()));
  });
}

// Only rank 0 passes a bad tensor: it raises the validation error at once, and rank 1 learns
// of it through the entry barrier (well inside the timeout) instead of waiting for it.
TEST(HostErrors, BadInputOnOneRankAbortsThePeers) {
  const RandomConfig config = base_config();
  const std::string name = unique_name("he");
  const auto outcomes = run_ranks(
      kRanks,
      [&](int rank) -> std::string {
        Buffer buffer(Comm::host(rank, kRanks, name), buffer_config_for(config, 20),
                      poisoned_host_allocator());
        Inputs in = make_inputs(buffer.config(), rank);
        DispatchInputs view = in.view(buffer.config());
        if (rank == 0) view.x.dtype = DType::kFloat32;
        const auto start = std::chrono::steady_clock::now();
        try {
          buffer.dispatch(view);
          return "no error was raised";
        } catch (const Error& error) {
          const std::string what = error.what();
          const double seconds =
              std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
          if (error.code() != ErrorCode::kInvalidArgument) return "wrong code: " + what;
          const std::string needle = rank == 0 ? "x must be" : "rank 0 rejected its input";
          if (what.find(needle) == std::string::npos)
            return "message lacks '" + needle + "': " + what;
          if (seconds > 5) return "took " + std::to_string(seconds) + " s";
        }
        return run_scenario(buffer, config, rank, host_device_ops());
      },
      60);
  EXPECT_EQ(failures(outcomes), "");
}

TEST(HostErrors, ChannelsDisagree) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "weights given on rank 1, not on rank 0",
                             [](Buffer& b, int rank) {
                               Inputs in = make_inputs(b.config(), rank);
                               DispatchInputs view = in.view(b.config());
                               if (rank == 0) view.weights = TensorView();
                               b.dispatch(view);
                             });
}

// The operations below need a valid handle first; the dispatch that makes it is collective.
DispatchResult valid_dispatch(Buffer& b, int rank, bool expand, Inputs& keep) {
  keep = make_inputs(b.config(), rank);
  DispatchOptions options;
  options.expand = expand;
  return b.dispatch(keep.view(b.config()), options);
}

TEST(HostErrors, WeightsWithCompactCombine) {
  expect_error_then_recovery(
      ErrorCode::kInvalidArgument, "compact handle", [](Buffer& b, int rank) {
        Inputs keep;
        DispatchResult d = valid_dispatch(b, rank, false, keep);
        std::vector<float> w(d.handle.num_recv_tokens, 1.0f);
        CombineInputs in;
        in.x = d.x.view;
        in.weights =
            TensorView(w.data(), DType::kFloat32, {d.handle.num_recv_tokens}, Device::cpu());
        b.combine(in, d.handle);
      });
}

TEST(HostErrors, RowCountDisagreesWithHandle) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "rows", [](Buffer& b, int rank) {
    Inputs keep;
    DispatchResult d = valid_dispatch(b, rank, true, keep);
    CombineInputs in;
    in.x = d.x.view;
    in.x.shape[0] += 1;
    b.combine(in, d.handle);
  });
}

TEST(HostErrors, HandleFromAnotherBuffer) {
  expect_error_then_recovery(ErrorCode::kHandleMismatch, "another buffer", [](Buffer& b, int rank) {
    Inputs keep;
    DispatchResult d = valid_dispatch(b, rank, true, keep);
    Handle forged = d.handle;
    forged.buffer_id ^= 1;
    CombineInputs in;
    in.x = d.x.view;
    b.combine(in, forged);
  });
}

TEST(HostErrors, CompactHandleToCombineBackward) {
  expect_error_then_recovery(
      ErrorCode::kHandleMismatch, "expanded handle", [](Buffer& b, int rank) {
        Inputs keep;
        DispatchResult d = valid_dispatch(b, rank, false, keep);
        b.combine_backward(keep.view(b.config()).x, d.handle, d.x.view, TensorView());
      });
}

TEST(HostErrors, TopkGivenToCachedDispatch) {
  expect_error_then_recovery(ErrorCode::kInvalidArgument, "omit topk_idx", [](Buffer& b, int rank) {
    Inputs keep;
    DispatchResult d = valid_dispatch(b, rank, true, keep);
    b.dispatch(keep.view(b.config()), d.handle);
  });
}

TEST(HostErrors, BadConfig) {
  BufferConfig config;
  config.max_tokens_per_rank = 8;
  config.hidden = 64;
  config.num_topk = 2;
  config.num_experts = 7;  // not a multiple of the 2 ranks
  try {
    (void)workspace_bytes(config, 2);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kInvalidArgument);
    EXPECT_NE(std::string(error.what()).find("multiple"), std::string::npos) << error.what();
  }
  config.num_experts = 8;
  EXPECT_GT(workspace_bytes(config, 2), size_t(2 * 8 * 64 * 2));
}

}  // namespace
}  // namespace epx::testing
