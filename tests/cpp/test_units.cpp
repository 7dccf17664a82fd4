// Host parts of the library on their own: the routing plan and the workspace layout on
// hand-worked cases, output batching, the thread group's rendezvous.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/output_batch.hpp"
#include "core/thread_group.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"
#include "plan/low_latency_layout.hpp"
#include "plan/routing.hpp"
#include "plan/source_plan.hpp"
#include "plan/workspace_layout.hpp"

namespace epx::plan {
namespace {

// 3 tokens, K=2, E=4 over R=2 ranks (E_l=2): experts 0,1 on rank 0; 2,3 on rank 1.
TEST(Plan, SourceSlotsAndCounts) {
  const std::vector<int32_t> topk = {1,  3,   // token 0 -> ranks 0, 1
                                     2,  2,   // token 1 -> rank 1 (expert 2 twice)
                                     -1, 0};  // token 2 -> rank 0
  const SourcePlan p = plan_source(topk.data(), nullptr, 3, 2, 4, 2);
  ASSERT_EQ(p.status, kRoutingOk);
  EXPECT_EQ(p.send_slot, (std::vector<int32_t>{0, 0, -1, 1, 1, -1}));
  EXPECT_EQ(p.expert_slot, (std::vector<int32_t>{0, 0, 0, 1, -1, 0}));
  EXPECT_EQ(p.rank_counts, (std::vector<int32_t>{2, 2}));
  EXPECT_EQ(p.expert_counts, (std::vector<int32_t>{1, 1, 2, 1}));
}

TEST(Plan, RejectsOutOfRangeExperts) {
  const std::vector<int64_t> topk = {0, 4};
  const SourcePlan p = plan_source(nullptr, topk.data(), 1, 2, 4, 2);
  EXPECT_EQ(p.status, kRoutingBadExpert);
  EXPECT_EQ(p.bad_value, 4);
}

TEST(Plan, ReceiveOffsetsWithAlignment) {
  // 2 sources, 2 local experts; source 0 sends 3 tokens, source 1 sends 1.
  const std::vector<int32_t> recv_counts = {3, 1};
  const std::vector<int32_t> source_expert_counts = {2, 3,   // source 0: expert 0: 2, expert 1: 3
                                                     1, 0};  // source 1
  std::vector<int32_t> recv_offsets(3), tokens(2), offsets(3), expert_source(4);
  compute_receive_offsets(recv_counts.data(), source_expert_counts.data(), 2, 2, 4,
                          recv_offsets.data(), tokens.data(), offsets.data(), expert_source.data());
  EXPECT_EQ(recv_offsets, (std::vector<int32_t>{0, 3, 4}));
  EXPECT_EQ(tokens, (std::vector<int32_t>{3, 3}));
  EXPECT_EQ(offsets, (std::vector<int32_t>{0, 4, 8}));
  EXPECT_EQ(expert_source, (std::vector<int32_t>{0, 2, 4, 7}));
  // K = 3 > E_l = 2: a token naming one expert twice fills K rows, so the bound is K per token.
  EXPECT_EQ(worst_case_expanded_rows(2, 8, 3, 2, 4), 2 * 8 * 3 + 2 * 3);
}

TEST(Plan, WorkspaceRegionsAreOrderedAndAligned) {
  WorkspaceLayout layout;
  layout.num_ranks = 3;
  layout.num_topk = 9;
  layout.num_experts = 24;
  layout.max_tokens = 17;
  layout.hidden = 256;
  layout.fp8 = true;
  const std::vector<int64_t> offsets = {
      layout.flags_offset(),      layout.headers_offset(), layout.expert_counts_offset(),
      layout.slot_meta_offset(),  layout.scalars_offset(), layout.row_weights_offset(),
      layout.row_scales_offset(), layout.rows_offset(),    layout.total_bytes()};
  for (size_t i = 0; i < offsets.size(); ++i) {
    EXPECT_EQ(offsets[i] % WorkspaceLayout::kRegionAlignment, 0) << i;
    if (i) EXPECT_GT(offsets[i], offsets[i - 1]) << i;
  }
  // Every flag and peer record on a 128-byte line of its own, all before the headers.
  std::vector<char> workspace(static_cast<size_t>(layout.headers_offset()));
  char* base = workspace.data();
  std::vector<int64_t> lines;
  for (int p = 0; p < layout.num_ranks; ++p) {
    const char* record = reinterpret_cast<const char*>(layout.record(base, p));
    for (const char* word : {reinterpret_cast<const char*>(layout.flag(base, p)), record}) {
      const int64_t offset = word - base;
      EXPECT_LE(offset + int64_t(sizeof(plan::PeerRecord)), layout.headers_offset());
      EXPECT_LE(int64_t(sizeof(plan::PeerRecord)), 128);
      lines.push_back(offset / 128);
    }
  }
  std::sort(lines.begin(), lines.end());
  EXPECT_EQ(std::adjacent_find(lines.begin(), lines.end()), lines.end());
  // Row staging holds max(R, K) * S_max rows: both combine indexings fit.
  EXPECT_EQ(layout.staging_rows(), 9 * 17);
  EXPECT_LT(layout.source_combine_row_index(16, 8), layout.staging_rows());
  EXPECT_LT(layout.expert_combine_row_index(2, 16), layout.staging_rows());
}

// The offsets the CUDA kernels take (low_latency_regions) name the same bytes as the layout's
// accessors, for both halves and several shapes, each region inside the layout's bytes.
TEST(Plan, LowLatencyRegionsMatchTheLayoutsAccessors) {
  for (const auto& [ranks, experts, fp8, base] :
       {std::tuple{1, 16, false, int64_t(0)}, std::tuple{3, 12, true, int64_t(4096)},
        std::tuple{8, 64, true, int64_t(256)}}) {
    LowLatencyLayout layout{.num_ranks = ranks,
                            .num_experts = experts,
                            .num_topk = 4,
                            .max_tokens = 5,
                            .hidden = 256,
                            .fp8 = fp8,
                            .base = base};
    std::vector<char> workspace(static_cast<size_t>(layout.base + layout.bytes()));
    char* ws = workspace.data();
    for (int half : {0, 1}) {
      const LowLatencyRegions at = low_latency_regions(layout, half);
      auto offset = [&](const void* p) { return static_cast<const char*>(p) - ws; };
      EXPECT_EQ(at.counters, offset(layout.counters(ws)));
      EXPECT_EQ(at.combine_rows, offset(layout.combine_rows(ws)));
      EXPECT_EQ(at.combine_weights, offset(layout.combine_weights(ws)));
      EXPECT_EQ(at.combine_scalars, offset(layout.combine_scalars(ws)));
      EXPECT_EQ(at.recv_rows, offset(layout.recv_rows(ws, half)));
      EXPECT_EQ(at.recv_scales, offset(layout.recv_scales(ws, half)));
      EXPECT_EQ(at.recv_weights, offset(layout.recv_weights(ws, half)));
      EXPECT_EQ(at.recv_aux, offset(layout.recv_aux(ws, half)));
      EXPECT_EQ(at.src_info, offset(layout.src_info(ws, half)));
      EXPECT_EQ(at.counts, offset(layout.counts(ws, half)));
      EXPECT_EQ(region<int32_t>(ws, at.counts), layout.counts(ws, half));
      EXPECT_EQ(at.expert_rows, int64_t(ranks) * 5);
      EXPECT_EQ(at.local_experts, experts / ranks);
      EXPECT_EQ(at.scales_per_row, fp8 ? 2 : 0);
      // The last region of the half ends inside the layout.
      EXPECT_LE(at.counts + 4 * at.local_experts, layout.base + layout.bytes());
    }
  }
}

}  // namespace
}  // namespace epx::plan

