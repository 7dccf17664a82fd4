// Default CUDA allocator: stream-ordered cudaMallocAsync, freed on the same stream.
#include <cuda_runtime.h>

#include "core/allocators.hpp"
#include "epx/error.hpp"

namespace epx::detail {
namespace {

class CudaAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override {
    EPX_CHECK(device.kind == DeviceKind::kCuda, kInvalidArgument,
              "the CUDA allocator cannot allocate on " << to_string(device));
    TensorView view(nullptr, dtype, shape, device);
    const size_t bytes = view.nbytes() > 0 ? view.nbytes() : 16;
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device.index);
    auto cuda_stream = static_cast<cudaStream_t>(stream);
    void* memory = nullptr;
    const cudaError_t status = cudaMallocAsync(&memory, bytes, cuda_stream);
    cudaSetDevice(previous);
    EPX_CHECK(status == cudaSuccess, kOutOfMemory,
              "cudaMallocAsync(" << bytes << " bytes) on " << to_string(device)
                                 << " failed: " << cudaGetErrorString(status));
    view.data = memory;
    std::shared_ptr<void> owner(memory, [cuda_stream](void* p) { cudaFreeAsync(p, cuda_stream); });
    return Tensor{std::move(view), std::move(owner)};
  }
};

}  // namespace

std::shared_ptr<Allocator> make_cuda_allocator() { return std::make_shared<CudaAllocator>(); }

}  // namespace epx::detail
