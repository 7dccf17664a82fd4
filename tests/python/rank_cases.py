"""Code that runs on every rank (through ranks.RankPool): each function takes the rank's
context, runs collective epx operations and checks this rank's outputs against the oracle
(reference.py), computed from every rank's inputs, which every rank regenerates from the seed.
"""

import math

import torch
import torch.distributed as dist

import epx
import epx.functional as F
from reference import (combine_backward_outputs, combine_output, dispatch_outputs,
                       receive_layout)


def make_inputs(seed, world, max_tokens, hidden, num_experts, num_topk, *, empty_rank=None,
                mask_fraction=0.15, one_rank_experts=False):
    """Every rank's x [S_r, H] bf16, topk_idx [S_r, K] (with -1 and repeated experts), weights
    and aux [S_r, K] fp32; S_r varies, 0 on `empty_rank`."""
    g = torch.Generator().manual_seed(seed)
    local = num_experts // world
    xs, topks, weights, auxs = [], [], [], []
    for r in range(world):
        tokens = 0 if r == empty_rank else int(torch.randint(1, max_tokens + 1, (1,), generator=g))
        xs.append(torch.randn(tokens, hidden, generator=g).bfloat16())
        high = local if one_rank_experts else num_experts
        topk = torch.randint(0, high, (tokens, num_topk), generator=g)
        topk[torch.rand(tokens, num_topk, generator=g) < mask_fraction] = -1
        topks.append(topk)
        weights.append(torch.rand(tokens, num_topk, generator=g))
        auxs.append(torch.randn(tokens, num_topk, generator=g))
    return xs, topks, weights, auxs


def _same(actual, expected, what):
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: differs at {bad} (of {actual.numel()} elements)")


SIZES = dict(max_tokens=20, hidden=64, num_topk=3)


def _setup(ctx, seed, local_experts=3, **input_options):
    num_experts = local_experts * ctx.world
    inputs = make_inputs(seed, ctx.world, SIZES["max_tokens"], SIZES["hidden"], num_experts,
                         SIZES["num_topk"], **input_options)
    buffer = ctx.buffer(max_tokens_per_rank=SIZES["max_tokens"], hidden=SIZES["hidden"],
                        num_experts=num_experts, num_topk=SIZES["num_topk"])
    return buffer, num_experts, inputs


def dispatch_case(ctx, seed, expand, alignment, idx_dtype="int64", zero_padding=True,
                  **input_options):
    """dispatch (and its cached replay) against the oracle, row for row and bit for bit."""
    buffer, num_experts, (xs, topks, ws, auxs) = _setup(ctx, seed, **input_options)
    rank, dev = ctx.rank, ctx.device
    result = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev, getattr(torch, idx_dtype)),
                             ws[rank].to(dev), auxs[rank].to(dev), expand=expand,
                             expert_alignment=alignment, zero_padding=zero_padding)
    layout = receive_layout(topks, rank, num_experts, alignment)
    want_x, want_w, want_aux = dispatch_outputs(layout, xs, ws, auxs, expand)
    handle = result.handle
    assert handle.expand == expand and handle.counts_synced
    assert handle.num_tokens == xs[rank].shape[0]
    assert handle.num_recv_tokens == layout.num_recv
    assert handle.num_rows == (layout.num_rows if expand else layout.num_recv)
    assert handle.tokens_per_expert == layout.tokens_per_expert
    assert handle.host_expert_offsets == layout.expert_offsets
    _same(handle.expert_offsets, torch.tensor(layout.expert_offsets, dtype=torch.int32),
          "expert_offsets")
    _same(handle.src_token,
          torch.tensor([s * SIZES["max_tokens"] + t for s, t in layout.tokens], dtype=torch.int32),
          "src_token")
    _same(handle.expanded_rows, layout.expanded_rows, "expanded_rows")
    if expand:
        assert result.topk_idx is None and handle.recv_topk_idx is None
        real = torch.tensor([owner is not None for owner in layout.row_owner], dtype=torch.bool)
        got_x = result.x.cpu()
        if not zero_padding:  # padding rows are unspecified: compare the real rows only
            got_x = torch.where(real.unsqueeze(1), got_x, torch.zeros((), dtype=got_x.dtype))
        _same(got_x, want_x, "recv_x")
    else:
        _same(result.topk_idx, layout.recv_topk, "recv topk_idx")
        _same(handle.recv_topk_idx, layout.recv_topk, "handle.recv_topk_idx")
        _same(result.x, want_x, "recv_x")
    _same(result.weights, want_w, "recv weights")
    _same(result.aux, want_aux, "recv aux")

    # Cached dispatch replays the layout row for row, with new scalars.
    new_w = ws[rank].to(dev) * 2
    cached = buffer.dispatch(xs[rank].to(dev), weights=new_w, handle=handle)
    assert cached.handle is handle
    if zero_padding or not expand:
        _same(cached.x, result.x, "cached recv_x")
    _same(cached.weights, want_w * 2, "cached recv weights")
    assert cached.aux is None
    return layout.num_recv


def _expert_side_rows(seed, layouts, hidden, num_topk, expand):
    """Every rank's expert outputs (bf16 rows), per-row weights and scalars, from the seed."""
    g = torch.Generator().manual_seed(seed + 1000)
    xs, ws, scalars = [], [], []
    for layout in layouts:
        rows = layout.num_rows if expand else layout.num_recv
        xs.append(torch.randn(rows, hidden, generator=g).bfloat16())
        ws.append(torch.rand(rows, generator=g) * 2 - 0.5)
        shape = (rows,) if expand else (rows, num_topk)
        scalars.append(torch.randn(shape, generator=g))
    return xs, ws, scalars


