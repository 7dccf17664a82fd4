// epx._C: the Python bindings of the epx C++ API. No PyTorch here: tensors cross as pointer
// descriptions and Python-allocated outputs (bridge.hpp); the `epx` package wraps this module
// into the torch-facing API (python/epx/).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "bridge.hpp"
#include "epx/buffer.hpp"
#include "epx/comm.hpp"
#include "epx/config.hpp"
#include "epx/error.hpp"
#include "epx/handle.hpp"
#include "plan/routing.hpp"

namespace py = pybind11;

namespace epx::python {
namespace {

using HandlePtr = std::shared_ptr<Handle>;

void* as_stream(uintptr_t stream) {
  return reinterpret_cast<void*>(stream);
}

py::dict dispatch_to_py(DispatchResult&& result, HandlePtr handle) {
  py::dict out;
  out["x"] = tensor_to_py(result.x);
  out["x_scales"] = tensor_to_py(result.x_scales);
  out["topk_idx"] = tensor_to_py(result.topk_idx);
  out["weights"] = tensor_to_py(result.weights);
  out["aux"] = tensor_to_py(result.aux);
  out["handle"] = handle ? py::cast(std::move(handle))
                         : py::cast(std::make_shared<Handle>(std::move(result.handle)));
  return out;
}

// A Handle's tensors by name, for Python's lazy views.
const Tensor& handle_tensor(const Handle& handle, const std::string& name) {
  static const std::pair<const char*, Tensor Handle::*> fields[] = {
      {"send_slot", &Handle::send_slot},
      {"topk_idx", &Handle::topk_idx},
      {"expert_slot", &Handle::expert_slot},
      {"recv_counts", &Handle::recv_counts},
      {"recv_offsets", &Handle::recv_offsets},
      {"source_expert_counts", &Handle::source_expert_counts},
      {"tokens_per_expert", &Handle::tokens_per_expert},
      {"expert_offsets", &Handle::expert_offsets},
      {"expert_source_offsets", &Handle::expert_source_offsets},
      {"src_token", &Handle::src_token},
      {"expanded_rows", &Handle::expanded_rows},
      {"recv_topk_idx", &Handle::recv_topk_idx},
      {"device_counts", &Handle::device_counts},
  };
  for (const auto& [field_name, member] : fields) {
    if (name == field_name) return handle.*member;
  }
  EPX_FAIL(kInvalidArgument, "a handle has no tensor named '" << name << "'");
}

void bind_enums(py::module_& m) {
  py::enum_<DType>(m, "DType")
      .value("BFLOAT16", DType::kBFloat16)
      .value("FLOAT8_E4M3", DType::kFloat8E4M3)
      .value("FLOAT32", DType::kFloat32)
      .value("INT32", DType::kInt32)
      .value("INT64", DType::kInt64);
  py::enum_<DeviceKind>(m, "DeviceKind")
      .value("CPU", DeviceKind::kCpu)
      .value("CUDA", DeviceKind::kCuda);
  py::enum_<Transport>(m, "Transport")
      .value("HOST", Transport::kHost)
      .value("NCCL", Transport::kNccl)
      .value("IPC", Transport::kIpc)
      .value("CUDA_THREADS", Transport::kCudaThreads);
  py::enum_<ErrorCode>(m, "ErrorCode")
      .value("INVALID_ARGUMENT", ErrorCode::kInvalidArgument)
      .value("INVALID_ROUTING", ErrorCode::kInvalidRouting)
      .value("HANDLE_MISMATCH", ErrorCode::kHandleMismatch)
      .value("TIMEOUT", ErrorCode::kTimeout)
      .value("TRANSPORT", ErrorCode::kTransport)
      .value("OUT_OF_MEMORY", ErrorCode::kOutOfMemory)
      .value("INTERNAL", ErrorCode::kInternal)
      .value("UNUSABLE", ErrorCode::kUnusable);
}

// epx.EpxError(RuntimeError) with `.code` (an ErrorCode). Created once, never freed: the
// translator below may run until the interpreter shuts down.
void bind_error(py::module_& m) {
  static PyObject* error_type = PyErr_NewExceptionWithDoc(
      "epx.EpxError",
      "An error raised by epx. `.code` is an epx.ErrorCode saying which kind (invalid argument, "
      "invalid routing, handle mismatch, timeout, transport, out of memory, internal).",
      PyExc_RuntimeError, nullptr);
  if (!error_type) throw py::error_already_set();
  m.add_object("EpxError", py::handle(error_type));
  // Module-local: the translator lives in this module's own pybind11 internals, never in the
  // internals other extensions (PyTorch's, built with another pybind11) may share.
  py::register_local_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const Error& error) {
      py::object instance =
          py::reinterpret_steal<py::object>(PyObject_CallFunction(error_type, "s", error.what()));
      if (!instance) return;  // the Python error of the failed call stays set
      instance.attr("code") = py::cast(error.code());
      PyErr_SetObject(error_type, instance.ptr());
    }
  });
}

