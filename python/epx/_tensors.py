"""Tensors across the torch/epx boundary, without the extension linking against PyTorch.

Inputs cross as descriptions (pointer, dtype, shape, strides, device); outputs are torch
tensors that epx allocated through `allocate` below, with their dtype and shape, and that come
back as (base, byte_offset, dtype, shape, address): `base` itself, or a view of its bytes (no
copy). Views of epx's own memory (a Buffer's workspace) come as a DLPack capsule and their
address instead.
"""

import math
import operator

import torch

from . import _C

# fp8-e4m3: torch.float8_e4m3fn where this PyTorch has it (>= 2.1), else raw bytes in uint8.
FLOAT8 = getattr(torch, "float8_e4m3fn", None)

_TO_EPX = {
    torch.bfloat16: _C.DType.BFLOAT16,
    torch.float32: _C.DType.FLOAT32,
    torch.int32: _C.DType.INT32,
    torch.int64: _C.DType.INT64,
    torch.uint8: _C.DType.FLOAT8_E4M3,  # fp8-e4m3 bits, for PyTorch without a float8 dtype
}
if FLOAT8 is not None:
    _TO_EPX[FLOAT8] = _C.DType.FLOAT8_E4M3

_FROM_EPX = {
    int(_C.DType.BFLOAT16): torch.bfloat16,
    int(_C.DType.FLOAT8_E4M3): FLOAT8 if FLOAT8 is not None else torch.uint8,
    int(_C.DType.FLOAT32): torch.float32,
    int(_C.DType.INT32): torch.int32,
    int(_C.DType.INT64): torch.int64,
}

_ELEMENT_SIZE = {dtype: torch.empty((), dtype=t).element_size() for dtype, t in _FROM_EPX.items()}

_CPU = int(_C.DeviceKind.CPU)
_CUDA = int(_C.DeviceKind.CUDA)


def error(message, code=_C.ErrorCode.INVALID_ARGUMENT):
    """An epx.EpxError raised by the Python layer (same class and `.code` as the C++ ones)."""
    exception = _C.EpxError(f"epx {str(code.name).lower().replace('_', ' ')}: {message}")
    exception.code = code
    return exception


def as_int(value, name):
    """`value` as an int when it is an integer (int, or an integer numpy/torch scalar); a float
    such as 4.7, a bool or anything else is refused rather than truncated."""
    if isinstance(value, bool):
        raise error(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})") from None


def as_float(value, name):
    """`value` as a finite float."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise error(f"{name} must be finite, got {value!r}")
    return number


def describe(tensor, name):
    """A torch tensor (or None) as the description epx._C turns into a TensorView."""
    if tensor is None:
        return None
    if not isinstance(tensor, torch.Tensor):
        raise error(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    dtype = _TO_EPX.get(tensor.dtype)
    if dtype is None:
        raise error(f"{name} has dtype {tensor.dtype}, which epx does not take")
    if tensor.is_cuda:  # cheaper than building tensor.device
        kind, index = _CUDA, tensor.get_device()
    elif tensor.device.type == "cpu":
        kind, index = _CPU, 0
    else:
        raise error(f"{name} is on {tensor.device}; epx takes CPU or CUDA tensors")
    return (tensor.data_ptr(), int(dtype), tensor.shape, tensor.stride(), kind, index)


def split_fp8(x):
    """(data, scales) of a dispatch's x: a (data, scales) pair for fp8, else (x, None)."""
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise error("fp8 x must be a tuple (data, scales)")
        return x[0], x[1]
    return x, None


def from_c(spec, views=None):
    """An epx output (base, byte_offset, dtype, shape, address) as a torch tensor; None stays
    None.

    `views`, a dict the caller keeps for memory that lives as long as it does (a Buffer's
    workspace), holds the tensor imported for each (address, dtype, shape) before: a view that
    comes back is then an alias of that tensor (`detach`: ~0.5 us on the CPU here) instead of a
    new import (DLPack, then reshape and views of the bytes: ~8 us a view, most of an eager
    low-latency call's host time). Each call still returns a tensor object of its own, so that
    no call's autograd or requires_grad settings reach another's; it shares the memory and the
    version counter of the earlier ones, as the memory itself is shared."""
    if spec is None:
        return None
    base, offset, dtype, shape, address = spec
    if address is not None and views is not None:
        imported = views.get((address, dtype, shape))
        if imported is not None:
            return imported.detach()
    if not isinstance(base, torch.Tensor):  # an engine-owned tensor, as a DLPack capsule
        base = torch.utils.dlpack.from_dlpack(base)
    torch_dtype = _FROM_EPX[dtype]
    if offset == 0 and base.dtype == torch_dtype and base.shape == shape:
        tensor = base  # an output with an allocation of its own (the common case)
    else:
        num_bytes = math.prod(shape) * _ELEMENT_SIZE[dtype]
        flat = base.reshape(-1).view(torch.uint8)[offset:offset + num_bytes]
        tensor = flat.view(torch_dtype).view(shape)
    if address is None or views is None:
        return tensor
    views[(address, dtype, shape)] = tensor
    return tensor.detach()


_DEVICES = {}  # (kind, index) -> torch.device, made once, not at every allocate
_last_stream = [0]  # the stream stream_of() last returned: the one epx's calls run on


def allocate(requests, device_kind, device_index, stream):
    """epx's output allocator: for each (dtype, shape) of one epx call a tensor from PyTorch's
    allocator, in order (one callback per call, not one per output)."""
    key = (device_kind, device_index)
    device = _DEVICES.get(key)
    if device is None:
        device = _DEVICES[key] = torch_device(key)
    tensors = []
    for dtype, shape in requests:
        torch_dtype = _FROM_EPX[dtype]
        if 0 in shape:  # empty: still a distinct, valid pointer (one element, viewed empty)
            tensors.append(torch.empty(1, dtype=torch_dtype, device=device)[:0].view(shape))
        else:
            tensors.append(torch.empty(shape, dtype=torch_dtype, device=device))
    # PyTorch's caching allocator tracks the current stream; an allocation for another stream
    # must be recorded on it. Every epx call runs on the stream stream_of() just returned, so
    # the current stream is only queried when the stream differs from that one.
    if (device_kind == _CUDA and stream and stream != _last_stream[0]
            and stream != current_raw_stream(device)):
        external = torch.cuda.ExternalStream(stream, device=device)
        for tensor in tensors:
            tensor.record_stream(external)
    return tensors


# The current stream's handle without building a torch.cuda.Stream object (about 6 us a call
# on the GPU machine through torch.cuda.current_stream); PyTorch's own Triton launcher uses it.
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_raw_stream(device):
    if _RAW_STREAM is not None:
        return _RAW_STREAM(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def torch_device(buffer_device):
    kind, index = buffer_device
    return torch.device("cuda", index) if kind == _CUDA else torch.device("cpu")


def stream_of(device):
    """The stream epx orders its work on: PyTorch's current stream (0 on the CPU)."""
    if device.type == "cuda":
        _last_stream[0] = current_raw_stream(device)
        return _last_stream[0]
    return 0