def combine_case(ctx, seed, expand, alignment, **input_options):
    """combine in every mode (weighted or not, reduced at expert or source, scalars, one or
    two biases) against the oracle, bit for bit."""
    buffer, num_experts, (xs, topks, ws, auxs) = _setup(ctx, seed, **input_options)
    rank, dev = ctx.rank, ctx.device
    handle = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                             expand=expand, expert_alignment=alignment).handle
    layouts = [receive_layout(topks, r, num_experts, alignment) for r in range(ctx.world)]
    h_rows, w_rows, s_rows = _expert_side_rows(seed, layouts, SIZES["hidden"], SIZES["num_topk"],
                                               expand)
    g = torch.Generator().manual_seed(seed + 2000)
    biases = [[torch.randn(x.shape, generator=g).bfloat16() for _ in range(2)] for x in xs]
    if expand:
        modes = [(True, "expert", 1), (False, "expert", 0), (True, "source", 2),
                 (False, "source", 1)]
    else:
        modes = [(False, "expert", 2), (False, "expert", 0)]
    for weighted, reduce_at, num_bias in modes:
        what = f"combine(weighted={weighted}, reduce_at={reduce_at}, bias={num_bias})"
        bias = tuple(b.to(dev) for b in biases[rank][:num_bias])
        out = buffer.combine(h_rows[rank].to(dev), handle,
                             weights=w_rows[rank].to(dev) if weighted else None,
                             scalars=s_rows[rank].to(dev),
                             bias=bias if num_bias != 1 else bias[0], reduce_at=reduce_at)
        want_y, want_s = combine_output(rank, topks, layouts, h_rows,
                                        w_rows if weighted else None, s_rows,
                                        bias=biases[rank][:num_bias], expand=expand,
                                        reduce_at=reduce_at, num_experts=num_experts)
        _same(out.x, want_y, what + " y")
        _same(out.scalars, want_s, what + " scalars")
    out = buffer.combine(h_rows[rank].to(dev), handle)
    assert out.scalars is None
    return True


def combine_backward_case(ctx, seed, alignment, **input_options):
    """The fused backward: grad_x = bf16(w * g) exactly, grad_w = dot(g, x) within 1e-5."""
    buffer, num_experts, (xs, topks, ws, auxs) = _setup(ctx, seed, **input_options)
    rank, dev = ctx.rank, ctx.device
    handle = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                             expand=True, expert_alignment=alignment).handle
    layouts = [receive_layout(topks, r, num_experts, alignment) for r in range(ctx.world)]
    h_rows, w_rows, _ = _expert_side_rows(seed, layouts, SIZES["hidden"], SIZES["num_topk"], True)
    g = torch.Generator().manual_seed(seed + 3000)
    grad_y = [torch.randn(x.shape, generator=g).bfloat16() for x in xs]
    grad_x, grad_w = buffer.combine_backward(grad_y[rank].to(dev), handle,
                                             x=h_rows[rank].to(dev), weights=w_rows[rank].to(dev))
    want_x, want_w = combine_backward_outputs(layouts[rank], grad_y, h_rows[rank], w_rows[rank])
    _same(grad_x, want_x, "grad_x")
    assert grad_w.dtype == torch.float32 and grad_w.shape == want_w.shape
    # Tolerance of docs/semantics.md: 1e-5 of sum |g| |x| for each row.
    bound = torch.zeros_like(want_w)
    for row, owner in enumerate(layouts[rank].row_owner):
        if owner is not None:
            s, t = layouts[rank].tokens[owner[0]]
            bound[row] = (grad_y[s][t].double().abs() * h_rows[rank][row].double().abs()).sum()
    error = (grad_w.cpu().double() - want_w).abs()
    assert bool((error <= 1e-5 * bound + 1e-30).all()), f"grad_weights error {error.max()}"
    return True


def fp8_case(ctx, seed, expand):
    """fp8 rows (data + per-128 scales) travel unchanged; a bf16 cached dispatch on the same
    buffer (what a backward pass sends) works too."""
    hidden, max_tokens, num_topk = 256, 12, 2
    num_experts = 2 * ctx.world
    xs, topks, ws, _ = make_inputs(seed, ctx.world, max_tokens, hidden, num_experts, num_topk)
    g = torch.Generator().manual_seed(seed + 4000)
    data = [torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8) for x in xs]
    scales = [torch.rand(x.shape[0], hidden // 128, generator=g) for x in xs]
    buffer = ctx.buffer(max_tokens_per_rank=max_tokens, hidden=hidden, num_experts=num_experts,
                        num_topk=num_topk, fp8_dispatch=True)
    rank, dev = ctx.rank, ctx.device
    result = buffer.dispatch((data[rank].to(dev), scales[rank].to(dev)), topks[rank].to(dev),
                             ws[rank].to(dev), expand=expand, expert_alignment=4,
                             zero_padding=True)
    recv_data, recv_scales = result.x
    layout = receive_layout(topks, rank, num_experts, 4)
    want_data, want_w, _ = dispatch_outputs(layout, data, ws, None, expand)
    want_scales, _, _ = dispatch_outputs(layout, scales, None, None, expand)
    _same(recv_data.view(torch.uint8), want_data, "fp8 data")
    _same(recv_scales, want_scales, "fp8 scales")
    _same(result.weights, want_w, "weights")
    cached = buffer.dispatch(xs[rank].to(dev), handle=result.handle)
    want_x, _, _ = dispatch_outputs(layout, xs, None, None, expand)
    _same(cached.x, want_x, "bf16 cached dispatch on an fp8 buffer")
    return True


def unsynced_case(ctx, seed, expand, alignment):
    """sync_counts=False: worst-case outputs, counts on the device, same rows in the same
    places, and the same combine result."""
    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    local, k = num_experts // ctx.world, SIZES["num_topk"]
    synced = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                             expand=expand, expert_alignment=alignment, zero_padding=True)
    lazy = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                           expand=expand, expert_alignment=alignment, zero_padding=True,
                           sync_counts=False)
    handle = lazy.handle
    assert not handle.counts_synced
    assert handle.num_recv_tokens is None and handle.num_rows is None
    assert handle.tokens_per_expert is None
    worst = ctx.world * SIZES["max_tokens"]
    if expand:
        worst = worst * k + local * (alignment - 1)  # K rows: duplicates count
    assert lazy.x.shape[0] == worst, (lazy.x.shape, worst)
    n, m = synced.handle.num_recv_tokens, synced.handle.num_rows
    _same(handle.device_counts, torch.tensor([n, m], dtype=torch.int64), "device_counts")
    _same(lazy.x[:m], synced.x, "recv_x rows")
    _same(lazy.weights[:m], synced.weights, "recv weights")
    _same(handle.src_token[:n], synced.handle.src_token, "src_token")
    h = torch.randn(lazy.x.shape, generator=torch.Generator().manual_seed(seed + rank))
    h = h.bfloat16().to(dev)
    kwargs = dict(weights=lazy.weights) if expand else {}
    y_lazy = buffer.combine(h, handle, **kwargs).x
    kwargs = dict(weights=synced.weights) if expand else {}
    y_synced = buffer.combine(h[:m].contiguous(), synced.handle, **kwargs).x
    _same(y_lazy, y_synced.cpu(), "combine y")
    return True