void bind_config(py::module_& m) {
  py::class_<BufferConfig>(m, "BufferConfig")
      .def(py::init<>())
      .def_readwrite("max_tokens_per_rank", &BufferConfig::max_tokens_per_rank)
      .def_readwrite("hidden", &BufferConfig::hidden)
      .def_readwrite("num_experts", &BufferConfig::num_experts)
      .def_readwrite("num_topk", &BufferConfig::num_topk)
      .def_readwrite("fp8_dispatch", &BufferConfig::fp8_dispatch)
      .def_readwrite("timeout_seconds", &BufferConfig::timeout_seconds)
      .def_readwrite("num_sms", &BufferConfig::num_sms)
      .def_readwrite("low_latency_max_tokens", &BufferConfig::low_latency_max_tokens);
  m.def("workspace_bytes", &workspace_bytes, py::arg("config"), py::arg("num_ranks"),
        "Bytes of the symmetric buffer each rank allocates for `config`, without allocating.");
  m.def(
      "receive_rows",
      [](const BufferConfig& config, int num_ranks, bool expand, int expert_alignment) {
        const int64_t local_experts = num_ranks ? config.num_experts / num_ranks : 0;
        return expand ? plan::worst_case_expanded_rows(num_ranks, config.max_tokens_per_rank,
                                                       config.num_topk, local_experts,
                                                       expert_alignment)
                      : plan::worst_case_compact_rows(num_ranks, config.max_tokens_per_rank);
      },
      py::arg("config"), py::arg("num_ranks"), py::arg("expand"), py::arg("expert_alignment"),
      "Rows of a dispatch's receive-side outputs when counts stay on the device (worst case).");
}

void bind_comm(py::module_& m) {
  py::class_<Comm>(m, "Comm")
      .def_static("host", &Comm::host, py::arg("rank"), py::arg("num_ranks"), py::arg("name"),
                  "Host transport over POSIX shared memory; every rank passes the same name.")
      .def_static(
          "nccl",
          [](int rank, int num_ranks, const py::bytes& id_bytes, int cuda_device,
             double timeout_seconds) {
            const std::string bytes = id_bytes;
            UniqueId id;
            EPX_CHECK(
                bytes.size() == id.bytes.size(), kInvalidArgument,
                "an NCCL unique id has " << id.bytes.size() << " bytes, got " << bytes.size());
            std::memcpy(id.bytes.data(), bytes.data(), bytes.size());
            py::gil_scoped_release nogil;  // collective: waits for every rank
            return Comm::nccl(rank, num_ranks, id, cuda_device, timeout_seconds);
          },
          py::arg("rank"), py::arg("num_ranks"), py::arg("unique_id"), py::arg("cuda_device"),
          py::arg("timeout_seconds") = 100.0,
          "CUDA transport over a new NCCL communicator made from rank 0's unique id.")
      .def_static(
          "ipc",
          [](int rank, int num_ranks, const std::string& name, int cuda_device) {
            return Comm::ipc(rank, num_ranks, name, cuda_device);
          },
          py::arg("rank"), py::arg("num_ranks"), py::arg("name"), py::arg("cuda_device"),
          "CUDA transport over CUDA IPC; every rank passes the same name (one per job).")
      .def_static("cuda_available", &Comm::cuda_available)
      .def_property_readonly("rank", &Comm::rank)
      .def_property_readonly("num_ranks", &Comm::num_ranks)
      .def_property_readonly("transport", &Comm::transport);
  m.def(
      "nccl_unique_id",
      [] {
        const UniqueId id = Comm::nccl_unique_id();
        return py::bytes(id.bytes.data(), id.bytes.size());
      },
      "A fresh NCCL unique id (bytes) for Comm.nccl; made by one rank, sent to the others.");
}

