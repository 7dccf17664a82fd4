// OutputBatch (src/core/output_batch.hpp): the outputs of one operation come from one
// allocate_many call, packed tensors as aligned views of one block, the others in order; and
// Allocator::allocate_many's default asks allocate() for each request.
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "core/output_batch.hpp"
#include "epx/error.hpp"

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

uintptr_t address(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.view.data); }

TEST(OutputBatch, OneCallPackedBlockFirstThenTheOthersInOrder) {
  RecordingAllocator allocator;
  detail::OutputBatch batch;
  Tensor a, b, c, x, y;
  batch.pack(&a, DType::kInt32, {3, 5});   // 60 bytes
  batch.add(&x, DType::kBFloat16, {7, 9});
  batch.pack(&b, DType::kInt64, {2});      // 16 bytes
  batch.add(&y, DType::kFloat32, {4});
  batch.pack(&c, DType::kInt32, {0});      // empty, still inside the block
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
