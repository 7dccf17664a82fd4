"""Differentiable dispatch and combine (docs/semantics.md, "Gradients").

    forward                             backward
    recv = dispatch(x, idx, w, aux)     dx, dw = combine(d_recv_x, handle, scalars=d_recv_w)
                                        daux = combine(d_recv_x, handle, scalars=d_recv_aux)
    y = combine(h, handle, w) expanded  dh, dw = combine_backward(dy, handle, x=h, weights=w)
    y = combine(h, handle) compact      dh = dispatch(dy, handle=handle).x (cached)
    y = combine(h, handle) expanded     dh = dispatch(dy, handle=handle).x (cached)

Chained, the router's top-k weights get dL/dw[t,k] = dot(dL/dy[t], expert_k(x[t])) in either
layout. Backward passes reuse the forward's handle (no routing is recomputed).

With PyTorch >= 2.5 the four exchanges are custom operators (torch.ops.epx.dispatch, combine,
combine_backward, cached_dispatch) with fake implementations, registered autograd and an
ordered effect, so that torch.compile(fullgraph=True) traces an MoE layer through them; a
buffer crosses the operator boundary as an int and a handle as an int64 tensor naming it
(epx.buffer.handle_tensor). Older PyTorch runs the same kernels through torch.autograd.Function.

Every backward is itself a collective: all ranks must run the same graph (same functions, and
the same inputs requiring grad), as they run the same forward.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _C
from .buffer import Buffer, Handle, _compiling, _Layout, buffer_of, c_handle_of, handle_tensor
from ._tensors import as_int, error


def _ordered_effect_registration():
    """How this PyTorch marks an operator as having side effects in an order (so that
    torch.compile neither drops nor reorders it: see _register_custom_ops), or None."""
    register = getattr(torch.library, "_register_effectful_op", None)
    if register is not None:
        from torch._library.effects import EffectType

        return lambda name: register(f"epx::{name}", EffectType.ORDERED)
    try:
        from torch._higher_order_ops import effects
    except ImportError:
        return None
    if not hasattr(effects, "_register_effectful_op"):
        return None
    return lambda name: effects._register_effectful_op(getattr(torch.ops.epx, name).default,
                                                       effects._EffectType.ORDERED)


# torch.library.custom_op, register_fake and register_autograd arrived in 2.4; ordered effects
# in a compiled backward (where combine_backward and cached_dispatch run) in 2.5.
_REGISTER_ORDERED = _ordered_effect_registration()
CUSTOM_OPS = (torch.__version__ >= (2, 5) and _REGISTER_ORDERED is not None
              and all(hasattr(torch.library, name)
                      for name in ("custom_op", "register_fake", "register_autograd")))


# -- kernels: the exchanges themselves, on tensors and ints only ----------------------------------
# Optional outputs cannot be declared in an operator's schema, so an absent one is an empty
# placeholder (_absent) that the public functions below turn back into None.

def _absent(like, dtype=torch.float32):
    return torch.empty(0, dtype=dtype, device=like.device)


def _past_counts(device_counts, rows, which):
    """[rows] bool on the device: True for the rows at and beyond the real count (N: which=0,
    M: which=1) of a handle whose counts stayed on the device; no host synchronisation."""
    return torch.arange(rows, device=device_counts.device) >= device_counts[which]


def _dispatch_kernel(x: Tensor, topk_idx: Tensor, weights: Optional[Tensor], aux: Optional[Tensor],
                     buffer_id: int, expand: bool, expert_alignment: int, zero_padding: bool,
                     sync_counts: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                 Tensor, Tensor, Tensor]:
    """(recv_x, recv_weights, recv_aux, recv_topk_idx, expert_offsets, tokens_per_expert,
    device_counts, handle, link). The handle's tensors come back as copies: an operator's
    outputs may not alias each other (these are views of one allocation), and a compiler that
    reuses an output's memory must not overwrite what the handle still reads."""
    result = buffer_of(buffer_id).dispatch(x, topk_idx, weights, aux, expand=expand,
                                           expert_alignment=expert_alignment,
                                           zero_padding=zero_padding, sync_counts=sync_counts)
    handle = result.handle
    recv_x, recv_weights, recv_aux = result.x, result.weights, result.aux
    recv_topk_idx = _absent(x, torch.int32) if expand else handle.recv_topk_idx.clone()
    counts = handle.device_counts
    if not sync_counts:
        # Rows past the real count are unspecified in epx; these functions hand them out as
        # zeros (x only with zero_padding, as for padding rows) and as index -1, so that expert
        # code over the worst-case rows reads finite values and their gradients stay zero.
        past = _past_counts(counts, recv_x.shape[0], 1 if expand else 0).unsqueeze(1)
        if zero_padding:
            recv_x.masked_fill_(past, 0)
        for scalars in (recv_weights, recv_aux):
            if scalars is not None:
                scalars.masked_fill_(past if scalars.dim() == 2 else past.squeeze(1), 0)
        if not expand:
            recv_topk_idx.masked_fill_(past, -1)
    return (recv_x,
            _absent(x) if recv_weights is None else recv_weights,
            _absent(x) if recv_aux is None else recv_aux,
            recv_topk_idx, handle.expert_offsets.clone(),
            handle.tokens_per_expert_tensor.clone(), counts.clone(), handle_tensor(handle._c),
            torch.empty(0, device=x.device))