def _expect_error(code, function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except epx.EpxError as error:
        assert isinstance(error, RuntimeError)
        assert error.code == code, f"expected {code}, got {error.code}: {error}"
        return str(error)
    raise AssertionError(f"expected epx.EpxError({code}), nothing was raised")


def errors_case(ctx, seed):
    """Bad input raises epx.EpxError with the right code on every rank and leaves the buffer
    usable."""
    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    x, topk, w = xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev)
    Code = epx.ErrorCode
    # Checks every rank makes locally (all ranks pass the same bad input).
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, x.float(), topk, w)
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, x, topk.float(), w)
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, x, topk, w.double())
    too_many = torch.zeros(SIZES["max_tokens"] + 1, SIZES["hidden"], dtype=torch.bfloat16,
                           device=dev)
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, too_many,
                  torch.zeros(too_many.shape[0], SIZES["num_topk"], dtype=torch.int64, device=dev))
    strided = torch.zeros(SIZES["hidden"], 4, dtype=torch.bfloat16, device=dev).t()
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, strided,
                  torch.zeros(4, SIZES["num_topk"], dtype=torch.int64, device=dev))
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, "not a tensor", topk, w)
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, x)
    _expect_error(Code.INVALID_ARGUMENT, buffer.combine, x, buffer.dispatch(x, topk, w).handle,
                  reduce_at="nowhere")
    compact = buffer.dispatch(x, topk, w).handle
    rows = torch.zeros(compact.num_recv_tokens, SIZES["hidden"], dtype=torch.bfloat16, device=dev)
    _expect_error(Code.INVALID_ARGUMENT, buffer.combine, rows, compact,
                  weights=torch.zeros(compact.num_recv_tokens, device=dev))
    _expect_error(Code.INVALID_ARGUMENT, buffer.combine, rows[1:], compact)
    _expect_error(Code.HANDLE_MISMATCH, buffer.combine_backward, x, compact, x=rows,
                  weights=torch.zeros(rows.shape[0], device=dev))
    _expect_error(Code.HANDLE_MISMATCH, buffer.combine, rows, "not a handle")
    other = ctx.buffer(max_tokens_per_rank=SIZES["max_tokens"], hidden=SIZES["hidden"],
                       num_experts=num_experts, num_topk=SIZES["num_topk"])
    _expect_error(Code.HANDLE_MISMATCH, other.combine, rows, compact)
    _expect_error(Code.INVALID_ARGUMENT, buffer.dispatch, x, topk, handle=compact)
    # A routing error on one rank is found on the data and raised on every rank.
    bad = topk.clone()
    if rank == ctx.world - 1:
        bad = torch.full((max(topk.shape[0], 1), SIZES["num_topk"]), num_experts,
                         dtype=torch.int64, device=dev)
        x_bad = torch.zeros(bad.shape[0], SIZES["hidden"], dtype=torch.bfloat16, device=dev)
        w_bad = torch.zeros(bad.shape, device=dev)
    else:
        x_bad, w_bad = x, w
    message = _expect_error(Code.INVALID_ROUTING, buffer.dispatch, x_bad, bad, w_bad)
    assert f"rank {ctx.world - 1}" in message, message
    # Still usable, and right.
    result = buffer.dispatch(x, topk, w)
    layout = receive_layout(topks, rank, num_experts, 1)
    want_x, _, _ = dispatch_outputs(layout, xs, None, None, False)
    _same(result.x, want_x, "recv_x after errors")
    return True


# -- gradients ----------------------------------------------------------------------------------

def _expert(x_rows, weight):
    return torch.tanh(x_rows.float() @ weight)


def _dense_layer(x_all, router, experts, topk_all, mask_all, grad_out_all, aux_all=None):
    """The same MoE layer on one device, fp64: router linear -> softmax -> top-k weights ->
    experts -> weighted sum, each term scaled by (1 + aux[t, k]) when aux is given. Returns the
    gradients of x (per rank), the top-k weights (per rank), the router, the experts and aux
    (per rank, or None)."""
    sizes = [x.shape[0] for x in x_all]
    x = torch.cat(x_all).double().requires_grad_()
    router = router.double().requires_grad_()
    experts = experts.double().requires_grad_()
    topk, mask = torch.cat(topk_all), torch.cat(mask_all)
    probs = torch.softmax(x @ router, dim=-1)
    weights = probs.gather(1, topk.clamp(min=0)).masked_fill(mask, 0.0)
    weights.retain_grad()
    chosen = experts[topk.clamp(min=0)]  # [S, K, H, H]
    out = torch.tanh(torch.einsum("sh,skhj->skj", x, chosen))
    scale = weights
    if aux_all is not None:
        aux = torch.cat(aux_all).double().requires_grad_()
        scale = weights * (1 + aux)
    y = (scale.unsqueeze(-1) * out).masked_fill(mask.unsqueeze(-1), 0.0).sum(1)
    (y * torch.cat(grad_out_all).double()).sum().backward()
    aux_grads = None if aux_all is None else list(aux.grad.split(sizes))
    return (list(x.grad.split(sizes)), list(weights.grad.split(sizes)), router.grad,
            experts.grad, aux_grads)


def _routing(x, router, num_topk, mask):
    """Top-k choice, made in fp32 on the CPU so that every rank and the dense layer agree."""
    probs = torch.softmax(x.detach().cpu().float() @ router.detach().cpu(), dim=-1)
    topk = probs.topk(num_topk, dim=-1).indices
    return topk.masked_fill(mask, -1)


def _relative_error(actual, expected):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    return float((actual - expected).norm() / expected.norm().clamp(min=1e-30))


def _low_latency_layer(buffer, x, topk, weights, local_weights):
    """The layer's exchange and experts through epx.functional's LL functions: each expert runs
    on every row of its region [R*S_ll, H] and keeps its first counts[e] (the real rows)."""
    recv_x, recv_w, handle = F.low_latency_dispatch(buffer, x, topk, weights)
    real = (torch.arange(recv_x.shape[1], device=x.device).unsqueeze(0) <
            handle.counts.to(x.device).long().unsqueeze(1))  # [E_l, R*S_ll]
    h = torch.stack([_expert(recv_x[e], w) for e, w in enumerate(local_weights)])
    h = torch.where(real.unsqueeze(-1), h, torch.zeros((), device=x.device)).bfloat16()
    return F.low_latency_combine(buffer, h, handle, recv_w)


