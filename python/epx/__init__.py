"""epx: expert-parallel dispatch and combine for mixture-of-experts layers, with PyTorch.

    buffer = epx.Buffer(group, max_tokens_per_rank=..., hidden=..., num_experts=..., num_topk=...)
    recv_x, recv_w, handle = epx.functional.dispatch(buffer, x, topk_idx, topk_weights, expand=True)
    y = epx.functional.combine(buffer, expert_out, handle, recv_w)
    moe = epx.nn.ExpertParallelMoE(buffer, router, local_experts)   # the same as a module

A process group on NCCL selects the CUDA transport, any other (gloo) the host transport over
POSIX shared memory. See python/README.md for building and the semantics in docs/semantics.md.
"""

import pkgutil as _pkgutil

# The compiled module may live in another `epx` folder than these sources: a CMake build puts
# it under <build>/python/epx/, and `PYTHONPATH=python:<build>/python` must find it. Every `epx`
# folder on sys.path joins the package path.
__path__ = _pkgutil.extend_path(__path__, __name__)

# PyTorch first: it loads its CUDA runtime and NCCL, which the CUDA build of epx._C then
# shares (one libnccl in the process) instead of looking for its own.
import torch as _torch  # noqa: F401

try:
    from . import _C
except ModuleNotFoundError as _error:  # pragma: no cover - depends on the installation
    raise ImportError(
        "epx: the compiled module epx._C was not found next to the package or in any 'epx' "
        "folder on sys.path. Build it with `pip install --no-build-isolation .`, or with "
        "`cmake -S . -B build -DEPX_BUILD_PYTHON=ON && cmake --build build` and "
        "PYTHONPATH=python:build/python (see python/README.md)."
    ) from _error

from ._C import EpxError, ErrorCode  # noqa: E402
from .buffer import Buffer, CombineResult, DispatchResult, Handle, workspace_bytes  # noqa: E402
from .low_latency import (LowLatencyCombineResult, LowLatencyDispatchResult,  # noqa: E402
                          LowLatencyHandle)
from . import functional, nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Buffer",
    "CombineResult",
    "DispatchResult",
    "EpxError",
    "ErrorCode",
    "Handle",
    "LowLatencyCombineResult",
    "LowLatencyDispatchResult",
    "LowLatencyHandle",
    "functional",
    "nn",
    "workspace_bytes",
]
