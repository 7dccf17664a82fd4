"""epx.Buffer and epx.Handle: the PyTorch face of the C++ epx::Buffer (docs/semantics.md).

Every operation is collective: all ranks of the group call it, in the same order, with the same
options and the same optional channels (weights, aux, scalars, bias). Work is ordered on
PyTorch's current CUDA stream (the CPU for the host transport).

Index outputs are int32 tensors (the layout epx computes in): `DispatchResult.topk_idx`,
`Handle.recv_topk_idx`, `src_token`, `expanded_rows`, `expert_offsets`.
"""

import contextlib
import itertools
import secrets
import socket
import sys
import weakref
from typing import List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C
from ._tensors import (as_float, as_int, describe, error, from_c, split_fp8, stream_of,
                       torch_device)
from ._tensors import allocate as _allocate


class _Layout(NamedTuple):
    """What a handle says about its layout without its C++ record: plain values, which
    torch.compile can read while it traces (epx.functional builds handles from these there)."""

    expand: bool
    expert_alignment: int
    zero_padding: bool
    counts_synced: bool
    num_experts: int
    num_topk: int
    local_experts: int
    num_tokens: int  # S of this rank (a symbolic size inside torch.compile)
    num_recv_rows: int  # rows of the receive-side outputs: M or N, the worst case when unsynced


def _layout_of(c_handle):
    return _Layout(c_handle.expand, c_handle.expert_alignment, c_handle.zero_padding,
                   c_handle.counts_synced, c_handle.num_experts, c_handle.num_topk,
                   c_handle.local_experts, c_handle.num_tokens,
                   c_handle.row_capacity if c_handle.expand else c_handle.recv_token_capacity)


