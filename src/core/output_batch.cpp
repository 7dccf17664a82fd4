#include "core/output_batch.hpp"

#include <algorithm>
#include <utility>

#include "epx/error.hpp"

namespace epx::detail {
namespace {

constexpr int64_t kPackAlignment = 256;

int64_t packed_bytes(DType dtype, const std::vector<int64_t>& shape) {
  const TensorView view(nullptr, dtype, shape, Device::cpu());
  const auto bytes = static_cast<int64_t>(view.nbytes());
  return (bytes + kPackAlignment - 1) / kPackAlignment * kPackAlignment;
}

}  // namespace

void OutputBatch::add(Tensor* out, DType dtype, std::vector<int64_t> shape) {
  separate_.push_back(Item{out, dtype, std::move(shape)});
}

void OutputBatch::pack(Tensor* out, DType dtype, std::vector<int64_t> shape) {
  packed_.push_back(Item{out, dtype, std::move(shape)});
}

void OutputBatch::allocate(Allocator& allocator, Device device, void* stream) {
  std::vector<TensorRequest> requests;
  requests.reserve(separate_.size() + 1);
  int64_t block_bytes = 0;
  for (const Item& item : packed_) block_bytes += packed_bytes(item.dtype, item.shape);
  // The block first, as int32 words (every packed tensor has 4- or 8-byte elements).
  if (!packed_.empty()) {
    requests.push_back(TensorRequest{DType::kInt32, {std::max<int64_t>(block_bytes / 4, 1)}});
  }
  for (const Item& item : separate_) requests.push_back(TensorRequest{item.dtype, item.shape});
  std::vector<Tensor> tensors = allocator.allocate_many(requests, device, stream);
  EPX_CHECK(tensors.size() == requests.size(), kOutOfMemory,
            "the allocator returned " << tensors.size() << " tensors for " << requests.size()
                                      << " requests");
  size_t next = 0;
  if (!packed_.empty()) {
    const Tensor& block = tensors[next++];
    int64_t offset = 0;
    for (Item& item : packed_) {
      TensorView view(block.ptr<char>() + offset, item.dtype, std::move(item.shape), device);
      offset += packed_bytes(view.dtype, view.shape);
      *item.out = Tensor{std::move(view), block.owner};
    }
  }
  for (Item& item : separate_) *item.out = std::move(tensors[next++]);
  packed_.clear();
  separate_.clear();
}

void add_dispatch_outputs(OutputBatch& batch, DispatchResult& result, const Handle& handle,
                          const DispatchInputs& in, int64_t hidden, int32_t num_topk) {
  const int64_t capacity = handle.expand ? handle.row_capacity : handle.recv_token_capacity;
  batch.add(&result.x, in.x.dtype, {capacity, hidden});
  if (in.x_scales.defined()) {
    batch.add(&result.x_scales, DType::kFloat32, {capacity, in.x_scales.size(1)});
  }
  const std::vector<int64_t> scalar_shape =
      handle.expand ? std::vector<int64_t>{capacity} : std::vector<int64_t>{capacity, num_topk};
  if (in.weights.defined()) batch.add(&result.weights, DType::kFloat32, scalar_shape);
  if (in.aux.defined()) batch.add(&result.aux, DType::kFloat32, scalar_shape);
  if (!handle.expand) batch.add(&result.topk_idx, DType::kInt32, {capacity, num_topk});
}

}  // namespace epx::detail
