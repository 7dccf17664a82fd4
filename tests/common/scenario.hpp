// One randomized end-to-end check of a Buffer against the reference, shared by the host tests,
// the GPU tests and the demo: routing dispatch, a cached replay with fresh values, combine and
// (expanded, weighted) combine_backward, every output element compared bit for bit.
#pragma once

#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/random_problem.hpp"
#include "epx/buffer.hpp"
#include "reference/reference.hpp"

namespace epx::testing {

// How the scenario moves data between the host and the buffer's device.
struct DeviceOps {
  // Copies `bytes` of host data into new device memory; the shared_ptr owns it.
  std::function<std::shared_ptr<void>(const void* host, size_t bytes)> upload;
  std::function<void(void* host, const void* device, size_t bytes)> download;
  // Copies `bytes` of host data into existing memory of the device (a workspace view).
  std::function<void(void* device, const void* host, size_t bytes)> write;
  void* stream = nullptr;
  // Optional, called before each buffer operation: thread ranks line up there when asked to
  // (cuda_device_ops.hpp: ThreadRank, EPX_TEST_ALIGN_RANKS).
  std::function<void()> before_operation;
};

DeviceOps host_device_ops();

// An allocator that fills every output with a poison byte pattern (0x7f: huge finite bf16 and
// fp32 values, int32 0x7f7f7f7f), so an element the transport forgot to write cannot pass.
class PoisonAllocator : public Allocator {
 public:
  // fill(memory, bytes, stream) poisons a fresh allocation, ordered on the allocation's stream.
  PoisonAllocator(std::shared_ptr<Allocator> inner,
                  std::function<void(void* device, size_t bytes, void* stream)> fill)
      : inner_(std::move(inner)), fill_(std::move(fill)) {}
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override;

 private:
  std::shared_ptr<Allocator> inner_;
  std::function<void(void*, size_t, void*)> fill_;
};
constexpr unsigned char kPoisonByte = 0x7f;

// The default host allocator, poisoned.
inline std::shared_ptr<Allocator> poisoned_host_allocator() {
  return std::make_shared<PoisonAllocator>(
      default_allocator(), [](void* p, size_t n, void*) { std::memset(p, kPoisonByte, n); });
}

struct PhaseTimes {
  double dispatch_ms = 0, cached_ms = 0, combine_ms = 0, backward_ms = 0;
};

// The BufferConfig a random configuration needs.
BufferConfig buffer_config_for(const RandomConfig& config, double timeout_seconds = 60);

// Runs the scenario on this rank; returns "" on success, else a message naming the operation,
// the output, the first mismatching element (or the error an operation raised) and the
// configuration.
std::string run_scenario(Buffer& buffer, const RandomConfig& config, int rank, const DeviceOps& ops,
                         PhaseTimes* times = nullptr);

}  // namespace epx::testing

// Test data on a buffer's device and back (through DeviceOps, so the same code serves the host
// and the CUDA transports), and bitwise comparisons of what came back, for the scenarios.
namespace epx::testing {

// Test data on the buffer's device, with its owner.
struct DeviceData {
  std::shared_ptr<void> owner;
  TensorView view;
};

template <typename T>
DeviceData upload(const DeviceOps& ops, const std::vector<T>& host, DType dtype,
                  std::vector<int64_t> shape, Device device) {
  DeviceData data;
  data.owner = ops.upload(host.data(), host.size() * sizeof(T));
  data.view = TensorView(data.owner.get(), dtype, std::move(shape), device);
  return data;
}

// As upload, but with `unaligned` the view starts one element (of `dtype`) past the start of
// its allocation, as a view into a larger tensor would: not 16-byte aligned.
template <typename T>
DeviceData upload_maybe_unaligned(const DeviceOps& ops, const std::vector<T>& host, DType dtype,
                                  std::vector<int64_t> shape, Device device, bool unaligned) {
  if (!unaligned) return upload(ops, host, dtype, std::move(shape), device);
  const size_t skip = element_size(dtype) / sizeof(T);
  std::vector<T> shifted(skip, T{});
  shifted.insert(shifted.end(), host.begin(), host.end());
  DeviceData data = upload(ops, shifted, dtype, std::move(shape), device);
  data.view.data = static_cast<T*>(data.view.data) + skip;
  return data;
}

template <typename T>
std::vector<T> download(const DeviceOps& ops, const Tensor& tensor, int64_t count) {
  std::vector<T> host(static_cast<size_t>(count));
  if (count > 0) ops.download(host.data(), tensor.view.data, host.size() * sizeof(T));
  return host;
}

// Compares `rows` rows of `row_elems` elements, skipping rows where skip[row] is set.
template <typename T>
std::string compare_rows(const std::vector<T>& got, const std::vector<T>& want, int64_t rows,
                         int64_t row_elems, const std::vector<uint8_t>* skip, const char* what) {
  int64_t bad = 0;
  std::ostringstream first;
  for (int64_t r = 0; r < rows; ++r) {
    if (skip && (*skip)[r]) continue;
    for (int64_t i = 0; i < row_elems; ++i) {
      const T& a = got[r * row_elems + i];
      const T& b = want[r * row_elems + i];
      if (std::memcmp(&a, &b, sizeof(T)) == 0) continue;
      if (bad++ == 0) {
        first << what << ": row " << r << " element " << i << " got " << +a << " want " << +b;
      }
    }
  }
  if (bad == 0) return "";
  return first.str() + " (" + std::to_string(bad) + " elements differ)";
}

inline std::vector<int32_t> to_int32(const std::vector<int64_t>& values) {
  return std::vector<int32_t>(values.begin(), values.end());
}

// Routing inputs of this rank on the device; x and weights can be replaced (cached replays).
struct RankTensors {
  DeviceData x, x_scales, topk_idx, weights, aux;
  DispatchInputs inputs(bool with_topk) const {
    DispatchInputs in;
    in.x = x.view;
    in.x_scales = x_scales.view;
    if (with_topk) in.topk_idx = topk_idx.view;
    in.weights = weights.view;
    in.aux = aux.view;
    return in;
  }
};

inline RankTensors upload_inputs(const DeviceOps& ops, const RandomConfig& config,
                                 const reference::RankInputs& in, Device device) {
  const reference::Problem problem = config.problem();
  const int64_t tokens = in.num_tokens;
  RankTensors t;
  t.x = upload_maybe_unaligned(ops, in.x, problem.fp8 ? DType::kFloat8E4M3 : DType::kBFloat16,
                               {tokens, problem.hidden}, device, config.x_unaligned);
  if (problem.fp8) {
    t.x_scales = upload(ops, in.x_scales, DType::kFloat32, {tokens, problem.hidden / 128}, device);
  }
  if (config.topk_int64) {
    t.topk_idx = upload(ops, in.topk_idx, DType::kInt64, {tokens, problem.num_topk}, device);
  } else {
    t.topk_idx =
        upload(ops, to_int32(in.topk_idx), DType::kInt32, {tokens, problem.num_topk}, device);
  }
  if (config.with_weights) {
    t.weights = upload(ops, in.weights, DType::kFloat32, {tokens, problem.num_topk}, device);
  }
  if (config.with_aux) {
    t.aux = upload(ops, in.aux, DType::kFloat32, {tokens, problem.num_topk}, device);
  }
  return t;
}

}  // namespace epx::testing