def _compiling():
    """Whether torch.compile is tracing this call (then no C++ record can be reached)."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False  # PyTorch < 2.3: no torch.compile path in epx (custom ops need >= 2.4)


class Handle:
    """What a dispatch returns to replay (cached dispatch) or invert (combine) the exchange.

    Its tensors live on the buffer's device and are shared, not copied: do not write to them.
    With `sync_counts=False` the receive-side tensors are sized for the worst case and the real
    counts are only in `device_counts` ([N, M], int64, on the device).

    Inside torch.compile (a handle from epx.functional with sync_counts=False) the layout,
    `expert_offsets`, `tokens_per_expert_tensor`, `device_counts`, `local_expert_idx` and the
    compact `recv_topk_idx` are there; the rest needs the C++ record, which a trace cannot reach.
    """

    def __init__(self, c_handle, *, layout=None, tensors=None, op_tensor=None):
        self._c = c_handle  # None only while torch.compile traces
        self._layout = _layout_of(c_handle) if layout is None else layout
        self._tensors = {} if tensors is None else dict(tensors)
        self._op_tensor = op_tensor  # the int64 tensor naming it to epx's custom ops
        self._link = None  # epx.functional's tie between dispatch's and combine's autograd nodes

    def tensor(self, name: str) -> Optional[torch.Tensor]:
        """A handle tensor by its C++ name (epx/handle.hpp), e.g. "send_slot"; int32."""
        if name not in self._tensors:
            self._tensors[name] = from_c(self._record(name).tensor(name))
        return self._tensors[name]

    def _record(self, what):
        """The C++ handle; inside torch.compile there is none to read `what` from."""
        if self._c is None:
            raise error(f"handle {what} needs the handle's C++ record, which torch.compile cannot "
                        "trace: inside a compiled region use expert_offsets, "
                        "tokens_per_expert_tensor, device_counts, local_expert_idx or "
                        "recv_topk_idx")
        return self._c

    def _op_handle(self):
        """The int64 tensor through which epx's custom ops find this handle (made on first use
        for a handle from Buffer.dispatch)."""
        if self._op_tensor is None:
            self._op_tensor = handle_tensor(self._record("tensor"))
        return self._op_tensor

    expand = property(lambda self: self._layout.expand, doc="expanded (True) or compact layout")
    expert_alignment = property(lambda self: self._layout.expert_alignment)
    zero_padding = property(lambda self: self._layout.zero_padding)
    num_experts = property(lambda self: self._layout.num_experts)
    num_topk = property(lambda self: self._layout.num_topk)
    local_experts = property(lambda self: self._layout.local_experts)
    num_tokens = property(lambda self: self._layout.num_tokens, doc="S: tokens this rank sent")
    counts_synced = property(lambda self: self._layout.counts_synced)

    @property
    def num_recv_tokens(self) -> Optional[int]:
        """N: tokens received (compact rows); None when the counts stayed on the device."""
        return self._record("num_recv_tokens").num_recv_tokens if self.counts_synced else None

    @property
    def num_rows(self) -> Optional[int]:
        """M: expanded rows including padding (N for a compact handle); None when not synced."""
        return self._record("num_rows").num_rows if self.counts_synced else None

    @property
    def recv_topk_idx(self) -> Optional[torch.Tensor]:
        """Compact: [N, K] int32, the local expert of each (token, k) or -1. Expanded: None."""
        return None if self.expand else self.tensor("recv_topk_idx")

    @property
    def tokens_per_expert(self) -> Optional[List[int]]:
        """Real rows per local expert (a list of E_l ints) when counts were synced, else None."""
        if not self.counts_synced:
            return None
        return list(self._record("tokens_per_expert").host_tokens_per_expert)

    @property
    def tokens_per_expert_tensor(self) -> torch.Tensor:
        """[E_l] int32 on the device: real rows per local expert (synced or not)."""
        return self.tensor("tokens_per_expert")

    @property
    def expert_offsets(self) -> torch.Tensor:
        """[E_l + 1] int32 on the device: first expanded row of each local expert; last = M."""
        return self.tensor("expert_offsets")

    @property
    def host_expert_offsets(self) -> Optional[List[int]]:
        """`expert_offsets` as a list of ints when counts were synced, else None."""
        if not self.counts_synced:
            return None
        return list(self._record("host_expert_offsets").host_expert_offsets)

    @property
    def local_expert_idx(self) -> Optional[torch.Tensor]:
        """Expanded: [M] int64 on the device, the local expert of each row and -1 on padding
        rows (and on rows past M when counts stayed on the device), so that expert code can pick
        its rows without a loop over the offsets; computed on the device, without a host
        synchronisation (capturable). Compact: None (use recv_topk_idx)."""
        if not self.expand:
            return None
        if "local_expert_idx" not in self._tensors:
            self._tensors["local_expert_idx"] = _local_expert_idx(
                self.expert_offsets, self.tokens_per_expert_tensor, self._layout.num_recv_rows)
        return self._tensors["local_expert_idx"]

    @property
    def src_token(self) -> torch.Tensor:
        """[N] int32: global id (source_rank * max_tokens_per_rank + token) of each row."""
        return self.tensor("src_token")

    @property
    def expanded_rows(self) -> torch.Tensor:
        """[N, K] int32: expanded row holding (token, k), -1 where k is not local."""
        return self.tensor("expanded_rows")

    @property
    def device_counts(self) -> torch.Tensor:
        """[2] int64 on the device: N and M, valid without a host synchronisation."""
        return self.tensor("device_counts")

    def __repr__(self):
        layout = "expanded" if self.expand else "compact"
        rank = "?" if self._c is None else self._c.rank
        return (f"epx.Handle({layout}, rank={rank}, tokens={self.num_tokens}, "
                f"N={self.num_recv_tokens}, M={self.num_rows})")


def _local_expert_idx(expert_offsets, tokens_per_expert, num_rows):
    """[num_rows] int64: for each expanded row the local expert whose segment holds it, -1 where
    the row is padding or past M. Device ops only (no host synchronisation)."""
    offsets = expert_offsets.long()
    rows = torch.arange(num_rows, device=offsets.device)
    # The segment of row r: the number of experts that start at or before it, less one, i.e.
    # searchsorted(offsets[1:], rows, right=True), counted by a scatter and a running sum
    # (inductor's CUDA lowering of searchsorted fails on a slice: torch 2.11, NotImplementedError
    # SliceView). Integer sums: the same on every run.
    starts = offsets[1:].clamp(max=num_rows)
    marks = torch.zeros(num_rows + 1, dtype=torch.long, device=offsets.device)
    marks.scatter_add_(0, starts, torch.ones_like(starts))
    expert = marks[:num_rows].cumsum(0)
    inside = expert.clamp(max=offsets.shape[0] - 2)
    real = ((expert < offsets.shape[0] - 1)
            & (rows - offsets[inside] < tokens_per_expert.long()[inside]))
    return torch.where(real, expert, torch.full_like(expert, -1))


# -- handles and buffers by number, for epx's custom ops ----------------------------------------
# torch.compile cannot trace Python objects through an operator, so epx's custom ops
# (epx.functional) name a buffer by an int argument and a handle by an int64 [1] CPU tensor
# holding its number. The tensor's memory is a _HandleMemory, which torch.frombuffer keeps alive
# with the storage and which holds the C++ handle: the handle lives exactly as long as some
# tensor (an autograd node's saved copy included) still names it.

class _HandleMemory(bytearray):
    """The 8 bytes of a handle tensor (its number) and the C++ handle they keep alive."""


_LIVE_HANDLES = weakref.WeakValueDictionary()  # number -> _HandleMemory
_LIVE_BUFFERS = weakref.WeakValueDictionary()  # number -> Buffer
_numbers = itertools.count(1)  # one sequence for both: a number never names two things


def handle_tensor(c_handle) -> torch.Tensor:
    """A new int64 [1] CPU tensor naming `c_handle` for epx's custom ops."""
    number = next(_numbers)
    memory = _HandleMemory(number.to_bytes(8, sys.byteorder, signed=True))
    memory.c_handle = c_handle
    _LIVE_HANDLES[number] = memory
    return torch.frombuffer(memory, dtype=torch.int64)


