// Non-owning tensor views (what the caller passes in) and owning tensors (what epx returns),
// plus the allocator interface through which every output is allocated. No framework types:
// PyTorch tensors cross into epx as a TensorView and come back from a Python-side Allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

namespace epx {

enum class DType : uint8_t { kBFloat16, kFloat8E4M3, kFloat32, kInt32, kInt64 };

size_t element_size(DType dtype);
const char* to_string(DType dtype);

enum class DeviceKind : uint8_t { kCpu, kCuda };

struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;  // CUDA ordinal; 0 for the CPU
  static Device cpu() { return {DeviceKind::kCpu, 0}; }
  static Device cuda(int index) { return {DeviceKind::kCuda, index}; }
  bool operator==(const Device&) const = default;
};

std::string to_string(Device device);

// A view of caller memory: pointer, dtype, shape, strides (in elements; empty = contiguous),
// device. An empty view (data == nullptr and no shape) stands for "not given".
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  Device device;

  TensorView() = default;
  TensorView(void* data, DType dtype, std::vector<int64_t> shape, Device device,
             std::vector<int64_t> strides = {})
      : data(data),
        dtype(dtype),
        shape(std::move(shape)),
        strides(std::move(strides)),
        device(device) {}

  bool defined() const { return data != nullptr || !shape.empty(); }
  int64_t dim() const { return static_cast<int64_t>(shape.size()); }
  int64_t size(int64_t d) const { return shape.at(static_cast<size_t>(d)); }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * element_size(dtype); }
  bool is_contiguous() const;
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// An output owned by epx's caller: the view plus whatever keeps its memory alive (a CUDA
// allocation, a host vector, a Python object).
struct Tensor {
  TensorView view;
  std::shared_ptr<void> owner;

  bool defined() const { return view.defined(); }
  template <typename T>
  T* ptr() const {
    return view.ptr<T>();
  }
  int64_t size(int64_t d) const { return view.size(d); }
};

// One output an allocator is asked for.
struct TensorRequest {
  DType dtype;
  std::vector<int64_t> shape;
};

// Outputs are allocated through this interface so that frameworks can hand out their own
// memory. `stream` is the cudaStream_t the output will first be used on (nullptr on the CPU).
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                          void* stream) = 0;
  // The outputs of one call at once, in the order asked, each a tensor of its own. epx asks
  // through here; an allocator that is a round trip into another runtime (the Python package's,
  // a callback into PyTorch) makes one trip per call instead of one per output. The default
  // calls allocate() for each.
  virtual std::vector<Tensor> allocate_many(const std::vector<TensorRequest>& requests,
                                            Device device, void* stream);
};

// Host memory (new[]) for the CPU; for CUDA devices stream-ordered allocations from a memory
// pool of epx's own that keeps freed memory for reuse (src/cuda/runtime/cuda_allocator.cpp).
std::shared_ptr<Allocator> default_allocator();

}  // namespace epx