def _combine_kernel(x: Tensor, handle: Tensor, link: Optional[Tensor], weights: Optional[Tensor],
                    scalars: Optional[Tensor], aux_scalars: Optional[Tensor], buffer_id: int,
                    num_tokens: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, combined scalars, combined aux_scalars). `link` is dispatch's empty tensor, an input
    only so that autograd ties this node to dispatch's; `num_tokens` (the handle's S) sizes y
    in the fake implementation."""
    buffer, python_handle = buffer_of(buffer_id), Handle(c_handle_of(handle))
    result = buffer.combine(x, python_handle, weights=weights, scalars=scalars)
    combined_aux = _absent(x)
    if aux_scalars is not None:
        # The second scalar pass of the contract: combine carries one scalar channel. Its rows
        # must be the handle's; they are x again, and their sum is dropped.
        combined_aux = buffer.combine(x, python_handle, scalars=aux_scalars).scalars
    combined = result.scalars
    return result.x, _absent(x) if combined is None else combined, combined_aux


def _combine_backward_kernel(grad_y: Tensor, handle: Tensor, x: Tensor, weights: Tensor,
                             buffer_id: int) -> Tuple[Tensor, Tensor]:
    python_handle = Handle(c_handle_of(handle))
    grad_x, grad_weights = buffer_of(buffer_id).combine_backward(grad_y, python_handle, x=x,
                                                                 weights=weights)
    if not python_handle.counts_synced:  # the CUDA transport leaves rows past M unwritten
        past = _past_counts(python_handle.device_counts, grad_x.shape[0], 1)
        grad_x.masked_fill_(past.unsqueeze(1), 0)
        grad_weights.masked_fill_(past, 0)
    return grad_x, grad_weights


def _cached_dispatch_kernel(x: Tensor, handle: Tensor, buffer_id: int, num_rows: int) -> Tensor:
    """The rows of `x` where the forward's landed, padding rows (and rows past the counts) 0.
    `num_rows` (the forward's receive rows) sizes the output in the fake implementation."""
    python_handle = Handle(c_handle_of(handle))
    rows = buffer_of(buffer_id).dispatch(x, handle=python_handle).x
    if python_handle.expand and not (python_handle.zero_padding and python_handle.counts_synced):
        rows.masked_fill_((python_handle.local_expert_idx < 0).unsqueeze(1), 0)
    elif not python_handle.expand and not python_handle.counts_synced:
        rows.masked_fill_(_past_counts(python_handle.device_counts, rows.shape[0], 0).unsqueeze(1),
                          0)
    return rows


# -- autograd, shared by the custom operators and the autograd.Function fallback -----------------

def _grad_or_zeros(grad, shape, dtype, device):
    """Incoming gradients may be None (output unused), non-contiguous or expanded (stride 0,
    as y.sum() hands them): epx takes a contiguous tensor."""
    if grad is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return grad.to(dtype).contiguous()


def _dispatch_setup(ctx, inputs, output):
    x, _, weights, aux, buffer_id = inputs[:5]
    ctx.buffer_id, ctx.num_tokens = buffer_id, x.shape[0]
    ctx.recv_x_shape, ctx.device = output[0].shape, x.device
    ctx.weights_shape = None if weights is None else output[1].shape
    ctx.aux_shape = None if aux is None else output[2].shape
    ctx.save_for_backward(output[7])


def _dispatch_backward(ctx, grad_recv_x, grad_recv_weights, grad_recv_aux, *unused):
    (handle,) = ctx.saved_tensors
    grad_recv_x = _grad_or_zeros(grad_recv_x, ctx.recv_x_shape, torch.bfloat16, ctx.device)
    channels = []  # (input position, gradient of its received copy)
    if ctx.weights_shape is not None:
        # Always sent when the forward had weights, so that every rank passes the same channels
        # whatever its own requires_grad says.
        channels.append((2, _grad_or_zeros(grad_recv_weights, ctx.weights_shape, torch.float32,
                                           ctx.device)))
    if ctx.aux_shape is not None and ctx.needs_input_grad[3]:
        channels.append((3, _grad_or_zeros(grad_recv_aux, ctx.aux_shape, torch.float32,
                                           ctx.device)))
    scalars = [grad for _, grad in channels] + [None, None]
    grad_x, *combined = _ops.combine(grad_recv_x, handle, None, None, scalars[0], scalars[1],
                                     ctx.buffer_id, ctx.num_tokens)
    grads = [grad_x if ctx.needs_input_grad[0] else None] + [None] * 8
    for (position, _), grad in zip(channels, combined):
        if ctx.needs_input_grad[position]:
            grads[position] = grad
    return tuple(grads)


def _combine_setup(ctx, inputs, output):
    x, handle, link, weights, _, _, buffer_id, num_tokens = inputs
    ctx.buffer_id, ctx.x_rows, ctx.device = buffer_id, x.shape[0], x.device
    ctx.y_shape = (num_tokens, x.shape[1])
    ctx.link_shape = None if link is None else link.shape
    ctx.weighted = weights is not None
    if ctx.weighted:
        ctx.save_for_backward(handle, x, weights)
    else:
        ctx.save_for_backward(handle)


def _combine_backward(ctx, grad_y, *unused):
    grad_y = _grad_or_zeros(grad_y, ctx.y_shape, torch.bfloat16, ctx.device)
    grad_link = None if ctx.link_shape is None else torch.zeros(ctx.link_shape, device=ctx.device)
    if ctx.weighted:
        handle, x, weights = ctx.saved_tensors
        grad_x, grad_weights = _ops.combine_backward(grad_y, handle, x, weights, ctx.buffer_id)
    else:
        (handle,) = ctx.saved_tensors
        grad_x = _ops.cached_dispatch(grad_y, handle, ctx.buffer_id, ctx.x_rows)
        grad_weights = None
    return (grad_x if ctx.needs_input_grad[0] else None, None, grad_link,
            grad_weights if ctx.needs_input_grad[3] else None, None, None, None, None)


# -- the two ways in: custom operators (PyTorch >= 2.4) or autograd.Function ---------------------

class _Ops:
    """The four exchanges as the autograd formulas and the public functions call them."""

    def __init__(self, dispatch, combine, combine_backward, cached_dispatch):
        self.dispatch, self.combine = dispatch, combine
        self.combine_backward, self.cached_dispatch = combine_backward, cached_dispatch


def _register_custom_ops():
    library = torch.library
    dispatch = library.custom_op("epx::dispatch", mutates_args=())(_dispatch_kernel)
    combine = library.custom_op("epx::combine", mutates_args=())(_combine_kernel)
    combine_backward = library.custom_op("epx::combine_backward",
                                         mutates_args=())(_combine_backward_kernel)
    cached_dispatch = library.custom_op("epx::cached_dispatch",
                                        mutates_args=())(_cached_dispatch_kernel)

    # Output sizes from the buffer's configuration and the arguments alone: that is what
    # sync_counts=False gives (worst-case rows); synced counts are known only after the exchange.
    @dispatch.register_fake
    def _(x, topk_idx, weights, aux, buffer_id, expand, expert_alignment, zero_padding,
          sync_counts):
        if sync_counts:
            raise error("inside torch.compile, dispatch needs sync_counts=False: its output "
                        "sizes must not depend on the routing (docs/semantics.md)")
        buffer = buffer_of(buffer_id)
        rows = buffer.receive_rows(expand=expand, expert_alignment=expert_alignment)
        scalar_shape = (rows,) if expand else (rows, buffer.num_topk)
        empty = x.new_empty
        return (empty(rows, x.shape[1]),
                _absent(x) if weights is None else empty(scalar_shape, dtype=torch.float32),
                _absent(x) if aux is None else empty(scalar_shape, dtype=torch.float32),
                _absent(x, torch.int32) if expand else empty(rows, buffer.num_topk,
                                                              dtype=torch.int32),
                empty(buffer.local_experts + 1, dtype=torch.int32),
                empty(buffer.local_experts, dtype=torch.int32),
                empty(2, dtype=torch.int64), torch.empty(1, dtype=torch.int64),
                empty(0, dtype=torch.float32))

    @combine.register_fake
    def _(x, handle, link, weights, scalars, aux_scalars, buffer_id, num_tokens):
        num_topk = buffer_of(buffer_id).num_topk
        return (x.new_empty(num_tokens, x.shape[1]),
                _absent(x) if scalars is None else x.new_empty(num_tokens, num_topk,
                                                               dtype=torch.float32),
                _absent(x) if aux_scalars is None else x.new_empty(num_tokens, num_topk,
                                                                   dtype=torch.float32))

    @combine_backward.register_fake
    def _(grad_y, handle, x, weights, buffer_id):
        return torch.empty_like(x), torch.empty_like(weights)

    @cached_dispatch.register_fake
    def _(x, handle, buffer_id, num_rows):
        return x.new_empty(num_rows, x.shape[1])

    dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
    combine.register_autograd(_combine_backward, setup_context=_combine_setup)
    # Every exchange is a collective, but its schema says it is a pure function: a compiler
    # may then drop one whose outputs it finds unused (inductor does, for a rank whose batch is
    # empty in a graph specialised to 0 tokens: the peers then wait in vain) or reorder two
    # that no data orders (the aux pass, layers of separate branches). An ordered effect
    # threads a token through all four, in program order, forward and backward.
    for name in ("dispatch", "combine", "combine_backward", "cached_dispatch"):
        _REGISTER_ORDERED(name)
    ops = torch.ops.epx
    return _Ops(ops.dispatch, ops.combine, ops.combine_backward, ops.cached_dispatch)


class _DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _dispatch_kernel(*inputs)
        _dispatch_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[3:8])
        return output

    backward = staticmethod(_dispatch_backward)