def c_handle_of(tensor: torch.Tensor):
    """The C++ handle a handle tensor names."""
    memory = _LIVE_HANDLES.get(int(tensor[0])) if tensor.numel() == 1 else None
    if memory is None:
        raise error("the tensor names no live epx handle", _C.ErrorCode.HANDLE_MISMATCH)
    return memory.c_handle


def buffer_of(number: int) -> "Buffer":
    """The live Buffer with this number (Buffer._op_id)."""
    buffer = _LIVE_BUFFERS.get(number)
    if buffer is None:
        raise error(f"no live epx.Buffer has number {number}", _C.ErrorCode.HANDLE_MISMATCH)
    return buffer


class DispatchResult(NamedTuple):
    """x: [N or M, H] (fp8: a (data, scales) tuple); topk_idx: compact [N, K] int32 local expert
    or -1, None when expanded; weights/aux: compact [N, K], expanded [M] fp32, or None."""

    x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    topk_idx: Optional[torch.Tensor]
    weights: Optional[torch.Tensor]
    aux: Optional[torch.Tensor]
    handle: Handle


class CombineResult(NamedTuple):
    """x: [S, H] bf16; scalars: [S, K] fp32 when scalars were given, else None."""

    x: torch.Tensor
    scalars: Optional[torch.Tensor]


def _config(max_tokens_per_rank, hidden, num_experts, num_topk, fp8_dispatch, timeout_seconds,
            num_sms):
    config = _C.BufferConfig()
    config.max_tokens_per_rank = as_int(max_tokens_per_rank, "max_tokens_per_rank")
    config.hidden = as_int(hidden, "hidden")
    config.num_experts = as_int(num_experts, "num_experts")
    config.num_topk = as_int(num_topk, "num_topk")
    config.fp8_dispatch = bool(fp8_dispatch)
    config.timeout_seconds = as_float(timeout_seconds, "timeout_seconds")
    config.num_sms = as_int(num_sms, "num_sms")
    return config


def workspace_bytes(num_ranks, *, max_tokens_per_rank, hidden, num_experts, num_topk,
                    fp8_dispatch=False) -> int:
    """Bytes of the symmetric buffer each rank would allocate, without allocating."""
    config = _config(max_tokens_per_rank, hidden, num_experts, num_topk, fp8_dispatch, 100.0, 0)
    return _C.workspace_bytes(config, int(num_ranks))


def _broadcast_from_first(value, group):
    """`value` of the group's rank 0, on every rank of `group`."""
    objects = [value]
    if group is None or group is dist.group.WORLD:
        source = 0
    elif hasattr(dist, "get_global_rank"):
        source = dist.get_global_rank(group, 0)
    else:  # PyTorch < 2.0
        source = dist.distributed_c10d._get_global_rank(group, 0)
    dist.broadcast_object_list(objects, src=source, group=group)
    return objects[0]


