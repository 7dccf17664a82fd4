"""The low-latency (LL) mode for decode steps (docs/semantics.md, "Low-latency mode").

A buffer built with ``low_latency_max_tokens=S_ll`` (> 0) exchanges up to S_ll tokens per rank
through fixed per-expert regions of its workspace: one kernel per direction, no host
synchronisation, no count exchange before rows move, every call capturable in a CUDA graph.

    recv = buffer.low_latency_dispatch(x, topk_idx, weights)      # recv.x [E_l, R*S_ll, H]
    out = buffer.low_latency_combine_input()                       # [E_l, R*S_ll, H] bf16
    ... expert GEMMs over the first recv.counts[e] rows of each expert, written into out ...
    y = buffer.low_latency_combine(out, recv.handle, weights=recv.weights).x   # [S, H]

Rules, on every rank: dispatches (routing or cached) and combine_backward alternate with
combines; the dispatch's outputs are views into the workspace (valid until this rank's LL
combine of the next round; clone what must live longer); after any LL error the buffer's LL
mode raises. This module adds the calls to ``epx.Buffer`` and the autograd functions that
``epx.functional`` exports.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch

from . import _C
from .buffer import Buffer
from ._tensors import describe, error, from_c, split_fp8, stream_of


class LowLatencyHandle:
    """What an LL dispatch returns to its combine, combine_backward and cached dispatches."""

    def __init__(self, c_handle):
        self._c = c_handle
        self._tensors = {}

    def _tensor(self, name):
        if name not in self._tensors:
            self._tensors[name] = from_c(getattr(self._c, name))
        return self._tensors[name]

    num_tokens = property(lambda self: self._c.num_tokens, doc="S: tokens this rank sent")
    topk_idx = property(lambda self: self._tensor("topk_idx"), doc="[S, K] int32 routing")
    slots = property(lambda self: self._tensor("slots"),
                     doc="[S, K] int32: the row (t, k) took in its expert's region, -1 if masked")
    counts = property(lambda self: self._tensor("counts"),
                      doc="[E_l] int32: rows this rank received per local expert")

    def __repr__(self):
        return f"epx.LowLatencyHandle(rank={self._c.rank}, tokens={self.num_tokens})"


class LowLatencyDispatchResult(NamedTuple):
    """Views into the workspace: x [E_l, R*S_ll, H] (fp8: a (data, scales) tuple); weights,
    aux [E_l, R*S_ll] fp32 (0 past the counts) or None; src_info [E_l, R*S_ll] int32 ((source *
    S_ll + t) * K + k, -1 past the counts); counts [E_l] int32."""

    x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
    weights: Optional[torch.Tensor]
    aux: Optional[torch.Tensor]
    src_info: torch.Tensor
    counts: torch.Tensor
    handle: LowLatencyHandle


class LowLatencyCombineResult(NamedTuple):
    """x: [S, H] bf16; scalars: [S, K] fp32 when scalars were given, else None."""

    x: torch.Tensor
    scalars: Optional[torch.Tensor]


def _check_handle(handle):
    if not isinstance(handle, LowLatencyHandle):
        raise error(f"handle must be an epx.LowLatencyHandle, got {type(handle).__name__}",
                    _C.ErrorCode.HANDLE_MISMATCH)


def low_latency_dispatch(self, x, topk_idx=None, weights=None, aux=None, *, handle=None,
                         return_hook=False) -> LowLatencyDispatchResult:
    """Sends each (token, k) to its expert's region on the expert's rank.

    x: [S, H] bf16 (S <= low_latency_max_tokens), or a tuple (fp8 data, scales [S, H/128]) on an
    fp8 buffer. topk_idx: [S, K] int64/int32 in [-1, E). weights, aux: [S, K] fp32. With
    `handle` (cached dispatch) topk_idx must be omitted: the rows land where the handle's did.
    With return_hook the call returns once the rows are sent; low_latency_wait() completes it.
    """
    stream = stream_of(self._device)
    with self._collective_checks(stream, low_latency=True):
        data, scales = split_fp8(x)
        if handle is not None:
            _check_handle(handle)
            if topk_idx is not None:
                raise error("cached low_latency_dispatch takes its routing from the handle: "
                            "omit topk_idx")
        elif topk_idx is None:
            raise error("low_latency_dispatch needs topk_idx (or a handle)")
        args = (describe(data, "x"), describe(scales, "x scales"), describe(topk_idx, "topk_idx"),
                describe(weights, "weights"), describe(aux, "aux"))
    out = self._c.low_latency_dispatch(*args, None if handle is None else handle._c,
                                       bool(return_hook), stream)
    views = self._workspace_views
    recv_x = from_c(out["x"], views)
    if scales is not None:
        recv_x = (recv_x, from_c(out["x_scales"], views))
    result_handle = handle if handle is not None else LowLatencyHandle(out["handle"])
    return LowLatencyDispatchResult(recv_x, from_c(out["weights"], views),
                                    from_c(out["aux"], views), from_c(out["src_info"], views),
                                    from_c(out["counts"], views), result_handle)


def low_latency_combine(self, x, handle, *, weights=None, scalars=None,
                        return_hook=False) -> LowLatencyCombineResult:
    """Brings every row back to its source: y[t] = sum over k of w_row * x_row (plain sum
    without weights), fp32, one rounding to bf16.

    x: [E_l, R*S_ll, H] bf16, row for row as the dispatch delivered them (low_latency_combine_input()
    itself: nothing is copied). weights, scalars: [E_l, R*S_ll] fp32 (the dispatch's own weights
    view: read where it is). Returns y [S, H] and scalars [S, K] (0 where topk_idx is -1).
    """
    stream = stream_of(self._device)
    with self._collective_checks(stream, low_latency=True):
        _check_handle(handle)
        args = (describe(x, "x"), describe(weights, "weights"), describe(scalars, "scalars"))
    y, combined = self._c.low_latency_combine(*args, handle._c, bool(return_hook), stream)
    return LowLatencyCombineResult(from_c(y), from_c(combined))


def low_latency_combine_backward(self, grad_y, handle, *, x,
                                 weights) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of y = low_latency_combine(x, handle, weights=weights): (grad_x [E_l, R*S_ll, H]
    bf16 = bf16(w_row * grad_y[t]), grad_weights [E_l, R*S_ll] fp32 = dot(grad_y[t], x_row)), 0
    past the counts. Starts a round like a dispatch: an LL combine must follow."""
    stream = stream_of(self._device)
    with self._collective_checks(stream, low_latency=True):
        _check_handle(handle)
        args = (describe(grad_y, "grad_y"), handle._c, describe(x, "x"),
                describe(weights, "weights"))
    grad_x, grad_weights = self._c.low_latency_combine_backward(*args, stream)
    return from_c(grad_x), from_c(grad_weights)