void bind_handle(py::module_& m) {
  py::class_<Handle, HandlePtr>(m, "Handle")
      .def_readonly("buffer_id", &Handle::buffer_id)
      .def_readonly("origin", &Handle::origin)
      .def_readonly("rank", &Handle::rank)
      .def_readonly("num_ranks", &Handle::num_ranks)
      .def_readonly("expand", &Handle::expand)
      .def_readonly("expert_alignment", &Handle::expert_alignment)
      .def_readonly("zero_padding", &Handle::zero_padding)
      .def_readonly("num_experts", &Handle::num_experts)
      .def_readonly("num_topk", &Handle::num_topk)
      .def_readonly("max_tokens_per_rank", &Handle::max_tokens_per_rank)
      .def_readonly("num_tokens", &Handle::num_tokens)
      .def_readonly("counts_synced", &Handle::counts_synced)
      .def_readonly("num_recv_tokens", &Handle::num_recv_tokens)
      .def_readonly("num_rows", &Handle::num_rows)
      .def_readonly("recv_token_capacity", &Handle::recv_token_capacity)
      .def_readonly("row_capacity", &Handle::row_capacity)
      .def_readonly("host_tokens_per_expert", &Handle::host_tokens_per_expert)
      .def_readonly("host_expert_offsets", &Handle::host_expert_offsets)
      .def_property_readonly("local_experts", &Handle::local_experts)
      .def(
          "tensor",
          [](const Handle& handle, const std::string& name) {
            return tensor_to_py(handle_tensor(handle, name));
          },
          py::arg("name"), "One of the handle's tensors as (base, byte_offset, dtype, shape).");
}