def _expanded_experts(recv_x, handle, expert_weights, first):
    """Each local expert on its rows of an expanded dispatch: by the host offsets when the
    counts were synced, else by handle.local_expert_idx (no host synchronisation)."""
    offsets = handle.host_expert_offsets
    if offsets is not None:
        return torch.cat([_expert(recv_x[offsets[e]:offsets[e + 1]], expert_weights[first + e])
                          for e in range(handle.local_experts)])
    expert_idx = handle.local_expert_idx.unsqueeze(1)
    out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for e in range(handle.local_experts):
        out = torch.where(expert_idx == e, _expert(recv_x, expert_weights[first + e]), out)
    return out


def moe_grad_case(ctx, seed, expand=False, alignment=1, steps=1, empty_rank=None,
                  mask_fraction=0.0, local_experts=2, num_topk=2, hidden=32, max_tokens=24,
                  with_aux=False, sync_counts=True, low_latency=False):
    """An expert-parallel MoE layer through epx.functional against the dense layer: gradients
    of the input, the top-k weights, the router, the experts and (with_aux: each term scaled by
    1 + aux[t, k], aux a leaf tensor) aux, over `steps` steps reusing one buffer, with the
    counts synced or kept on the device. Returns per step the norms and relative errors. With
    `low_latency` through the LL functions (_low_latency_layer)."""
    world, rank, dev = ctx.world, ctx.rank, ctx.device
    num_experts = local_experts * world
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(hidden, num_experts, generator=g) * 0.5
    experts = torch.randn(num_experts, hidden, hidden, generator=g) / math.sqrt(hidden)
    sizes = (dict(max_tokens_per_rank=1, low_latency_max_tokens=max_tokens) if low_latency
             else dict(max_tokens_per_rank=max_tokens))
    buffer = ctx.buffer(hidden=hidden, num_experts=num_experts, num_topk=num_topk, **sizes)
    report = []
    for step in range(steps):
        sizes = [0 if r == empty_rank else int(torch.randint(1, max_tokens + 1, (1,), generator=g))
                 for r in range(world)]
        x_all = [torch.randn(s, hidden, generator=g).bfloat16() for s in sizes]
        grad_out_all = [torch.randn(s, hidden, generator=g) for s in sizes]
        mask_all = [torch.rand(s, num_topk, generator=g) < mask_fraction for s in sizes]
        aux_all = [torch.rand(s, num_topk, generator=g) for s in sizes] if with_aux else None
        topk_all = [_routing(x, router, num_topk, m) for x, m in zip(x_all, mask_all)]

        # This rank's half: epx dispatch -> local experts -> epx combine.
        x = x_all[rank].to(dev, copy=True).requires_grad_()
        router_p = router.clone().to(dev).requires_grad_()
        experts_p = experts.clone().to(dev).requires_grad_()
        topk = topk_all[rank].to(dev)
        probs = torch.softmax(x.float() @ router_p, dim=-1)
        weights = probs.gather(1, topk.clamp(min=0)).masked_fill(mask_all[rank].to(dev), 0.0)
        weights.retain_grad()
        first = rank * local_experts
        if low_latency:
            y = _low_latency_layer(buffer, x, topk, weights, experts_p[first:first + local_experts])
        else:
            options = dict(expand=expand, expert_alignment=alignment, sync_counts=sync_counts)
            if with_aux:
                aux = aux_all[rank].to(dev, copy=True).requires_grad_()
                recv_x, recv_w, recv_aux, handle = F.dispatch(buffer, x, topk, weights, aux,
                                                              **options)
            else:
                recv_x, recv_w, handle = F.dispatch(buffer, x, topk, weights, **options)
            if expand:
                h = _expanded_experts(recv_x, handle, experts_p, first)
                if with_aux:
                    h = h * (1 + recv_aux).unsqueeze(1)
                y = F.combine(buffer, h.bfloat16(), handle, recv_w)
            else:
                local_k = handle.recv_topk_idx.long()
                scale = recv_w * (1 + recv_aux) if with_aux else recv_w
                acc = torch.zeros(recv_x.shape, dtype=torch.float32, device=dev)
                for e in range(local_experts):
                    coefficient = (scale * (local_k == e)).sum(1, keepdim=True)
                    acc = acc + coefficient * _expert(recv_x, experts_p[first + e])
                y = F.combine(buffer, acc.bfloat16(), handle)
        assert y.shape == x.shape and y.dtype == torch.bfloat16
        (y.float() * grad_out_all[rank].to(dev)).sum().backward()

        # A missing gradient (None) counts as zero, so that the comparison says what is wrong.
        router_grad, experts_grad, weights_grad = (
            torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for p in (router_p, experts_p, weights))
        dist.all_reduce(router_grad)
        dist.all_reduce(experts_grad)
        want_x, want_w, want_router, want_experts, want_aux = _dense_layer(
            x_all, router, experts, topk_all, mask_all, grad_out_all, aux_all)
        entry = dict(
            tokens=sizes[rank],
            router_norm=float(router_grad.norm()),
            want_router_norm=float(want_router.norm()),
            weights_norm=float(weights_grad.norm()),
            router=_relative_error(router_grad, want_router),
            experts=_relative_error(experts_grad, want_experts),
        )
        if sizes[rank] > 0:
            x_grad = torch.zeros_like(x) if x.grad is None else x.grad
            entry["x"] = _relative_error(x_grad, want_x[rank])
            entry["weights"] = _relative_error(weights_grad, want_w[rank])
            if with_aux:
                aux_grad = torch.zeros_like(aux) if aux.grad is None else aux.grad
                entry["aux"] = _relative_error(aux_grad, want_aux[rank])
                entry["aux_norm"] = float(aux_grad.norm())
        report.append(entry)

        # The same SGD step on both sides, then the next step reuses the buffer.
        router = router - 0.1 * want_router.float()
        experts = experts - 0.1 * want_experts.float()
    return report


def autograd_edges_case(ctx, seed):
    """Backward with a non-contiguous output gradient, an unused output (recv_weights: its
    gradient arrives as None), an unweighted expanded combine (cached-dispatch backward) and
    unzeroed padding rows (their gradient must still be zero)."""
    rank, dev = ctx.rank, ctx.device
    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed, mask_fraction=0.2)
    x = xs[rank].to(dev, copy=True).requires_grad_()
    w = ws[rank].to(dev, copy=True).requires_grad_()
    recv_x, recv_w, handle = F.dispatch(buffer, x, topks[rank].to(dev), w, expand=True,
                                        expert_alignment=4, zero_padding=False)
    recv_x.retain_grad()
    y = F.combine(buffer, recv_x * 2, handle)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + rank)).bfloat16()
    (y.float().t() * g.float().to(dev).t()).sum().backward()  # dy arrives transposed
    # dx[t] = 2 * (number of k with an expert) * g[t], each rank's partial sum rounded once.
    valid = (topks[rank] >= 0).sum(1, keepdim=True).float()
    want = (2 * valid * g.float())
    assert _relative_error(x.grad, want) < 1e-2, _relative_error(x.grad, want)
    assert w.grad is None or not bool(w.grad.any())
    layout = receive_layout(topks, rank, num_experts, 4)
    padding = torch.tensor([owner is None for owner in layout.row_owner], dtype=torch.bool)
    assert not bool(recv_x.grad.cpu()[padding].any()), "padding rows got a gradient"
    return int(padding.sum())


