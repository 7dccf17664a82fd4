#include "bridge.hpp"

#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "epx/error.hpp"

namespace epx::python {
namespace {

// The few DLPack (v0.x ABI) declarations the fallback needs; the layout is fixed by the DLPack
// specification, which every PyTorch since 1.x imports.
struct DLDevice {
  int32_t device_type;  // 1 = CPU, 2 = CUDA
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 1 = unsigned integer
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// Owns the epx::Tensor (and so its memory) for as long as the consumer holds the DLPack tensor.
struct DlpackContext {
  Tensor tensor;
  int64_t num_bytes = 0;
  DLManagedTensor managed{};
};

void delete_dlpack(DLManagedTensor* self) {
  delete static_cast<DlpackContext*>(self->manager_ctx);
}

// Capsule destructor: only frees a capsule nobody consumed (a consumer renames it).
void delete_unconsumed_capsule(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    auto* managed = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
    if (managed && managed->deleter) managed->deleter(managed);
  } else {
    PyErr_Clear();
  }
}

// The bytes of `tensor` as a 1-D uint8 DLPack capsule.
py::object dlpack_bytes(const Tensor& tensor) {
  auto* context = new DlpackContext{tensor, static_cast<int64_t>(tensor.view.nbytes()), {}};
  DLTensor& dl = context->managed.dl_tensor;
  dl.data = tensor.view.data;
  dl.device = tensor.view.device.kind == DeviceKind::kCuda ? DLDevice{2, tensor.view.device.index}
                                                           : DLDevice{1, 0};
  dl.ndim = 1;
  dl.dtype = DLDataType{1, 8, 1};
  dl.shape = &context->num_bytes;
  dl.strides = nullptr;
  dl.byte_offset = 0;
  context->managed.manager_ctx = context;
  context->managed.deleter = delete_dlpack;
  PyObject* capsule = PyCapsule_New(&context->managed, "dltensor", delete_unconsumed_capsule);
  if (!capsule) {
    delete context;
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::object>(capsule);
}

std::vector<int64_t> int_list(const py::handle& sequence) {
  std::vector<int64_t> values;
  for (const py::handle item : sequence) values.push_back(item.cast<int64_t>());
  return values;
}

}  // namespace

void PyObjectDeleter::operator()(void* owned) const {
  if (!Py_IsInitialized()) return;  // interpreter gone: leak instead of touching freed state
  py::gil_scoped_acquire gil;
  delete static_cast<PyOwned*>(owned);
}

PyAllocator::PyAllocator(py::object allocate) : allocate_(std::move(allocate)) {}

PyAllocator::~PyAllocator() {
  if (!Py_IsInitialized()) {
    allocate_.release();  // leak at shutdown
    return;
  }
  py::gil_scoped_acquire gil;
  allocate_ = py::object();
}

Tensor PyAllocator::allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                             void* stream) {
  return std::move(allocate_many({TensorRequest{dtype, shape}}, device, stream).front());
}

std::vector<Tensor> PyAllocator::allocate_many(const std::vector<TensorRequest>& requests,
                                               Device device, void* stream) {
  size_t num_bytes = 0;
  for (const TensorRequest& request : requests) {
    num_bytes += TensorView(nullptr, request.dtype, request.shape, device).nbytes();
  }
  std::string failure;
  {
    py::gil_scoped_acquire gil;
    try {
      py::list specs(requests.size());
      for (size_t i = 0; i < requests.size(); ++i) {
        const std::vector<int64_t>& shape = requests[i].shape;
        py::tuple dims(shape.size());
        for (size_t d = 0; d < shape.size(); ++d) dims[d] = shape[d];
        specs[i] = py::make_tuple(static_cast<int>(requests[i].dtype), std::move(dims));
      }
      const py::list storages = allocate_(specs, static_cast<int>(device.kind), device.index,
                                          reinterpret_cast<uintptr_t>(stream));
      EPX_CHECK(storages.size() == requests.size(), kOutOfMemory,
                "the Python allocator returned " << storages.size() << " tensors for "
                                                 << requests.size() << " requests");
      std::vector<Tensor> tensors;
      tensors.reserve(requests.size());
      for (size_t i = 0; i < requests.size(); ++i) {
        TensorView view(nullptr, requests[i].dtype, requests[i].shape, device);
        py::object storage = storages[i];
        const auto data = storage.attr("data_ptr")().cast<uintptr_t>();
        EPX_CHECK(data != 0 || view.nbytes() == 0, kOutOfMemory,
                  "the Python allocator returned a tensor without data for " << view.nbytes()
                                                                             << " bytes");
        view.data = reinterpret_cast<void*>(data);
        std::shared_ptr<void> owner(new PyOwned{std::move(storage), data}, PyObjectDeleter{});
        tensors.push_back(Tensor{std::move(view), std::move(owner)});
      }
      return tensors;
    } catch (py::error_already_set& error) {
      // Turn the Python error into an epx error here, while the GIL is held, so that no Python
      // object travels through the engine.
      failure = error.what();
    }
  }
  EPX_FAIL(kOutOfMemory, "allocating " << num_bytes << " bytes for " << requests.size()
                                       << " outputs on " << to_string(device)
                                       << " failed in Python: " << failure);
}

TensorView view_from_py(const py::handle& description) {
  if (description.is_none()) return TensorView();
  const auto fields = description.cast<py::tuple>();
  EPX_CHECK(fields.size() == 6, kInternal, "a tensor description has 6 fields");
  TensorView view;
  view.data = reinterpret_cast<void*>(fields[0].cast<uintptr_t>());
  view.dtype = static_cast<DType>(fields[1].cast<int>());
  view.shape = int_list(fields[2]);
  view.strides = int_list(fields[3]);
  view.device = Device{static_cast<DeviceKind>(fields[4].cast<int>()), fields[5].cast<int>()};
  return view;
}

py::object tensor_to_py(const Tensor& tensor) {
  if (!tensor.defined()) return py::none();
  py::tuple shape(tensor.view.shape.size());
  for (size_t d = 0; d < tensor.view.shape.size(); ++d) shape[d] = tensor.view.shape[d];
  const auto dtype = static_cast<int>(tensor.view.dtype);
  if (auto* deleter = std::get_deleter<PyObjectDeleter>(tensor.owner)) {
    (void)deleter;
    const auto& owned = *static_cast<const PyOwned*>(tensor.owner.get());
    const uintptr_t offset =
        tensor.view.nbytes() == 0 ? 0 : reinterpret_cast<uintptr_t>(tensor.view.data) - owned.data;
    return py::make_tuple(owned.object, offset, dtype, shape, py::none());
  }
  return py::make_tuple(dlpack_bytes(tensor), 0, dtype, shape,
                        reinterpret_cast<uintptr_t>(tensor.view.data));
}

}  // namespace epx::python