// OutputBatch (src/core/output_batch.hpp): the outputs of one operation come from one
// allocate_many call, packed tensors as aligned views of one block, the others in order; and
// Allocator::allocate_many's default asks allocate() for each request.
namespace epx {
namespace {

// Host memory that records what it was asked: every allocate_many call (with the default
// behaviour, one allocate() per request) and every allocate() call. With `drop_last`, it
// returns one tensor fewer than asked.
class RecordingAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override {
    singles.push_back(TensorRequest{dtype, shape});
    return inner_->allocate(dtype, shape, device, stream);
  }
  std::vector<Tensor> allocate_many(const std::vector<TensorRequest>& requests, Device device,
                                    void* stream) override {
    batches.push_back(requests);
    std::vector<Tensor> tensors = Allocator::allocate_many(requests, device, stream);
    if (drop_last) tensors.pop_back();
    return tensors;
  }

  std::vector<std::vector<TensorRequest>> batches;
  std::vector<TensorRequest> singles;
  bool drop_last = false;

 private:
  std::shared_ptr<Allocator> inner_ = default_allocator();
};

uintptr_t address(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.view.data);
}

TEST(OutputBatch, OneCallPackedBlockFirstThenTheOthersInOrder) {
  RecordingAllocator allocator;
  detail::OutputBatch batch;
  Tensor a, b, c, x, y;
  batch.pack(&a, DType::kInt32, {3, 5});  // 60 bytes
  batch.add(&x, DType::kBFloat16, {7, 9});
  batch.pack(&b, DType::kInt64, {2});  // 16 bytes
  batch.add(&y, DType::kFloat32, {4});
  batch.pack(&c, DType::kInt32, {0});  // empty, still inside the block
  batch.allocate(allocator, Device::cpu(), nullptr);

  ASSERT_EQ(allocator.batches.size(), 1u);
  const std::vector<TensorRequest>& asked = allocator.batches[0];
  ASSERT_EQ(asked.size(), 3u);
  EXPECT_EQ(asked[0].dtype, DType::kInt32);  // the block: 256 + 256 + 0 bytes, in int32 words
  EXPECT_EQ(asked[0].shape, (std::vector<int64_t>{128}));
  EXPECT_EQ(asked[1].dtype, DType::kBFloat16);
  EXPECT_EQ(asked[1].shape, (std::vector<int64_t>{7, 9}));
  EXPECT_EQ(asked[2].dtype, DType::kFloat32);
  EXPECT_EQ(asked[2].shape, (std::vector<int64_t>{4}));

  // Packed views: 256-byte steps inside one block, sharing its owner.
  EXPECT_EQ(address(b) - address(a), 256u);
  EXPECT_EQ(address(c) - address(a), 512u);
  EXPECT_EQ(a.owner, b.owner);
  EXPECT_EQ(a.owner, c.owner);
  EXPECT_EQ(a.view.shape, (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(b.view.dtype, DType::kInt64);
  // The others: tensors of their own with what was asked.
  EXPECT_NE(x.owner, a.owner);
  EXPECT_NE(x.owner, y.owner);
  EXPECT_EQ(x.view.dtype, DType::kBFloat16);
  EXPECT_EQ(x.view.shape, (std::vector<int64_t>{7, 9}));
  EXPECT_EQ(y.view.shape, (std::vector<int64_t>{4}));
  // The memory is usable end to end.
  for (int i = 0; i < 15; ++i) a.ptr<int32_t>()[i] = i;
  b.ptr<int64_t>()[1] = -1;
  EXPECT_EQ(a.ptr<int32_t>()[14], 14);
}

TEST(OutputBatch, ABatchWithoutPackedTensorsAsksForThemAlone) {
  RecordingAllocator allocator;
  detail::OutputBatch batch;
  Tensor x;
  batch.add(&x, DType::kFloat32, {2, 3});
  batch.allocate(allocator, Device::cpu(), nullptr);
  ASSERT_EQ(allocator.batches.size(), 1u);
  ASSERT_EQ(allocator.batches[0].size(), 1u);
  EXPECT_EQ(allocator.batches[0][0].shape, (std::vector<int64_t>{2, 3}));
  EXPECT_TRUE(x.defined());
  // The batch is empty again: a second allocate asks for nothing new.
  batch.allocate(allocator, Device::cpu(), nullptr);
  ASSERT_EQ(allocator.batches.size(), 2u);
  EXPECT_TRUE(allocator.batches[1].empty());
}

TEST(OutputBatch, DefaultAllocateManyCallsAllocateForEachRequest) {
  RecordingAllocator allocator;
  const std::vector<Tensor> tensors = allocator.Allocator::allocate_many(
      {{DType::kInt32, {2}}, {DType::kBFloat16, {3, 4}}}, Device::cpu(), nullptr);
  ASSERT_EQ(tensors.size(), 2u);
  ASSERT_EQ(allocator.singles.size(), 2u);
  EXPECT_EQ(allocator.singles[1].shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(tensors[1].view.dtype, DType::kBFloat16);
}

TEST(OutputBatch, AnAllocatorThatReturnsTooFewTensorsIsAnError) {
  RecordingAllocator allocator;
  allocator.drop_last = true;
  detail::OutputBatch batch;
  Tensor x, y;
  batch.add(&x, DType::kFloat32, {2});
  batch.add(&y, DType::kFloat32, {2});
  try {
    batch.allocate(allocator, Device::cpu(), nullptr);
    FAIL() << "expected an epx::Error";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kOutOfMemory);
  }
}

}  // namespace
}  // namespace epx

