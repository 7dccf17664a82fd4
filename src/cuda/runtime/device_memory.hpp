// Owners of the CUDA transport's own memory (scratch words, host-mapped status records): each
// frees what it allocated, on the device it was allocated on, so a constructor that fails part
// way leaks nothing and no destructor lists allocations by hand.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>

#include "cuda/runtime/cuda_check.hpp"

namespace epx::detail {

// Makes `device` current for the scope, then restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// `count` zeroed elements of T in device memory of the current device (at least 16 bytes, so
// an empty array still has a distinct address).
template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(size_t count) {
    const size_t bytes = count * sizeof(T) > 0 ? count * sizeof(T) : 16;
    EPX_CUDA_CHECK(cudaGetDevice(&device_));
    EPX_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), bytes));
    const cudaError_t status = cudaMemset(data_, 0, bytes);
    if (status != cudaSuccess) release();
    EPX_CUDA_CHECK(status);
  }
  ~DeviceArray() { release(); }
  DeviceArray(DeviceArray&& other) noexcept { *this = static_cast<DeviceArray&&>(other); }
  DeviceArray& operator=(DeviceArray&& other) noexcept {
    if (this != &other) {
      release();
      data_ = other.data_;
      device_ = other.device_;
      other.data_ = nullptr;
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() const { return data_; }

 private:
  void release() {
    if (!data_) return;
    DeviceGuard guard(device_);
    cudaFree(data_);
    data_ = nullptr;
  }
  T* data_ = nullptr;
  int device_ = 0;
};

// `count` zeroed elements of T in pinned host memory mapped into the device's address space:
// kernels write records the host reads without a copy.
template <typename T>
class MappedArray {
 public:
  MappedArray() = default;
  explicit MappedArray(size_t count) {
    EPX_CUDA_CHECK(
        cudaHostAlloc(reinterpret_cast<void**>(&host_), count * sizeof(T), cudaHostAllocMapped));
    std::memset(static_cast<void*>(host_), 0, count * sizeof(T));
    const cudaError_t status =
        cudaHostGetDevicePointer(reinterpret_cast<void**>(&device_), host_, 0);
    if (status != cudaSuccess) release();
    EPX_CUDA_CHECK(status);
  }
  ~MappedArray() { release(); }
  MappedArray(MappedArray&& other) noexcept { *this = static_cast<MappedArray&&>(other); }
  MappedArray& operator=(MappedArray&& other) noexcept {
    if (this != &other) {
      release();
      host_ = other.host_;
      device_ = other.device_;
      other.host_ = other.device_ = nullptr;
    }
    return *this;
  }
  MappedArray(const MappedArray&) = delete;
  MappedArray& operator=(const MappedArray&) = delete;

  T* host() const { return host_; }
  T* device() const { return device_; }

 private:
  void release() {
    if (host_) cudaFreeHost(host_);
    host_ = device_ = nullptr;
  }
  T* host_ = nullptr;
  T* device_ = nullptr;
};

}  // namespace epx::detail
