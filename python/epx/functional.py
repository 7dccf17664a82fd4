"""Differentiable dispatch and combine (docs/semantics.md, "Gradients").

    forward                                   backward
    recv = dispatch(x, idx, w)                dx, dw = combine(d_recv_x, handle, scalars=d_recv_w)
    y = combine(h, handle, w_rows) expanded   dh, dw_rows = combine_backward(dy, handle, x=h, weights=w_rows)
    y = combine(h, handle) compact            dh = dispatch(dy, handle=handle).x (cached)
    y = combine(h, handle) expanded           dh = dispatch(dy, handle=handle).x (cached)

Chained, the router's top-k weights get dL/dw[t,k] = dot(dL/dy[t], expert_k(x[t])) in either
layout. Backward passes reuse the forward's handle (no routing is recomputed).

Every backward is itself a collective: all ranks must run the same graph (same functions, and
the same inputs requiring grad), as they run the same forward.
"""

from typing import Optional, Tuple

import torch

from .buffer import Buffer, Handle
from ._tensors import error


def _grad_or_zeros(grad, like_shape, dtype, device):
    """Incoming gradients may be None (output unused), non-contiguous or expanded (stride 0,
    as y.sum() hands them): epx takes a contiguous tensor."""
    if grad is None:
        return torch.zeros(like_shape, dtype=dtype, device=device)
    return grad.to(dtype).contiguous()


def _zero_padding_rows(grad_rows, handle):
    """Zeroes the rows of an expanded tensor that hold no (token, k): the alignment padding
    (and, without synced counts, the rows past M)."""
    real = torch.zeros(grad_rows.shape[0], dtype=torch.bool, device=grad_rows.device)
    rows = handle.expanded_rows.reshape(-1).long()
    real[rows[rows >= 0]] = True
    return grad_rows.masked_fill(~real.unsqueeze(1), 0)


class _Dispatch(torch.autograd.Function):
    """Outputs recv_x, [recv_weights,] link. `link` is an empty tensor that the handle carries
    into combine's autograd node: combine's backward then runs on every rank whose dispatch
    input requires grad, even where the expert outputs do not (a rank that received no rows),
    and its gradient path leads back here, so this backward runs on every rank too. Both are
    collectives: a rank that skipped them would leave its peers waiting."""

    @staticmethod
    def forward(ctx, x, weights, buffer, topk_idx, expand, expert_alignment, zero_padding,
                handle_out):
        result = buffer.dispatch(x.detach(), topk_idx,
                                 None if weights is None else weights.detach(),
                                 expand=expand, expert_alignment=expert_alignment,
                                 zero_padding=zero_padding)
        ctx.buffer = buffer
        # The C++ handle, not the Python one: the Python handle holds `link`, whose graph node
        # holds this context (no reference cycle).
        ctx.handle_c = result.handle._c
        ctx.has_weights = weights is not None
        ctx.recv_x_shape = result.x.shape
        ctx.recv_weights_shape = None if weights is None else result.weights.shape
        handle_out.append(result.handle)
        link = torch.empty(0, device=result.x.device)
        if weights is None:
            return result.x, link
        return result.x, result.weights, link

    @staticmethod
    def backward(ctx, grad_recv_x, *grads):
        grad_recv_weights = grads[0] if ctx.has_weights else None
        buffer = ctx.buffer
        grad_recv_x = _grad_or_zeros(grad_recv_x, ctx.recv_x_shape, torch.bfloat16,
                                     buffer.device)
        scalars = None
        if ctx.has_weights:
            # Always sent when the forward had weights, so that every rank passes the same
            # channels whatever its own requires_grad says.
            scalars = _grad_or_zeros(grad_recv_weights, ctx.recv_weights_shape, torch.float32,
                                     buffer.device)
        result = buffer.combine(grad_recv_x, Handle(ctx.handle_c), scalars=scalars)
        grad_x = result.x if ctx.needs_input_grad[0] else None
        grad_weights = result.scalars if ctx.has_weights and ctx.needs_input_grad[1] else None
        return grad_x, grad_weights, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, link, buffer, handle):
        result = buffer.combine(x.detach(), handle,
                                weights=None if weights is None else weights.detach())
        ctx.buffer = buffer
        ctx.handle = handle
        ctx.has_weights = weights is not None
        ctx.link = link
        if weights is not None:
            ctx.save_for_backward(x, weights)
        ctx.x_shape = x.shape
        ctx.y_shape = result.x.shape
        return result.x

    @staticmethod
    def backward(ctx, grad_y):
        buffer, handle = ctx.buffer, ctx.handle
        grad_y = _grad_or_zeros(grad_y, ctx.y_shape, torch.bfloat16, buffer.device)
        grad_link = torch.zeros_like(ctx.link) if ctx.link is not None else None
        if ctx.has_weights:
            x, weights = ctx.saved_tensors
            grad_x, grad_weights = buffer.combine_backward(grad_y, handle, x=x.detach(),
                                                           weights=weights.detach())
            return (grad_x if ctx.needs_input_grad[0] else None,
                    grad_weights if ctx.needs_input_grad[1] else None, grad_link, None, None)
        grad_x = buffer.dispatch(grad_y, handle=handle).x
        if handle.expand and not handle.zero_padding:
            grad_x = _zero_padding_rows(grad_x, handle)
        return grad_x if ctx.needs_input_grad[0] else None, None, grad_link, None, None


def dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor,
             weights: Optional[torch.Tensor] = None, *, expand: bool = False,
             expert_alignment: int = 1,
             zero_padding: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor], Handle]:
    """Differentiable dispatch: (recv_x, recv_weights, handle).

    x: [S, H] bf16; topk_idx: [S, K] int64/int32 in [-1, E) (not differentiable); weights:
    [S, K] fp32 (the router's top-k weights), or None. recv_x is compact [N, H] or expanded
    [M, H]; recv_weights compact [N, K] or expanded [M] (None without weights); the handle
    gives the layout (`handle.expert_offsets`, `handle.tokens_per_expert`,
    `handle.recv_topk_idx`). Padding rows are zero by default (`zero_padding`), so that expert
    GEMMs over whole aligned segments see finite values.
    """
    handle_out = []
    if weights is None:
        recv_x, link = _Dispatch.apply(x, None, buffer, topk_idx, expand, expert_alignment,
                                       zero_padding, handle_out)
        recv_weights = None
    else:
        recv_x, recv_weights, link = _Dispatch.apply(x, weights, buffer, topk_idx, expand,
                                                     expert_alignment, zero_padding, handle_out)
    handle = handle_out[0]
    if link.requires_grad:
        handle._autograd_link = link
    return recv_x, recv_weights, handle


def combine(buffer: Buffer, x: torch.Tensor, handle: Handle,
            weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable combine: y [S, H] bf16 on every source rank.

    Expanded handle: y[t] = sum_k w_row * x_row (plain sum without weights); weights [M] fp32
    (typically dispatch's recv_weights), differentiable. Compact handle: y[t] = sum over ranks
    of x_row (the expert side applied the weights); weights must be None.
    """
    if weights is not None and not handle.expand:
        raise error("combine: weights cannot be given with a compact handle (the expert side "
                    "applies them when it reduces its local experts)")
    return _Combine.apply(x, weights, getattr(handle, "_autograd_link", None), buffer, handle)


# The low-latency mode's autograd functions (epx/low_latency.py).
from .low_latency import functional_combine as low_latency_combine  # noqa: E402,F401
from .low_latency import functional_dispatch as low_latency_dispatch  # noqa: E402,F401