def sm_budget_case(ctx, seed):
    """Buffer.num_sms: the blocks per kernel of the CUDA transport (num_sms, else the library
    default min(24, SMs)); 0 on the host transport, which runs no kernels."""
    sizes = dict(max_tokens_per_rank=4, hidden=SIZES["hidden"], num_experts=ctx.world, num_topk=1)
    by_default, chosen = ctx.buffer(**sizes).num_sms, ctx.buffer(num_sms=5, **sizes).num_sms
    if ctx.on_gpu:
        sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count
        assert (by_default, chosen) == (min(24, sms), 5), (by_default, chosen, sms)
    else:
        assert (by_default, chosen) == (0, 0), (by_default, chosen)
    return by_default


def allocation_calls_case(ctx, seed, sync_counts):
    """Each epx call asks PyTorch for its outputs in one allocator callback: the dispatch's x,
    weights and topk_idx together (on the CUDA transport with the handle's arrays, so one
    callback for the whole call, two with sync_counts), the combine's y and scalars together.
    Returns the callbacks of the dispatch, then of the combine, as lists of shapes."""
    import epx.buffer as epx_buffer

    calls = []
    allocate = epx_buffer._allocate

    def counting(requests, *args):
        calls.append([tuple(shape) for _, shape in requests])
        return allocate(requests, *args)

    epx_buffer._allocate = counting  # what the Buffer below hands to the extension
    try:
        buffer, _, (xs, topks, ws, _) = _setup(ctx, seed)
    finally:
        epx_buffer._allocate = allocate
    rank, dev = ctx.rank, ctx.device
    calls.clear()
    result = buffer.dispatch(xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                             sync_counts=sync_counts)
    dispatch_calls = list(calls)
    outputs = [tuple(t.shape) for t in (result.x, result.weights, result.topk_idx)]
    assert any(call[-3:] == outputs for call in dispatch_calls), (outputs, dispatch_calls)
    calls.clear()
    scalars = torch.rand(result.x.shape[0], SIZES["num_topk"], device=dev)
    combined = buffer.combine(result.x, result.handle, scalars=scalars)
    assert calls == [[tuple(combined.x.shape), tuple(combined.scalars.shape)]], calls
    if ctx.on_gpu:
        assert len(dispatch_calls) == (2 if sync_counts else 1), dispatch_calls
    return dispatch_calls


def timeout_case(ctx, seed):
    """A peer that never arrives: the waiting rank raises epx.EpxError(TIMEOUT) naming the
    phase after the buffer's timeout, instead of hanging."""
    buffer = ctx.buffer(max_tokens_per_rank=4, hidden=SIZES["hidden"], num_experts=ctx.world,
                        num_topk=1, timeout_seconds=1.0)
    message = None
    if ctx.rank == 0:
        x = torch.zeros(1, SIZES["hidden"], dtype=torch.bfloat16, device=ctx.device)
        topk = torch.zeros(1, 1, dtype=torch.int64, device=ctx.device)
        message = _expect_error(epx.ErrorCode.TIMEOUT, buffer.dispatch, x, topk)
        assert "dispatch" in message, message
    dist.barrier()  # the other ranks never call dispatch on this buffer
    return message


def one_rank_invalid_case(ctx, seed):
    """Only rank 0 passes an invalid x (fp32). docs/protocol.md: every rank still runs both
    barriers, so rank 0 raises INVALID_ARGUMENT and its peers raise an error too, without
    waiting for the timeout. Returns each rank's error code name."""
    buffer = ctx.buffer(max_tokens_per_rank=4, hidden=SIZES["hidden"], num_experts=ctx.world,
                        num_topk=1, timeout_seconds=3.0)
    dtype = torch.float32 if ctx.rank == 0 else torch.bfloat16
    x = torch.zeros(2, SIZES["hidden"], dtype=dtype, device=ctx.device)
    topk = torch.zeros(2, 1, dtype=torch.int64, device=ctx.device)
    try:
        buffer.dispatch(x, topk)
    except epx.EpxError as error:
        return error.code.name
    return None


# -- collective safety and autograd edge cases --------------------------------------------------

def python_check_on_one_rank_case(ctx, seed):
    """Rank 0 passes arguments that fail the Python layer's own checks (a float alignment, a
    list instead of a tensor); its peers pass valid ones. Every rank raises within a second
    (the check aborts the operation for the peers), and the buffer works afterwards."""
    import time

    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    x, topk, w = xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev)
    timings = []
    for bad in ({"expert_alignment": 4.7}, {"x": [[1.0]]}):
        kwargs = {"expert_alignment": 1, "x": x}
        if rank == 0:
            kwargs.update(bad)
        start = time.monotonic()
        try:
            buffer.dispatch(kwargs.pop("x"), topk, w, expand=True, **kwargs)
        except epx.EpxError as error:
            assert error.code == epx.ErrorCode.INVALID_ARGUMENT, error
            timings.append(time.monotonic() - start)
        else:
            raise AssertionError(f"rank {rank}: no error for {bad}")
    assert max(timings) < 1.0, timings
    layout = receive_layout(topks, rank, num_experts, 1)
    want_x, _, _ = dispatch_outputs(layout, xs, None, None, False)
    _same(buffer.dispatch(x, topk, w).x, want_x, "recv_x after the aborted calls")
    return max(timings)