void bind_buffer(py::module_& m) {
  py::class_<Buffer, std::shared_ptr<Buffer>>(m, "Buffer")
      .def(py::init([](const Comm& comm, const BufferConfig& config, py::object allocate) {
             auto allocator = std::make_shared<PyAllocator>(std::move(allocate));
             py::gil_scoped_release nogil;  // collective: maps every peer's workspace
             return std::make_shared<Buffer>(comm, config, std::move(allocator));
           }),
           py::arg("comm"), py::arg("config"), py::arg("allocate"))
      .def(
          "dispatch",
          [](Buffer& buffer, py::object x, py::object x_scales, py::object topk_idx,
             py::object weights, py::object aux, bool expand, int expert_alignment,
             bool zero_padding, bool sync_counts, uintptr_t stream) {
            const DispatchInputs inputs{view_from_py(x), view_from_py(x_scales),
                                        view_from_py(topk_idx), view_from_py(weights),
                                        view_from_py(aux)};
            DispatchOptions options;
            options.expand = expand;
            options.expert_alignment = expert_alignment;
            options.zero_padding = zero_padding;
            options.sync_counts = sync_counts;
            DispatchResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.dispatch(inputs, options, as_stream(stream));
            }
            return dispatch_to_py(std::move(result), nullptr);
          },
          py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("weights"),
          py::arg("aux"), py::arg("expand"), py::arg("expert_alignment"), py::arg("zero_padding"),
          py::arg("sync_counts"), py::arg("stream"))
      .def(
          "dispatch_cached",
          [](Buffer& buffer, py::object x, py::object x_scales, py::object weights, py::object aux,
             HandlePtr handle, uintptr_t stream) {
            EPX_CHECK(handle != nullptr, kInvalidArgument, "cached dispatch needs a handle");
            const DispatchInputs inputs{view_from_py(x), view_from_py(x_scales), TensorView(),
                                        view_from_py(weights), view_from_py(aux)};
            DispatchResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.dispatch(inputs, *handle, as_stream(stream));
            }
            return dispatch_to_py(std::move(result), handle);
          },
          py::arg("x"), py::arg("x_scales"), py::arg("weights"), py::arg("aux"), py::arg("handle"),
          py::arg("stream"))
      .def(
          "combine",
          [](Buffer& buffer, py::object x, py::object weights, py::object scalars, py::object bias0,
             py::object bias1, HandlePtr handle, bool reduce_at_source, uintptr_t stream) {
            EPX_CHECK(handle != nullptr, kInvalidArgument, "combine needs a handle");
            const CombineInputs inputs{view_from_py(x), view_from_py(weights),
                                       view_from_py(scalars), view_from_py(bias0),
                                       view_from_py(bias1)};
            CombineOptions options;
            options.reduce_at = reduce_at_source ? ReduceAt::kSource : ReduceAt::kExpert;
            CombineResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.combine(inputs, *handle, options, as_stream(stream));
            }
            return py::make_tuple(tensor_to_py(result.x), tensor_to_py(result.scalars));
          },
          py::arg("x"), py::arg("weights"), py::arg("scalars"), py::arg("bias0"), py::arg("bias1"),
          py::arg("handle"), py::arg("reduce_at_source"), py::arg("stream"))
      .def(
          "combine_backward",
          [](Buffer& buffer, py::object grad_y, HandlePtr handle, py::object x, py::object weights,
             uintptr_t stream) {
            EPX_CHECK(handle != nullptr, kInvalidArgument, "combine_backward needs a handle");
            const TensorView grad_y_view = view_from_py(grad_y);
            const TensorView x_view = view_from_py(x);
            const TensorView weights_view = view_from_py(weights);
            CombineBackwardResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.combine_backward(grad_y_view, *handle, x_view, weights_view,
                                               as_stream(stream));
            }
            return py::make_tuple(tensor_to_py(result.grad_x), tensor_to_py(result.grad_weights));
          },
          py::arg("grad_y"), py::arg("handle"), py::arg("x"), py::arg("weights"), py::arg("stream"))
      .def(
          "abort", [](Buffer& buffer, uintptr_t stream) { buffer.abort(as_stream(stream)); },
          py::arg("stream"),
          "Rejects this rank's part of the operation its peers are entering (they raise at once).")
      .def(
          "synchronize",
          [](Buffer& buffer, uintptr_t stream) {
            py::gil_scoped_release nogil;
            buffer.synchronize(as_stream(stream));
          },
          py::arg("stream"))
      .def_property_readonly("config", &Buffer::config)
      .def_property_readonly("rank", &Buffer::rank)
      .def_property_readonly("num_ranks", &Buffer::num_ranks)
      .def_property_readonly("id", &Buffer::id)
      .def_property_readonly("num_sms", &Buffer::num_sms)
      .def_property_readonly("transport", [](const Buffer& b) { return b.comm().transport(); })
      .def_property_readonly("device", [](const Buffer& buffer) {
        const Device device = buffer.device();
        return py::make_tuple(static_cast<int>(device.kind), device.index);
      });
}

// --- the low-latency mode (epx/low_latency.hpp): its handle and Buffer's LL calls ------------

using LowLatencyHandlePtr = std::shared_ptr<LowLatencyHandle>;

// Workspace views cross as DLPack capsules (tensor_to_py): no copy, valid as the C++ API says.
py::dict low_latency_dispatch_to_py(LowLatencyDispatchResult&& result, LowLatencyHandlePtr handle) {
  py::dict out;
  out["x"] = tensor_to_py(result.x);
  out["x_scales"] = tensor_to_py(result.x_scales);
  out["weights"] = tensor_to_py(result.weights);
  out["aux"] = tensor_to_py(result.aux);
  out["src_info"] = tensor_to_py(result.src_info);
  out["counts"] = tensor_to_py(result.counts);
  out["handle"] = handle ? py::cast(std::move(handle))
                         : py::cast(std::make_shared<LowLatencyHandle>(std::move(result.handle)));
  return out;
}

