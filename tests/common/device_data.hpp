// Test data on a buffer's device and back (through DeviceOps, so the same code serves the host
// and the CUDA transports), and bitwise comparisons of what came back, for the scenarios.
#pragma once

#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/buffer.hpp"
#include "reference/reference.hpp"

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