def mismatch_case(ctx, seed, what):
    """Ranks that disagree about a call all raise INVALID_ARGUMENT naming what differs, and the
    buffer works afterwards (nothing was exchanged, nothing is left half done):
      layout: expand=True on rank 0 only; weights: combine weights on rank 0 only;
      operation: rank 0 dispatches while the others combine."""
    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    x, topk, w = xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev)
    handle = buffer.dispatch(x, topk, w, expand=True).handle
    rows = torch.randn(handle.num_rows, SIZES["hidden"]).bfloat16().to(dev)
    row_w = torch.rand(handle.num_rows, device=dev)
    if what == "layout":
        call, needle = (lambda: buffer.dispatch(x, topk, w, expand=rank == 0)), "expanded"
    elif what == "weights":
        call = lambda: buffer.combine(rows, handle, weights=row_w if rank == 0 else None)
        needle = "weights given on rank 0"
    else:
        call = ((lambda: buffer.dispatch(x, topk, w)) if rank == 0 else
                (lambda: buffer.combine(rows, handle)))
        needle = "calls"
    message = _expect_error(epx.ErrorCode.INVALID_ARGUMENT,
                            lambda: (call(), buffer.synchronize()))
    assert "disagree" in message and needle in message, message
    out = buffer.combine(rows, handle, weights=row_w)
    assert out.x.shape == (x.shape[0], SIZES["hidden"])
    return message


def config_mismatch_case(ctx, seed):
    """Buffers built with different hidden sizes: every rank raises at setup, naming the field,
    well before the timeout."""
    hidden = SIZES["hidden"] * (2 if ctx.rank == 0 else 1)
    message = _expect_error(epx.ErrorCode.INVALID_ARGUMENT, ctx.buffer, max_tokens_per_rank=4,
                            hidden=hidden, num_experts=ctx.world, num_topk=1,
                            timeout_seconds=20.0)
    assert "hidden" in message, message
    return message


def autograd_losses_case(ctx, seed, expand, loss):
    """A rank without tokens and another whose experts return a constant (no grad) for its rows,
    through forward and backward with y.sum(), y.mean() or an MSE loss: every rank takes part in
    both backward collectives (nobody waits for a peer), gradients have the inputs' shapes, and
    a second step on the same buffer works."""
    rank, dev = ctx.rank, ctx.device
    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed, empty_rank=0)
    for step in range(2):
        x = xs[rank].to(dev, copy=True).requires_grad_()
        w = ws[rank].to(dev, copy=True).requires_grad_()
        recv_x, recv_w, handle = F.dispatch(buffer, x, topks[rank].to(dev), w, expand=expand,
                                            expert_alignment=4)
        if rank == ctx.world - 1:
            h = torch.zeros_like(recv_x)  # no grad: as a MoE block that skips its experts
        else:
            h = (recv_x.float() * 1.5).bfloat16()
        if not expand:  # the compact layout: the expert side applies the weights itself
            h = (h.float() * recv_w.sum(1, keepdim=True)).bfloat16()
        y = F.combine(buffer, h, handle, recv_w if expand else None)
        if loss == "sum":
            value = y.sum()
        elif loss == "mean":
            value = y.float().mean()
        else:
            value = torch.nn.functional.mse_loss(y.float(), torch.ones_like(y, dtype=torch.float))
        value.backward()
        assert x.grad is not None and x.grad.shape == x.shape, (step, x.grad)
        assert w.grad is not None and w.grad.shape == w.shape, (step, w.grad)
        assert bool(torch.isfinite(x.grad.float()).all())
    return x.shape[0]


def timeout_then_unusable_case(ctx, seed):
    """Rank 0 runs an operation alone (a backward its peers skipped) and times out; from then on
    the buffer is unusable on every rank: rank 0's next call and each peer's next call raise
    UNUSABLE at once (no silently wrong result, no second timeout); a new buffer works."""
    import time

    buffer, num_experts, (xs, topks, ws, _) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    x, topk, w = xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev)
    short = ctx.buffer(max_tokens_per_rank=SIZES["max_tokens"], hidden=SIZES["hidden"],
                       num_experts=num_experts, num_topk=SIZES["num_topk"], timeout_seconds=1.0)
    handle = short.dispatch(x, topk, w).handle
    if rank == 0:
        _expect_error(epx.ErrorCode.TIMEOUT, lambda: (short.dispatch(x, handle=handle),
                                                      short.synchronize()))
    dist.barrier()
    start = time.monotonic()
    _expect_error(epx.ErrorCode.UNUSABLE, lambda: (short.dispatch(x, topk, w),
                                                   short.synchronize()))
    waited = time.monotonic() - start
    assert waited < 0.9, waited
    layout = receive_layout(topks, rank, num_experts, 1)
    want_x, _, _ = dispatch_outputs(layout, xs, None, None, False)
    _same(buffer.dispatch(x, topk, w).x, want_x, "recv_x on another buffer")
    return waited


# -- epx.nn.ExpertParallelMoE, eager, compiled and captured -------------------------------------

class _MLP(torch.nn.Module):
    """One expert: silu(x @ w_in) @ w_out."""

    def __init__(self, w_in, w_out):
        super().__init__()
        self.w_in, self.w_out = torch.nn.Parameter(w_in.clone()), torch.nn.Parameter(w_out.clone())

    def forward(self, rows):
        return torch.nn.functional.silu(rows @ self.w_in) @ self.w_out


class _StackedMLP(torch.nn.Module):
    """E_l experts with stacked weights, each row through its own expert (rows of expert -1
    through expert 0: finite, and never read)."""

    def __init__(self, w_in, w_out):
        super().__init__()
        self.w_in, self.w_out = torch.nn.Parameter(w_in.clone()), torch.nn.Parameter(w_out.clone())

    def forward(self, rows, local_expert_idx):
        expert = local_expert_idx.clamp(min=0)
        hidden = torch.nn.functional.silu(torch.bmm(rows.unsqueeze(1), self.w_in[expert]))
        return torch.bmm(hidden, self.w_out[expert]).squeeze(1)


LAYER_SIZES = dict(hidden=32, ffn=24, local_experts=2, num_topk=2, max_tokens=16)


def _layer_weights(seed, world):
    """The router [E, H] and every expert's w_in [E, H, F], w_out [E, F, H], from the seed."""
    hidden, ffn = LAYER_SIZES["hidden"], LAYER_SIZES["ffn"]
    num_experts = LAYER_SIZES["local_experts"] * world
    g = torch.Generator().manual_seed(seed)
    router = torch.randn(num_experts, hidden, generator=g) * 0.5
    w_in = torch.randn(num_experts, hidden, ffn, generator=g) / math.sqrt(hidden)
    w_out = torch.randn(num_experts, ffn, hidden, generator=g) / math.sqrt(ffn)
    return router, w_in, w_out