def low_latency_wait(self):
    """The wait of the last LL call made with return_hook (a combine's reduction too)."""
    self._c.low_latency_wait(stream_of(self._device))


def low_latency_combine_input(self) -> torch.Tensor:
    """[E_l, R*S_ll, H] bf16, a view of this rank's combine region: expert outputs written here
    (after the round's dispatch completed) are combined without a copy."""
    return from_c(self._c.low_latency_combine_input(), self._workspace_views)


for _method in (low_latency_dispatch, low_latency_combine, low_latency_combine_backward,
                low_latency_wait, low_latency_combine_input):
    setattr(Buffer, _method.__name__, _method)


# -- autograd -----------------------------------------------------------------------------------
# forward                                  backward
# recv = dispatch(x, idx, w)               dx, dw = combine(d_recv_x, handle, scalars=d_recv_w)
# y = combine(h, handle, weights=w_rows)   dh, dw_rows = combine_backward(dy, handle, x=h,
#                                                                         weights=w_rows)
# The backward of a combine starts a round (combine_backward moves rows the dispatch way); the
# dispatch's backward, a combine, ends it. When the dispatch has no backward (nothing it got
# requires grad), the combine's backward ends the round itself with a combine whose result is
# dropped, so that the calls keep alternating. As in epx.functional's dispatch, an empty `link`
# output of the dispatch goes into the combine's node, so that both backwards run on every rank
# whose dispatch input requires grad (they are collectives).


def _grad_or_zeros(grad, shape, dtype, device):
    if grad is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    return grad.to(dtype).contiguous()