void bind_low_latency(py::module_& m) {
  py::class_<LowLatencyHandle, LowLatencyHandlePtr>(m, "LowLatencyHandle")
      .def_readonly("buffer_id", &LowLatencyHandle::buffer_id)
      .def_readonly("rank", &LowLatencyHandle::rank)
      .def_readonly("num_ranks", &LowLatencyHandle::num_ranks)
      .def_readonly("num_tokens", &LowLatencyHandle::num_tokens)
      .def_property_readonly("topk_idx",
                             [](const LowLatencyHandle& h) { return tensor_to_py(h.topk_idx); })
      .def_property_readonly("slots",
                             [](const LowLatencyHandle& h) { return tensor_to_py(h.slots); })
      .def_property_readonly("counts",
                             [](const LowLatencyHandle& h) { return tensor_to_py(h.counts); });
  auto buffer =
      py::reinterpret_borrow<py::class_<Buffer, std::shared_ptr<Buffer>>>(m.attr("Buffer"));
  buffer
      .def(
          "low_latency_dispatch",
          [](Buffer& buffer, py::object x, py::object x_scales, py::object topk_idx,
             py::object weights, py::object aux, LowLatencyHandlePtr handle, bool return_hook,
             uintptr_t stream) {
            const DispatchInputs inputs{view_from_py(x), view_from_py(x_scales),
                                        view_from_py(topk_idx), view_from_py(weights),
                                        view_from_py(aux)};
            const LowLatencyOptions options{.return_hook = return_hook};
            std::optional<LowLatencyDispatchResult> result;
            {
              py::gil_scoped_release nogil;
              result.emplace(
                  handle ? buffer.low_latency_dispatch(inputs, *handle, options, as_stream(stream))
                         : buffer.low_latency_dispatch(inputs, options, as_stream(stream)));
            }
            return low_latency_dispatch_to_py(std::move(*result), std::move(handle));
          },
          py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("weights"),
          py::arg("aux"), py::arg("handle"), py::arg("return_hook"), py::arg("stream"))
      .def(
          "low_latency_combine",
          [](Buffer& buffer, py::object x, py::object weights, py::object scalars,
             LowLatencyHandlePtr handle, bool return_hook, uintptr_t stream) {
            EPX_CHECK(handle != nullptr, kInvalidArgument, "low_latency_combine needs a handle");
            const LowLatencyCombineInputs inputs{view_from_py(x), view_from_py(weights),
                                                 view_from_py(scalars)};
            LowLatencyCombineResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.low_latency_combine(inputs, *handle, {.return_hook = return_hook},
                                                  as_stream(stream));
            }
            return py::make_tuple(tensor_to_py(result.x), tensor_to_py(result.scalars));
          },
          py::arg("x"), py::arg("weights"), py::arg("scalars"), py::arg("handle"),
          py::arg("return_hook"), py::arg("stream"))
      .def(
          "low_latency_combine_backward",
          [](Buffer& buffer, py::object grad_y, LowLatencyHandlePtr handle, py::object x,
             py::object weights, uintptr_t stream) {
            EPX_CHECK(handle != nullptr, kInvalidArgument,
                      "low_latency_combine_backward needs a handle");
            const TensorView grad_y_view = view_from_py(grad_y);
            const TensorView x_view = view_from_py(x);
            const TensorView weights_view = view_from_py(weights);
            CombineBackwardResult result;
            {
              py::gil_scoped_release nogil;
              result = buffer.low_latency_combine_backward(grad_y_view, *handle, x_view,
                                                           weights_view, as_stream(stream));
            }
            return py::make_tuple(tensor_to_py(result.grad_x), tensor_to_py(result.grad_weights));
          },
          py::arg("grad_y"), py::arg("handle"), py::arg("x"), py::arg("weights"), py::arg("stream"))
      .def(
          "low_latency_wait",
          [](Buffer& buffer, uintptr_t stream) {
            py::gil_scoped_release nogil;
            buffer.low_latency_wait(as_stream(stream));
          },
          py::arg("stream"))
      .def("low_latency_combine_input",
           [](Buffer& buffer) { return tensor_to_py(buffer.low_latency_combine_input()); })
      .def(
          "low_latency_abort",
          [](Buffer& buffer, uintptr_t stream) {
            py::gil_scoped_release nogil;
            buffer.low_latency_abort(as_stream(stream));
          },
          py::arg("stream"));
}

}  // namespace
}  // namespace epx::python

PYBIND11_MODULE(_C, m) {
  using namespace epx::python;
  m.doc() = "epx bindings (torch-free); use the `epx` package, not this module directly.";
  bind_enums(m);
  bind_error(m);
  bind_config(m);
  bind_comm(m);
  bind_handle(m);
  bind_buffer(m);
  bind_low_latency(m);
#if defined(EPX_WITH_CUDA)
  m.attr("built_with_cuda") = true;
#else
  m.attr("built_with_cuda") = false;
#endif
}
