// How tensors cross between PyTorch and epx without linking against PyTorch.
//
// Inputs: the Python side describes each tensor as a tuple
//   (data_ptr: int, dtype: epx DType value, shape: list, strides: list, device_kind, device_index)
// and bridge turns it into a non-owning epx::TensorView (None = "not given").
//
// Outputs: every epx output is allocated through PyAllocator, which calls a Python callable
// `allocate(requests, device_kind, device_index, stream) -> [torch.Tensor]` once per epx call
// (requests: a list of (epx dtype, shape); it returns a contiguous tensor for each, in order)
// and keeps each returned object alive in its epx::Tensor's owner. Back in Python an output is
// described as
//   (base: the allocated tensor, byte_offset, dtype, shape)
// and is `base` itself when it is the whole allocation (the common case: no view to make), else
// a view of `base`'s bytes (several small tensors packed into one allocation), never a copy.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <vector>

#include "epx/tensor.hpp"

namespace epx::python {

namespace py = pybind11;

// What owns the memory of an output PyAllocator handed out: the Python object, and its data
// pointer as it was read once at allocation (tensor_to_py needs it again).
struct PyOwned {
  py::object object;
  uintptr_t data;
};

// Releases a PyOwned from any thread: takes the GIL first. During interpreter shutdown the
// object is leaked rather than touched.
struct PyObjectDeleter {
  void operator()(void* owned) const;
};

// An epx::Allocator that hands out memory of Python objects (torch tensors): one callback into
// Python per allocate_many (one epx call), one per allocate.
class PyAllocator final : public Allocator {
 public:
  explicit PyAllocator(py::object allocate);
  ~PyAllocator() override;
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override;
  std::vector<Tensor> allocate_many(const std::vector<TensorRequest>& requests, Device device,
                                    void* stream) override;

 private:
  py::object allocate_;
};

// A Python tensor description (see above) or None -> TensorView (empty when None).
TensorView view_from_py(const py::handle& description);

// An epx output -> (base, byte_offset, dtype, shape, address), or None when the tensor is not
// defined. Tensors owned by something other than PyAllocator (an engine's own allocation, a
// Buffer's workspace) cross as a DLPack capsule in place of `base` and with their data address,
// which lets the Python side reuse the tensor it imported for the same workspace view before
// (from_c's `views`); `address` is None for PyAllocator's tensors.
py::object tensor_to_py(const Tensor& tensor);

}  // namespace epx::python
