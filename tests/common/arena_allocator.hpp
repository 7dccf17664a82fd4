// A bump allocator over one cudaMalloc'd arena: outputs allocated during a CUDA-graph capture
// keep fixed addresses that every replay writes again (what a framework's graph memory pool
// provides). reset() reuses the arena from the start.
#pragma once

#include <cuda_runtime.h>

#include "epx/error.hpp"
#include "epx/tensor.hpp"

namespace epx::testing {

class ArenaAllocator : public Allocator {
 public:
  explicit ArenaAllocator(size_t bytes) : bytes_(bytes) {
    EPX_CHECK(cudaMalloc(&base_, bytes) == cudaSuccess, kOutOfMemory, "arena");
  }
  ~ArenaAllocator() override { cudaFree(base_); }
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void*) override {
    TensorView view(nullptr, dtype, shape, device);
    const size_t bytes = (view.nbytes() + 255) / 256 * 256;
    EPX_CHECK(used_ + bytes <= bytes_, kOutOfMemory, "arena exhausted");
    view.data = static_cast<char*>(base_) + used_;
    used_ += bytes;
    return Tensor{view, nullptr};
  }
  void reset() { used_ = 0; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t used_ = 0;
};

}  // namespace epx::testing
