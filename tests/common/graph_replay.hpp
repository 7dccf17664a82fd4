// The CUDA-graph scenario of the GPU tests, shared by the NCCL ranks (test_gpu) and the thread
// ranks (test_gpu_threads): sync_counts=false expanded dispatch + weighted combine, captured once
// on the rank's stream, then replayed three times with new values written into the captured
// inputs; every replay's combined output must equal the reference.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "common/scenario.hpp"
#include "epx/buffer.hpp"
#include "epx/error.hpp"

namespace epx::testing {

// A bump allocator over one cudaMalloc'd arena: outputs allocated during a CUDA-graph capture
// keep fixed addresses that every replay writes again (what a framework's graph memory pool
// provides). reset() reuses the arena from the start.
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

// The configuration the graph scenario runs (a random one made capturable).
RandomConfig graph_config(uint64_t seed, int num_ranks);

// Runs the scenario on this rank; `buffer` must allocate its outputs from fixed memory (e.g. an
// ArenaAllocator: a graph replay writes the captured addresses again). "" when it matches.
std::string graph_replay_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                                  void* stream, const DeviceOps& ops);

}  // namespace epx::testing