def _make_layer(ctx, buffer, seed, layout, grouped, sync_counts, renormalize=False):
    router_w, w_in, w_out = _layer_weights(seed, ctx.world)
    local = LAYER_SIZES["local_experts"]
    first = ctx.rank * local
    router = torch.nn.Linear(router_w.shape[1], router_w.shape[0], bias=False)
    with torch.no_grad():
        router.weight.copy_(router_w)
    if grouped:
        experts = _StackedMLP(w_in[first:first + local], w_out[first:first + local])
    else:
        experts = [_MLP(w_in[e], w_out[e]) for e in range(first, first + local)]
    layer = epx.nn.ExpertParallelMoE(buffer, router, experts, layout=layout, expert_alignment=4,
                                     sync_counts=sync_counts, renormalize=renormalize)
    return layer.to(ctx.device)


def _layer_grads(layer):
    """(router [E, H], w_in [E_l, H, F], w_out [E_l, F, H]) gradients, missing ones as zeros."""
    def grad(p):
        return torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()

    if layer.grouped:
        w_in, w_out = grad(layer.experts.w_in), grad(layer.experts.w_out)
    else:
        w_in = torch.stack([grad(m.w_in) for m in layer.experts])
        w_out = torch.stack([grad(m.w_out) for m in layer.experts])
    return grad(layer.router.weight), w_in, w_out


def _dense_moe(x_all, topk_all, grad_all, weights, renormalize):
    """The layer on one device in fp64, with every rank's tokens and routing: (y per rank,
    dL/dx per rank, dL/d router, dL/d w_in, dL/d w_out) for L = sum(y * grad)."""
    router, w_in, w_out = (w.double().requires_grad_() for w in weights)
    sizes = [x.shape[0] for x in x_all]
    x = torch.cat(x_all).double().requires_grad_()
    topk = torch.cat(topk_all)
    probs = torch.softmax(x @ router.t(), dim=-1)
    top_weights = probs.gather(1, topk)
    if renormalize:
        top_weights = top_weights / top_weights.sum(dim=1, keepdim=True)
    hidden = torch.nn.functional.silu(torch.einsum("sh,skhf->skf", x, w_in[topk]))
    out = torch.einsum("skf,skfh->skh", hidden, w_out[topk])
    y = (top_weights.unsqueeze(-1) * out).sum(1)
    (y * torch.cat(grad_all).double()).sum().backward()
    return (list(y.detach().split(sizes)), list(x.grad.split(sizes)), router.grad, w_in.grad,
            w_out.grad)


def moe_layer_case(ctx, seed, layout, grouped, sync_counts, compile_backend=None, steps=2,
                   renormalize=False, empty_rank=None):
    """epx.nn.ExpertParallelMoE (eager, or through torch.compile(fullgraph=True)) against the
    dense layer, over `steps` batches with new routing (`empty_rank` holds no tokens on odd
    steps: compiled, its graph is specialised to 0 tokens): y and the gradients of x, the
    router and this rank's experts within 2e-2 relative error. Compiled, also against the same
    layer run eagerly (the same loss and gradients). Returns per step the relative errors."""
    buffer = ctx.buffer(max_tokens_per_rank=LAYER_SIZES["max_tokens"],
                        hidden=LAYER_SIZES["hidden"],
                        num_experts=LAYER_SIZES["local_experts"] * ctx.world,
                        num_topk=LAYER_SIZES["num_topk"])
    layer = _make_layer(ctx, buffer, seed, layout, grouped, sync_counts, renormalize)
    run = layer
    if compile_backend is not None:
        run = torch.compile(layer, fullgraph=True, backend=compile_backend)
    weights = _layer_weights(seed, ctx.world)
    local = LAYER_SIZES["local_experts"]
    first, rank, dev = ctx.rank * local, ctx.rank, ctx.device
    g = torch.Generator().manual_seed(seed + 1)
    report = []
    for step in range(steps):
        sizes = [int(torch.randint(1, LAYER_SIZES["max_tokens"] + 1, (1,), generator=g))
                 for _ in range(ctx.world)]
        if empty_rank is not None and step % 2:
            sizes[empty_rank] = 0
        x_all = [torch.randn(s, LAYER_SIZES["hidden"], generator=g) for s in sizes]
        grad_all = [torch.randn(s, LAYER_SIZES["hidden"], generator=g) for s in sizes]
        x = x_all[rank].to(dev, copy=True).requires_grad_()
        y = run(x)
        loss = (y.float() * grad_all[rank].to(dev)).sum()
        loss.backward()
        got = (x.grad.clone(),) + _layer_grads(layer)
        layer.zero_grad(set_to_none=True)
        # The dense layer takes the routing each rank chose (ties decided on its device).
        with torch.no_grad():
            topk = layer.route(x)[1].cpu()
        topk_all = [None] * ctx.world
        dist.all_gather_object(topk_all, topk)
        want_y, want_x, want_router, want_in, want_out = _dense_moe(
            x_all, topk_all, grad_all, weights, renormalize)
        router_grad = got[1].clone()
        dist.all_reduce(router_grad)
        entry = dict(y=_relative_error(y, want_y[rank]) if sizes[rank] else 0.0,
                     x=_relative_error(got[0], want_x[rank]) if sizes[rank] else 0.0,
                     router=_relative_error(router_grad, want_router),
                     w_in=_relative_error(got[2], want_in[first:first + local]),
                     w_out=_relative_error(got[3], want_out[first:first + local]))
        if compile_backend is not None:
            x_eager = x.detach().clone().requires_grad_()
            y_eager = layer(x_eager)
            loss_eager = (y_eager.float() * grad_all[rank].to(dev)).sum()
            loss_eager.backward()
            eager = (x_eager.grad,) + _layer_grads(layer)
            layer.zero_grad(set_to_none=True)
            entry["loss_vs_eager"] = abs(loss.item() - loss_eager.item()) / max(
                abs(loss_eager.item()), 1e-30)
            entry["grads_vs_eager"] = max(_relative_error(a, b) for a, b in zip(got, eager))
        report.append(entry)
    return report