// The rendezvous behind ThreadGroup (host code, no GPU): rounds pair up across ranks, a rank
// that never arrives gives kTimeout naming it and the step (never a hang) and breaks the group,
// ranks that disagree about the step or arrive twice raise.
namespace epx::testing {
namespace {

using detail::ThreadGroupState;

// Runs fn(rank) on one thread per rank; returns what each returned (or "threw <code>: what").
std::vector<std::string> on_threads(int num_ranks, const std::function<std::string(int)>& fn) {
  std::vector<std::string> results(num_ranks);
  std::vector<std::thread> threads;
  for (int rank = 0; rank < num_ranks; ++rank) {
    threads.emplace_back([&, rank] {
      try {
        results[rank] = fn(rank);
      } catch (const Error& error) {
        results[rank] = std::string("threw ") + to_string(error.code()) + ": " + error.what();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return results;
}

TEST(ThreadGroup, CreateChecksItsArguments) {
  EXPECT_THROW(ThreadGroup::create(0), Error);
  EXPECT_THROW(ThreadGroup::create(65), Error);
  EXPECT_THROW(ThreadGroup::create(2, 0.0), Error);
  const ThreadGroup group = ThreadGroup::create(3, 5.0);
  const ThreadGroup copy = group;
  EXPECT_EQ(copy.num_ranks(), 3);
  EXPECT_EQ(copy.timeout_seconds(), 5.0);
  EXPECT_EQ(copy.state(), group.state());
}

TEST(ThreadGroup, RoundsExchangeEveryRanksEntry) {
  const int n = 5;
  ThreadGroupState group(n, 10.0);
  std::vector<char> memory(n);
  const auto results = on_threads(n, [&](int rank) -> std::string {
    for (int round = 0; round < 50; ++round) {
      const auto entries = group.exchange(rank, {&memory[(rank + round) % n], rank + round},
                                          round % 2 ? "buffer teardown" : "buffer setup");
      for (int peer = 0; peer < n; ++peer) {
        if (entries[peer].pointer != &memory[(peer + round) % n] ||
            entries[peer].device != peer + round) {
          return "round " + std::to_string(round) + ": wrong entry of rank " + std::to_string(peer);
        }
      }
    }
    return "";
  });
  for (int rank = 0; rank < n; ++rank) EXPECT_EQ(results[rank], "") << "rank " << rank;
}

TEST(ThreadGroup, MissingRankTimesOutNamingItAndBreaksTheGroup) {
  ThreadGroupState group(4, 0.3);
  const auto start = std::chrono::steady_clock::now();
  const auto results = on_threads(4, [&](int rank) -> std::string {
    if (rank == 1 || rank == 3) return "";  // never arrive
    group.exchange(rank, {}, "buffer setup");
    return "no error";
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_LT(seconds, 5.0);
  for (int rank : {0, 2}) {
    EXPECT_NE(results[rank].find("threw timeout"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("buffer setup"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("rank 1, 3"), std::string::npos) << results[rank];
  }
  // A late rank raises at once instead of waiting for a round that cannot complete.
  const auto late_start = std::chrono::steady_clock::now();
  try {
    group.exchange(1, {}, "buffer setup");
    ADD_FAILURE() << "a broken group accepted a rank";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kTimeout);
    EXPECT_NE(std::string(error.what()).find("unusable"), std::string::npos) << error.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - late_start).count(),
            0.2);
}

TEST(ThreadGroup, RanksInDifferentStepsRaise) {
  ThreadGroupState group(2, 5.0);
  const auto results = on_threads(2, [&](int rank) -> std::string {
    if (rank == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    group.exchange(rank, {}, rank == 0 ? "buffer setup" : "buffer teardown");
    return "no error";
  });
  for (int rank = 0; rank < 2; ++rank) {
    EXPECT_NE(results[rank].find("threw invalid argument"), std::string::npos) << results[rank];
    EXPECT_NE(results[rank].find("same order on every rank"), std::string::npos) << results[rank];
  }
}

TEST(ThreadGroup, SameRankTwiceRaises) {
  ThreadGroupState group(2, 0.3);
  const auto results = on_threads(2, [&](int thread) -> std::string {
    if (thread == 1) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    group.exchange(0, {}, "buffer setup");  // both threads claim rank 0
    return "no error";
  });
  EXPECT_NE(results[1].find("arrived twice"), std::string::npos) << results[1];
  EXPECT_NE(results[0].find("threw timeout"), std::string::npos) << results[0];
}

}  // namespace
}  // namespace epx::testing
