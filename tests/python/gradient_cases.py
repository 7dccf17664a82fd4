"""Rank code (as rank_cases.py) for training: an MoE layer through epx.functional against the
same layer on one device (every gradient: input, top-k weights, aux, router, experts), autograd's
edge cases, epx.nn.ExpertParallelMoE eager, compiled and captured in a CUDA graph, the custom
operators' opcheck, and epx as a transformers expert-parallel implementation.
"""

import math

import torch
import torch.distributed as dist

import epx
import epx.functional as F
from rank_cases import setup_buffer_and_inputs
from reference import receive_layout


def expert_mlp(x_rows, weight):
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
    h = torch.stack([expert_mlp(recv_x[e], w) for e, w in enumerate(local_weights)])
    h = torch.where(real.unsqueeze(-1), h, torch.zeros((), device=x.device)).bfloat16()
    return F.low_latency_combine(buffer, h, handle, recv_w)


def _expanded_experts(recv_x, handle, expert_weights, first):
    """Each local expert on its rows of an expanded dispatch: by the host offsets when the
    counts were synced, else by handle.local_expert_idx (no host synchronisation)."""
    offsets = handle.host_expert_offsets
    if offsets is not None:
        return torch.cat([expert_mlp(recv_x[offsets[e]:offsets[e + 1]], expert_weights[first + e])
                          for e in range(handle.local_experts)])
    expert_idx = handle.local_expert_idx.unsqueeze(1)
    out = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
    for e in range(handle.local_experts):
        out = torch.where(expert_idx == e, expert_mlp(recv_x, expert_weights[first + e]), out)
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
                    acc = acc + coefficient * expert_mlp(recv_x, experts_p[first + e])
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
    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed, mask_fraction=0.2)
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


def autograd_losses_case(ctx, seed, expand, loss):
    """A rank without tokens and another whose experts return a constant (no grad) for its rows,
    through forward and backward with y.sum(), y.mean() or an MSE loss: every rank takes part in
    both backward collectives (nobody waits for a peer), gradients have the inputs' shapes, and
    a second step on the same buffer works."""
    rank, dev = ctx.rank, ctx.device
    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed, empty_rank=0)
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
    buffer, num_experts, (xs, topks, ws, auxs) = setup_buffer_and_inputs(ctx, seed)
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