def capture_case(ctx, seed, layout):
    """A whole forward + backward step of epx.nn.ExpertParallelMoE (sync_counts=False) captured
    in a CUDA graph and replayed with new tokens, and so new routing: the replay's y and
    gradients equal those of the same layer run eagerly (on a buffer of its own, so that eager
    and replayed operations never share a sequence), bit for bit. Returns the tensors compared."""
    sizes = dict(max_tokens_per_rank=LAYER_SIZES["max_tokens"], hidden=LAYER_SIZES["hidden"],
                 num_experts=LAYER_SIZES["local_experts"] * ctx.world,
                 num_topk=LAYER_SIZES["num_topk"])
    captured = _make_layer(ctx, ctx.buffer(**sizes), seed, layout, False, False)
    eager = _make_layer(ctx, ctx.buffer(**sizes), seed, layout, False, False)
    tokens, hidden, dev = LAYER_SIZES["max_tokens"], LAYER_SIZES["hidden"], ctx.device
    static_x = torch.zeros(tokens, hidden, device=dev, requires_grad=True)
    static_grad = torch.zeros(tokens, hidden, device=dev)

    def step(layer, x, grad):
        y = layer(x)
        (y.float() * grad).sum().backward()
        return y

    # Warm-up on a side stream before capture, as torch.cuda.graph asks (autograd's and the
    # allocator's first-use work stays out of the graph).
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(captured, static_x, static_grad)
            captured.zero_grad(set_to_none=True)
            static_x.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(captured, static_x, static_grad)
    g = torch.Generator().manual_seed(seed + ctx.rank)
    compared = 0
    for _ in range(3):
        x = torch.randn(tokens, hidden, generator=g).to(dev)
        grad = torch.randn(tokens, hidden, generator=g).to(dev)
        with torch.no_grad():
            static_x.copy_(x)
            static_grad.copy_(grad)
        graph.replay()
        x_eager = x.clone().requires_grad_()
        y_eager = step(eager, x_eager, grad)
        torch.cuda.synchronize()
        pairs = [(static_y, y_eager), (static_x.grad, x_eager.grad)] + list(
            zip(_layer_grads(captured), _layer_grads(eager)))
        for replayed, want in pairs:
            assert torch.equal(replayed.cpu(), want.cpu()), (replayed - want).abs().max()
            compared += 1
        eager.zero_grad(set_to_none=True)
    return compared


def opcheck_case(ctx, seed, expand):
    """torch.library.opcheck of epx's operators on real arguments: schema, fake implementation
    (sizes, dtypes, devices, strides of every output) and autograd registration agree with the
    kernels. Each check runs the operator several times, the same on every rank. Not its
    test_aot_dispatch_dynamic: it compares two calls' outputs, and a dispatch's handle tensor
    names a new handle each time (the compiled layer's tests cover AOT tracing)."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    buffer, num_experts, (xs, topks, ws, auxs) = _setup(ctx, seed)
    rank, dev = ctx.rank, ctx.device
    dispatch_args = (xs[rank].to(dev), topks[rank].to(dev), ws[rank].to(dev),
                     auxs[rank].to(dev), buffer._op_id, expand, 4, True, False)
    torch.library.opcheck(torch.ops.epx.dispatch, dispatch_args, test_utils=checks)
    outputs = torch.ops.epx.dispatch(*dispatch_args)
    recv_x, recv_w, handle = outputs[0].requires_grad_(), outputs[1].requires_grad_(), outputs[7]
    weights = recv_w if expand else None
    combine_args = (recv_x, handle, None, weights, recv_w, None, buffer._op_id, xs[rank].shape[0])
    torch.library.opcheck(torch.ops.epx.combine, combine_args, test_utils=checks)
    grad_y = xs[rank].to(dev)
    if expand:
        torch.library.opcheck(torch.ops.epx.combine_backward,
                              (grad_y, handle, recv_x, recv_w, buffer._op_id), test_utils=checks)
    torch.library.opcheck(torch.ops.epx.cached_dispatch,
                          (grad_y, handle, buffer._op_id, recv_x.shape[0]), test_utils=checks)
    return True


def compile_synced_case(ctx, seed):
    """torch.compile of a layer that syncs its counts: every rank raises, before any exchange,
    an error saying that dispatch needs sync_counts=False there."""
    buffer = ctx.buffer(max_tokens_per_rank=LAYER_SIZES["max_tokens"],
                        hidden=LAYER_SIZES["hidden"],
                        num_experts=LAYER_SIZES["local_experts"] * ctx.world,
                        num_topk=LAYER_SIZES["num_topk"])
    layer = _make_layer(ctx, buffer, seed, "expanded", False, True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    try:
        compiled(torch.randn(4, LAYER_SIZES["hidden"], device=ctx.device))
    except Exception as error:  # noqa: BLE001 - torch.compile wraps it in its own exception
        assert "sync_counts=False" in str(error), error
        return str(error)
    raise AssertionError("a compiled dispatch with sync_counts=True did not raise")


def transformers_case(ctx, seed, folder):
    """A tiny random Qwen3-MoE from transformers, loaded with expert parallelism through epx's
    EPImplementation (DistributedConfig(ep_size=R, fsdp_size=R, ep_implementation="epx"):
    each rank its own batch and E/R experts, FSDP2 over the rest), against the same model on
    one device: each rank's logits and loss, and the gradient of every parameter (FSDP averages
    them over the ranks). Returns the relative errors."""
    import os

    import epx.integrations
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig

    epx.integrations.register_transformers(max_tokens_per_rank=16)
    config = Qwen3MoeConfig(vocab_size=96, hidden_size=32, intermediate_size=48,
                            moe_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, num_experts=2 * ctx.world,
                            num_experts_per_tok=2, decoder_sparse_step=1,
                            max_position_embeddings=64)
    torch.manual_seed(seed)  # the same random model on every rank; rank 0 saves it
    reference = Qwen3MoeForCausalLM(config)
    path = os.path.join(folder, "model")
    if ctx.rank == 0:
        reference.save_pretrained(path)
    dist.barrier()
    model = Qwen3MoeForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(ep_size=ctx.world, fsdp_size=ctx.world,
                                                   ep_implementation="epx"))
    g = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randint(0, config.vocab_size, (1, 12), generator=g) for _ in range(ctx.world)]
    out = model(batches[ctx.rank], labels=batches[ctx.rank])
    out.loss.backward()
    want_losses = []
    for r, batch in enumerate(batches):
        want = reference(batch, labels=batch)
        (want.loss / ctx.world).backward()
        want_losses.append(want.loss)
        if r == ctx.rank:
            want_logits = want.logits
    report = dict(logits=_relative_error(out.logits, want_logits),
                  loss=abs(out.loss.item() - want_losses[ctx.rank].item()))
    want_grads = dict(reference.named_parameters())
    worst = ("", 0.0)
    for name, parameter in model.named_parameters():
        grad = parameter.grad
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        error = _relative_error(grad, want_grads[name].grad)
        worst = max(worst, (name, error), key=lambda item: item[1])
    report["worst_grad"] = worst
    report["local_experts"] = model.model.layers[0].mlp.experts.num_experts
    # The layers ran through epx: they made (and share) one buffer.
    report["epx_buffers"] = len(epx.integrations._SHARED_BUFFERS)
    return report