class _CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        output = _combine_kernel(*inputs)
        _combine_setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return output

    backward = staticmethod(_combine_backward)


if CUSTOM_OPS:
    _ops = _register_custom_ops()
else:  # backward passes run outside autograd: the kernels themselves
    _ops = _Ops(_DispatchFunction.apply, _CombineFunction.apply, _combine_backward_kernel,
                _cached_dispatch_kernel)


# -- the public functions ------------------------------------------------------------------------

def _check_inputs(buffer, tensors, expert_alignment):
    """What an operator's schema would refuse, refused first: a failure then aborts the operation
    for the peers (Buffer.abort) instead of leaving them to wait out the timeout."""
    try:
        if not isinstance(buffer, Buffer):
            raise error(f"buffer must be an epx.Buffer, got {type(buffer).__name__}")
        for name, tensor in tensors:
            if tensor is not None and not isinstance(tensor, torch.Tensor):
                raise error(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        return as_int(expert_alignment, "expert_alignment")
    except _C.EpxError:
        if isinstance(buffer, Buffer):
            buffer.abort()
        raise


def dispatch(buffer: Buffer, x: Tensor, topk_idx: Tensor, weights: Optional[Tensor] = None,
             aux: Optional[Tensor] = None, *, expand: bool = False, expert_alignment: int = 1,
             zero_padding: bool = True, sync_counts: bool = True):
    """Differentiable dispatch: (recv_x, recv_weights, handle), or (recv_x, recv_weights,
    recv_aux, handle) when `aux` is given.

    x: [S, H] bf16; topk_idx: [S, K] int64/int32 in [-1, E) (not differentiable); weights:
    [S, K] fp32 (the router's top-k weights), or None; aux: [S, K] fp32, a second
    per-(token, k) scalar, or None (its gradient comes back through a second scalar pass of
    dispatch's backward when it requires grad: every rank must agree on that). recv_x is compact
    [N, H] or expanded [M, H]; recv_weights and recv_aux compact [N, K] or expanded [M] (None
    without weights); the handle gives the layout (`handle.expert_offsets`,
    `handle.local_expert_idx`, `handle.tokens_per_expert`, `handle.recv_topk_idx`). Padding rows
    are zero by default (`zero_padding`), so that expert GEMMs over whole aligned segments see
    finite values.

    sync_counts=False: no host synchronisation; outputs have the worst-case rows
    (`buffer.receive_rows`) and the rows past the real count are zero (x with zero_padding),
    their index -1 and their gradients zero. Needed inside torch.compile and CUDA graphs.
    """
    alignment = _check_inputs(buffer, (("x", x), ("topk_idx", topk_idx), ("weights", weights),
                                       ("aux", aux)), expert_alignment)
    (recv_x, recv_weights, recv_aux, recv_topk_idx, expert_offsets, tokens_per_expert,
     device_counts, op_handle, link) = _ops.dispatch(x, topk_idx, weights, aux, buffer._op_id,
                                                    bool(expand), alignment, bool(zero_padding),
                                                    bool(sync_counts))
    layout = _Layout(bool(expand), alignment, bool(zero_padding), bool(sync_counts),
                     buffer.num_experts, buffer.num_topk, buffer.local_experts, x.shape[0],
                     recv_x.shape[0])
    tensors = {"expert_offsets": expert_offsets, "tokens_per_expert": tokens_per_expert,
               "device_counts": device_counts}
    if not expand:
        tensors["recv_topk_idx"] = recv_topk_idx
    handle = Handle(None if _compiling() else c_handle_of(op_handle), layout=layout,
                    tensors=tensors, op_tensor=op_handle)
    # Combine takes `link` as an input: its node then runs on every rank whose dispatch input
    # requires grad, even where the expert outputs do not (a rank that received no rows), and
    # its gradient path leads back to dispatch's node, so that backward runs on every rank too.
    # Both are collectives: a rank that skipped them would leave its peers waiting.
    handle._link = link
    recv_weights = None if weights is None else recv_weights
    if aux is None:
        return recv_x, recv_weights, handle
    return recv_x, recv_weights, recv_aux, handle


def combine(buffer: Buffer, x: Tensor, handle: Handle, weights: Optional[Tensor] = None) -> Tensor:
    """Differentiable combine: y [S, H] bf16 on every source rank.

    Expanded handle: y[t] = sum_k w_row * x_row (plain sum without weights); weights [M] fp32
    (typically dispatch's recv_weights), differentiable. Compact handle: y[t] = sum over ranks
    of x_row (the expert side applied the weights); weights must be None. With an unsynced
    handle x has the worst-case rows; rows past the real count are never read.
    """
    _check_inputs(buffer, (("x", x), ("weights", weights)), 1)
    if not isinstance(handle, Handle):
        buffer.abort()
        raise error(f"handle must be an epx.Handle, got {type(handle).__name__}",
                    _C.ErrorCode.HANDLE_MISMATCH)
    y, _, _ = _ops.combine(x, handle._op_handle(), handle._link, weights, None, None,
                           buffer._op_id, handle.num_tokens)
    return y


# The low-latency mode's autograd functions (epx/low_latency.py).
from .low_latency import functional_combine as low_latency_combine  # noqa: E402,F401
from .low_latency import functional_dispatch as low_latency_dispatch  # noqa: E402,F401
