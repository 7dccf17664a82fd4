// Default CUDA allocator: stream-ordered allocations from a memory pool of epx's own per
// device, freed on the stream they were allocated on.
//
// Why a pool of its own: the device's default pool gives its memory back to the driver at every
// synchronisation (release threshold 0), so an output that is allocated, freed and allocated
// again across a host synchronisation is mapped anew each time. For the expanded layout that is
// hundreds of MB (bench_gpu: a 128-token expanded dispatch with alignment 128 spent most of its
// ~0.6 ms mapping its output). This pool keeps what it has (release threshold: unlimited), like
// PyTorch's caching allocator, without changing the default pool other code in the process
// uses. A caller that wants memory back passes its own allocator to the Buffer.
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>

#include "core/engine.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "epx/error.hpp"

namespace epx::detail {
namespace {

// One instance lives as long as the process (make_cuda_allocator's caller keeps it in a static);
// its pools are not destroyed: at exit CUDA may already be gone, and the process frees them.
class CudaAllocator final : public Allocator {
 public:
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override {
    EPX_CHECK(device.kind == DeviceKind::kCuda, kInvalidArgument,
              "the CUDA allocator cannot allocate on " << to_string(device));
    TensorView view(nullptr, dtype, shape, device);
    const size_t bytes = view.nbytes() > 0 ? view.nbytes() : 16;
    auto cuda_stream = static_cast<cudaStream_t>(stream);
    void* memory = nullptr;
    const cudaError_t status =
        cudaMallocFromPoolAsync(&memory, bytes, pool(device.index), cuda_stream);
    EPX_CHECK(status == cudaSuccess, kOutOfMemory,
              "cudaMallocFromPoolAsync(" << bytes << " bytes) on " << to_string(device)
                                         << " failed: " << cudaGetErrorString(status));
    view.data = memory;
    std::shared_ptr<void> owner(memory, [cuda_stream](void* p) { cudaFreeAsync(p, cuda_stream); });
    return Tensor{std::move(view), std::move(owner)};
  }

 private:
  cudaMemPool_t pool(int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = pools_.find(device);
    if (found != pools_.end()) return found->second;
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device;
    cudaMemPool_t created;
    EPX_CUDA_CHECK(cudaMemPoolCreate(&created, &props));
    uint64_t keep = UINT64_MAX;
    EPX_CUDA_CHECK(cudaMemPoolSetAttribute(created, cudaMemPoolAttrReleaseThreshold, &keep));
    pools_.emplace(device, created);
    return created;
  }

  std::mutex mutex_;
  std::map<int, cudaMemPool_t> pools_;
};

}  // namespace

std::shared_ptr<Allocator> make_cuda_allocator() {
  return std::make_shared<CudaAllocator>();
}

}  // namespace epx::detail