class _LowLatencyDispatch(torch.autograd.Function):
    """Outputs recv_x, [recv_weights,] link (see above)."""

    @staticmethod
    def forward(ctx, x, weights, buffer, topk_idx, handle_out):
        result = buffer.low_latency_dispatch(x.detach(), topk_idx,
                                             None if weights is None else weights.detach())
        ctx.buffer = buffer
        # The C++ handle, not the Python one, which holds `link`, whose node holds this context.
        ctx.handle_c = result.handle._c
        ctx.has_weights = weights is not None
        ctx.recv_shape = result.x.shape
        needs_grad = any(ctx.needs_input_grad[:2])
        handle_out.append(result.handle)
        # With gradients, copies: the workspace views are overwritten by later rounds, while
        # autograd may keep them (for the experts' backward) much longer.
        recv_x = result.x.clone() if needs_grad else result.x
        link = torch.empty(0, device=recv_x.device)
        if weights is None:
            return recv_x, link
        return recv_x, result.weights.clone() if needs_grad else result.weights, link

    @staticmethod
    def backward(ctx, grad_recv_x, *grads):
        grad_recv_weights = grads[0] if ctx.has_weights else None
        buffer = ctx.buffer
        grad_recv_x = _grad_or_zeros(grad_recv_x, ctx.recv_shape, torch.bfloat16, buffer.device)
        scalars = None
        if ctx.has_weights:  # always sent with weights, so every rank passes the same channels
            scalars = _grad_or_zeros(grad_recv_weights, ctx.recv_shape[:2], torch.float32,
                                     buffer.device)
        result = buffer.low_latency_combine(grad_recv_x, LowLatencyHandle(ctx.handle_c),
                                            scalars=scalars)
        grad_x = result.x if ctx.needs_input_grad[0] else None
        grad_weights = result.scalars if ctx.has_weights and ctx.needs_input_grad[1] else None
        return grad_x, grad_weights, None, None, None


class _LowLatencyCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, link, buffer, handle):
        result = buffer.low_latency_combine(x.detach(), handle,
                                            weights=None if weights is None else weights.detach())
        ctx.buffer, ctx.handle, ctx.link = buffer, handle, link
        ctx.has_weights = weights is not None
        # Kept for the backward as copies: the combine region and the dispatch's views are
        # overwritten by later rounds.
        if any(ctx.needs_input_grad[:3]):
            ctx.x = x.detach().clone()
            ctx.weights = (torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
                           if weights is None else weights.detach().clone())
        ctx.y_shape = result.x.shape
        return result.x

    @staticmethod
    def backward(ctx, grad_y):
        buffer, handle = ctx.buffer, ctx.handle
        grad_y = _grad_or_zeros(grad_y, ctx.y_shape, torch.bfloat16, buffer.device)
        grad_x, grad_weights = buffer.low_latency_combine_backward(grad_y, handle, x=ctx.x,
                                                                   weights=ctx.weights)
        if ctx.link is None:  # the dispatch has no backward to end the round
            buffer.low_latency_combine(buffer.low_latency_combine_input(), handle)
        return (grad_x if ctx.needs_input_grad[0] else None,
                grad_weights if ctx.has_weights and ctx.needs_input_grad[1] else None,
                None if ctx.link is None else torch.zeros_like(ctx.link), None, None)


def functional_dispatch(buffer: Buffer, x: torch.Tensor, topk_idx: torch.Tensor,
                        weights: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], LowLatencyHandle]:
    """Differentiable LL dispatch: (recv_x [E_l, R*S_ll, H], recv_weights [E_l, R*S_ll] or None,
    handle). When x or weights requires grad, recv_x and recv_weights are copies of the
    workspace views (autograd may keep them past the rounds that overwrite the views: E_l *
    R*S_ll rows copied), else the views themselves; rows past handle.counts are unspecified in
    recv_x, 0 in recv_weights. The backward combines the gradients home."""
    handle_out = []
    if weights is None:
        recv_x, link = _LowLatencyDispatch.apply(x, None, buffer, topk_idx, handle_out)
        recv_weights = None
    else:
        recv_x, recv_weights, link = _LowLatencyDispatch.apply(x, weights, buffer, topk_idx,
                                                               handle_out)
    handle = handle_out[0]
    if link.requires_grad:
        handle._autograd_link = link
    return recv_x, recv_weights, handle


def functional_combine(buffer: Buffer, x: torch.Tensor, handle: LowLatencyHandle,
                       weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Differentiable LL combine: y [S, H] bf16 = sum over k of w_row * x_row; x and weights
    [E_l, R*S_ll(, H)] (weights typically the dispatch's recv_weights), differentiable."""
    return _LowLatencyCombine.apply(x, weights, getattr(handle, "_autograd_link", None), buffer,
                                    handle)
