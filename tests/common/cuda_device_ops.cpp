#include "common/cuda_device_ops.hpp"

#include <cuda_runtime.h>

#include "epx/error.hpp"

namespace epx::testing {
namespace {

void check(cudaError_t status, const char* what) {
  EPX_CHECK(status == cudaSuccess, kTransport, what << ": " << cudaGetErrorString(status));
}

}  // namespace

DeviceOps cuda_device_ops(int device, void* stream) {
  DeviceOps ops;
  ops.stream = stream;
  ops.upload = [device](const void* host, size_t bytes) {
    check(cudaSetDevice(device), "cudaSetDevice");
    void* memory = nullptr;
    check(cudaMalloc(&memory, bytes > 0 ? bytes : 16), "cudaMalloc");
    if (bytes) check(cudaMemcpy(memory, host, bytes, cudaMemcpyHostToDevice), "upload");
    return std::shared_ptr<void>(memory, [](void* p) { cudaFree(p); });
  };
  ops.download = [stream](void* host, const void* device_memory, size_t bytes) {
    auto s = static_cast<cudaStream_t>(stream);
    check(cudaMemcpyAsync(host, device_memory, bytes, cudaMemcpyDeviceToHost, s), "download");
    check(cudaStreamSynchronize(s), "download sync");
  };
  return ops;
}

void cuda_poison(void* device_memory, size_t bytes) {
  check(cudaMemset(device_memory, kPoisonByte, bytes), "poison");
}

}  // namespace epx::testing
