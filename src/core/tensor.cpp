#include "epx/tensor.hpp"

#include <cstring>
#include <new>

#include "core/engine.hpp"
#include "epx/error.hpp"

namespace epx {

size_t element_size(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 2;
    case DType::kFloat8E4M3:
      return 1;
    case DType::kFloat32:
      return 4;
    case DType::kInt32:
      return 4;
    case DType::kInt64:
      return 8;
  }
  return 0;
}

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat8E4M3:
      return "float8_e4m3fn";
    case DType::kFloat32:
      return "float32";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
  }
  return "unknown";
}

std::string to_string(Device device) {
  return device.kind == DeviceKind::kCpu ? std::string("cpu")
                                         : "cuda:" + std::to_string(device.index);
}

int64_t TensorView::numel() const {
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  return count;
}

// Any strides of an empty tensor describe the same (no) memory, as PyTorch also says.
bool TensorView::is_contiguous() const {
  if (strides.empty()) return true;
  for (int64_t extent : shape) {
    if (extent == 0) return true;
  }
  if (strides.size() != shape.size()) return false;
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::vector<Tensor> Allocator::allocate_many(const std::vector<TensorRequest>& requests,
                                             Device device, void* stream) {
  std::vector<Tensor> tensors;
  tensors.reserve(requests.size());
  for (const TensorRequest& request : requests) {
    tensors.push_back(allocate(request.dtype, request.shape, device, stream));
  }
  return tensors;
}

namespace {

class HostAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* /*stream*/) override {
    EPX_CHECK(device.kind == DeviceKind::kCpu, kInvalidArgument,
              "the host allocator cannot allocate on " << to_string(device));
    TensorView view(nullptr, dtype, shape, device);
    // At least one byte so that empty outputs still have a distinct, valid pointer.
    const size_t bytes = view.nbytes() > 0 ? view.nbytes() : 1;
    auto* memory = new (std::align_val_t(64)) unsigned char[bytes];
    view.data = memory;
    std::shared_ptr<void> owner(memory, [](void* p) {
      ::operator delete[](static_cast<unsigned char*>(p), std::align_val_t(64));
    });
    return Tensor{std::move(view), std::move(owner)};
  }
};

// Sends each request to the host or the CUDA allocator by device.
class DefaultAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override {
    if (device.kind == DeviceKind::kCpu) return host_.allocate(dtype, shape, device, stream);
    static const std::shared_ptr<Allocator> cuda = detail::make_cuda_allocator();
    return cuda->allocate(dtype, shape, device, stream);
  }

 private:
  HostAllocator host_;
};

}  // namespace

namespace detail {
std::shared_ptr<Allocator> make_host_allocator() {
  return std::make_shared<HostAllocator>();
}
}  // namespace detail

std::shared_ptr<Allocator> default_allocator() {
  static const std::shared_ptr<Allocator> allocator = std::make_shared<DefaultAllocator>();
  return allocator;
}

}  // namespace epx