TRANSPORTS = ("auto", "nccl", "ipc", "host")
NCCL_NEEDED = (2, 28)  # symmetric memory windows and their device API


def _torch_nccl_version():
    """The NCCL version PyTorch loaded, as a tuple, or None (no CUDA build, no NCCL)."""
    try:
        version = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - PyTorch without NCCL raises various errors here
        return None
    if isinstance(version, int):  # PyTorch < 1.13 reports 2.28.9 as 22809
        version = (version // 10000, version // 100 % 100, version % 100)
    return tuple(version)


def _device_key(device_index):
    """What tells GPUs apart across the processes of one job: the UUID where PyTorch reports
    it, else the host and the PCI bus (or, older still, the index)."""
    properties = torch.cuda.get_device_properties(device_index)
    uuid = getattr(properties, "uuid", None)
    if uuid is not None:
        return str(uuid)
    bus = getattr(properties, "pci_bus_id", device_index)
    return f"{socket.gethostname()}:{bus}"


def choose_transport(group, transport="auto"):
    """The transport a Buffer on `group` uses, the same on every rank (collective for "auto" on
    an NCCL group: the ranks exchange which GPU they use and whether NCCL can serve them).

    "auto": a gloo (or other CPU) group takes the host transport; an NCCL group takes "nccl"
    when PyTorch's NCCL is >= 2.28 and every rank has a GPU of its own, else "ipc" (ranks
    sharing a GPU, or an older NCCL)."""
    if transport not in TRANSPORTS:
        raise error(f"transport must be one of {', '.join(map(repr, TRANSPORTS))}, got "
                    f"{transport!r}")
    if transport != "auto":
        return transport
    if "nccl" not in str(dist.get_backend(group)).lower():
        return "host"
    nccl = _torch_nccl_version()
    mine = (_device_key(torch.cuda.current_device()),
            _C.built_with_cuda and nccl is not None and nccl >= NCCL_NEEDED)
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    devices = [device for device, _ in everyone]
    if all(ok for _, ok in everyone) and len(set(devices)) == len(devices):
        return "nccl"
    return "ipc"


class _Sizes(NamedTuple):
    rank: int
    num_ranks: int
    max_tokens_per_rank: int
    hidden: int
    num_experts: int
    num_topk: int
    local_experts: int
    fp8_dispatch: bool


class Buffer:
    """The communication buffer of one MoE layer's exchanges (collective to construct).

    group: a torch.distributed process group (None: the default group). transport:
      - "nccl": epx's CUDA transport over NCCL symmetric memory (NCCL >= 2.28, PyTorch's own;
        one rank per GPU), on torch.cuda.current_device(), with an NCCL communicator of epx's
        own made from a unique id that rank 0 broadcasts through the group;
      - "ipc": the CUDA transport over CUDA IPC (no NCCL needed, any NCCL version, ranks of one
        host, several ranks may share a GPU), on torch.cuda.current_device(); any group
        backend (gloo included) carries the setup;
      - "host": POSIX shared memory between the processes of one host, CPU tensors;
      - "auto" (the default): see choose_transport.
    Every rank must pass the same configuration; a rank that differs makes every rank raise.
    """

    def __init__(self, group=None, max_tokens_per_rank=None, hidden=None, num_experts=None,
                 num_topk=None, fp8_dispatch=False, timeout_seconds=100.0, *, num_sms=0,
                 transport="auto", low_latency_max_tokens=0):
        for name, value in (("max_tokens_per_rank", max_tokens_per_rank), ("hidden", hidden),
                            ("num_experts", num_experts), ("num_topk", num_topk)):
            if value is None:
                raise error(f"Buffer needs {name}")
        if not dist.is_initialized():
            raise error("Buffer needs an initialised torch.distributed process group")
        group = group if group is not None else dist.group.WORLD
        rank, num_ranks = dist.get_rank(group), dist.get_world_size(group)
        transport = choose_transport(group, transport)
        config = _config(max_tokens_per_rank, hidden, num_experts, num_topk, fp8_dispatch,
                         timeout_seconds, num_sms)
        # The low-latency mode's S_ll (epx/low_latency.py); 0: off.
        config.low_latency_max_tokens = as_int(low_latency_max_tokens, "low_latency_max_tokens")
        if transport == "nccl":
            unique_id = _C.nccl_unique_id() if rank == 0 else None
            unique_id = _broadcast_from_first(unique_id, group)
            comm = _C.Comm.nccl(rank, num_ranks, unique_id, torch.cuda.current_device(),
                                config.timeout_seconds)
        else:
            name = f"epx-{secrets.token_hex(8)}" if rank == 0 else None
            name = _broadcast_from_first(name, group)
            comm = (_C.Comm.ipc(rank, num_ranks, name, torch.cuda.current_device())
                    if transport == "ipc" else _C.Comm.host(rank, num_ranks, name))
        self.group = group
        self._c = _C.Buffer(comm, config, _allocate)
        self._device = torch_device(self._c.device)
        # Plain values (the configuration never changes), which torch.compile reads while it
        # traces epx.functional; the properties below return them.
        self._sizes = _Sizes(self._c.rank, self._c.num_ranks, config.max_tokens_per_rank,
                             config.hidden, config.num_experts, config.num_topk,
                             config.num_experts // self._c.num_ranks, config.fp8_dispatch)
        # The tensors imported for the workspace's views (the LL calls' outputs), by address,
        # dtype and shape (_tensors.from_c): the workspace lives as long as this Buffer, and its
        # views are a fixed few (two halves of six outputs, the combine region).
        self._workspace_views = {}
        self._op_id = next(_numbers)  # how epx's custom ops name this buffer
        _LIVE_BUFFERS[self._op_id] = self

    # -- properties ---------------------------------------------------------------------------
    rank = property(lambda self: self._sizes.rank)
    num_ranks = property(lambda self: self._sizes.num_ranks)
    device = property(lambda self: self._device, doc="where every tensor of this buffer lives")
    transport = property(lambda self: str(self._c.transport.name).lower(),
                         doc='"host", "nccl", "ipc" or "cuda_threads"')
    max_tokens_per_rank = property(lambda self: self._sizes.max_tokens_per_rank)
    hidden = property(lambda self: self._sizes.hidden)
    num_experts = property(lambda self: self._sizes.num_experts)
    num_topk = property(lambda self: self._sizes.num_topk)
    local_experts = property(lambda self: self._sizes.local_experts)
    fp8_dispatch = property(lambda self: self._sizes.fp8_dispatch)
    num_sms = property(lambda self: self._c.num_sms,
                       doc="SMs (blocks per kernel) the CUDA transport uses; 0 on the host")
    low_latency_max_tokens = property(lambda self: self._c.config.low_latency_max_tokens,
                                      doc="S_ll of the low-latency mode (0: off)")

    def receive_rows(self, *, expand, expert_alignment=1) -> int:
        """Rows of a dispatch's receive-side outputs when the counts stay on the device
        (sync_counts=False): the worst case, R * S_max for compact, R * S_max * K +
        E_l * (expert_alignment - 1) for expanded."""
        return _C.receive_rows(self._c.config, self.num_ranks, bool(expand),
                               as_int(expert_alignment, "expert_alignment"))

    def __repr__(self):
        config = self._c.config
        return (f"epx.Buffer({self.transport}, rank {self.rank}/{self.num_ranks}, "
                f"max_tokens_per_rank={config.max_tokens_per_rank}, hidden={config.hidden}, "
                f"num_experts={config.num_experts}, num_topk={config.num_topk}, "
                f"fp8_dispatch={config.fp8_dispatch})")

    # -- operations ---------------------------------------------------------------------------
    # Each operation first turns its Python arguments into descriptions for epx._C; a check
    # that fails there (a wrong type, a float alignment) aborts the operation for the peers, as
    # a failed C++ check does, so that every rank raises at once instead of the peers waiting
    # out the timeout.

    @contextlib.contextmanager
    def _collective_checks(self, stream, low_latency=False):
        """Any exception inside aborts the operation for the peers (the normal path's entry, or
        the low-latency call's round) and propagates."""
        try:
            yield
        except Exception:
            (self._c.low_latency_abort if low_latency else self._c.abort)(stream)
            raise

    def dispatch(self, x, topk_idx=None, weights=None, aux=None, *, expand=False,
                 expert_alignment=1, zero_padding=False, sync_counts=True,
                 handle=None) -> DispatchResult:
        """Sends each token to the ranks of its top-k experts (docs/semantics.md).

        x: [S, H] bf16, or a tuple (fp8-e4m3 data [S, H], fp32 scales [S, H/128]) on a buffer
        built with fp8_dispatch (uint8 data stands for fp8-e4m3 bits on PyTorch without a
        float8 dtype). topk_idx: [S, K] int64 or int32 in [-1, E). weights, aux: [S, K] fp32.
        With `handle` (cached dispatch) topk_idx must be omitted and the layout and options are
        the handle's, row for row.
        """
        stream = stream_of(self._device)
        with self._collective_checks(stream):
            data, scales = split_fp8(x)
            inputs = (describe(data, "x"), describe(scales, "x scales"))
            channels = (describe(weights, "weights"), describe(aux, "aux"))
            if handle is not None:
                self._check_handle(handle)
                if topk_idx is not None:
                    raise error("cached dispatch takes its routing from the handle: omit topk_idx")
            else:
                if topk_idx is None:
                    raise error("dispatch needs topk_idx (or a handle, for a cached dispatch)")
                routing = describe(topk_idx, "topk_idx")
                options = (bool(expand), as_int(expert_alignment, "expert_alignment"),
                           bool(zero_padding), bool(sync_counts))
        if handle is not None:
            out = self._c.dispatch_cached(*inputs, *channels, handle._c, stream)
            result_handle = handle
        else:
            out = self._c.dispatch(*inputs, routing, *channels, *options, stream)
            result_handle = Handle(out["handle"])
        recv_x = from_c(out["x"])
        if scales is not None:
            recv_x = (recv_x, from_c(out["x_scales"]))
        return DispatchResult(recv_x, from_c(out["topk_idx"]), from_c(out["weights"]),
                              from_c(out["aux"]), result_handle)

    def combine(self, x, handle, *, weights=None, scalars=None, bias=None,
                reduce_at="expert") -> CombineResult:
        """Brings expert outputs back to their source ranks and reduces them (docs/semantics.md).

        x: expanded [M, H] / compact [N, H] bf16. weights: expanded only, [M] fp32.
        scalars: a side channel returned as `.scalars` [S, K] (expanded [M], compact [N, K]).
        bias: one [S, H] bf16 tensor or a tuple of two, added in fp32 before the rounding.
        reduce_at: "expert" (one row per token and rank on the link) or "source".
        """
        stream = stream_of(self._device)
        with self._collective_checks(stream):
            self._check_handle(handle)
            if reduce_at not in ("expert", "source"):
                raise error(f'reduce_at must be "expert" or "source", got {reduce_at!r}')
            if isinstance(bias, (tuple, list)):
                if len(bias) > 2:
                    raise error(f"bias takes at most two tensors, got {len(bias)}")
                bias0, bias1 = (list(bias) + [None, None])[:2]
            else:
                bias0, bias1 = bias, None
            args = (describe(x, "x"), describe(weights, "weights"), describe(scalars, "scalars"),
                    describe(bias0, "bias"), describe(bias1, "bias"))
        y, combined_scalars = self._c.combine(*args, handle._c, reduce_at == "source", stream)
        return CombineResult(from_c(y), from_c(combined_scalars))

    def combine_backward(self, grad_y, handle, *, x, weights) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fused backward of y = combine(x, handle, weights=weights) on an expanded handle.

        Returns (grad_x [M, H] bf16 = bf16(w_row * grad_y[t]), grad_weights [M] fp32 =
        dot(grad_y[t], x_row)); padding rows are 0.
        """
        stream = stream_of(self._device)
        with self._collective_checks(stream):
            self._check_handle(handle)
            args = (describe(grad_y, "grad_y"), handle._c, describe(x, "x"),
                    describe(weights, "weights"))
        grad_x, grad_weights = self._c.combine_backward(*args, stream)
        return from_c(grad_x), from_c(grad_weights)

    def abort(self):
        """Rejects this rank's part of the operation its peers are entering: they raise at once
        instead of waiting for it (for checks of your own that fail on one rank)."""
        self._c.abort(stream_of(self._device))

    def synchronize(self):
        """Waits for this buffer's work and raises errors found on the device since."""
        self._c.synchronize(stream_of(self._device))

    @staticmethod
    def _check_handle(handle):
        if not isinstance(handle, Handle):
            raise error(f"handle must be an epx.Handle, got {type(handle).__name__}",
                        _C.ErrorCode.HANDLE_MISMATCH)
