"""Code that runs on every rank (through ranks.RankPool) for the low-latency mode: the exchange
against a torch oracle (written from docs/semantics.md's low-latency section), its errors, and
experts that learn from inputs without grad (the MoE gradient case is gradient_cases.moe_grad_case
with low_latency=True). Every rank regenerates every rank's inputs from the seed."""

import torch

import epx
import epx.functional as F
from gradient_cases import expert_mlp
from rank_cases import assert_same_bits, make_inputs
from reference import fma

S_LL, HIDDEN, NUM_TOPK, LOCAL_EXPERTS = 20, 256, 3, 3


def canonical_rows(topks, rank, local, max_tokens, num_topk):
    """Per local expert of `rank`, its rows in the canonical order: (source, token, k) with
    their src_info ids ((source * S_ll + t) * K + k), which is ascending."""
    experts = [[] for _ in range(local)]
    for s, topk in enumerate(topks):
        for t, row in enumerate(topk.tolist()):
            for k, e in enumerate(row):
                if e >= 0 and e // local == rank:
                    experts[e % local].append(((s * max_tokens + t) * num_topk + k, s, t, k))
    return experts


def value_rows(ids, hidden, seed):
    """A bf16 row of its own per id, the same wherever a transport put it."""
    return torch.stack([torch.randn(hidden, generator=torch.Generator().manual_seed(seed * 7919 + i))
                        for i in ids]).bfloat16() if ids else torch.zeros(0, hidden).bfloat16()


def value_scalars(ids, seed):
    return torch.tensor([float(torch.randn(1, generator=torch.Generator().manual_seed(
        seed * 104729 + i))) for i in ids], dtype=torch.float32)


def exchange_case(ctx, seed, fp8=False, hook=False, zero_copy=False, idx_dtype="int64"):
    """dispatch, combine (weighted; zero-copy or copied, with scalars), cached dispatch and
    combine_backward against the oracle, every element compared (rows inside an expert sorted
    by src_info)."""
    world, rank, dev = ctx.world, ctx.rank, ctx.device
    local, experts_total = LOCAL_EXPERTS, LOCAL_EXPERTS * world
    capacity = world * S_LL
    xs, topks, ws, auxs = make_inputs(seed, world, S_LL, HIDDEN, experts_total, NUM_TOPK)
    buffer = ctx.buffer(max_tokens_per_rank=1, hidden=HIDDEN, num_experts=experts_total,
                        num_topk=NUM_TOPK, fp8_dispatch=fp8, low_latency_max_tokens=S_LL)
    if fp8:
        g = torch.Generator().manual_seed(seed + 1)
        data = [torch.randint(0, 126, x.shape, generator=g, dtype=torch.uint8) for x in xs]
        scales = [torch.rand(x.shape[0], HIDDEN // 128, generator=g) for x in xs]
        x_in = (data[rank].to(dev), scales[rank].to(dev))
    else:
        x_in = xs[rank].to(dev)
    recv = buffer.low_latency_dispatch(x_in, topks[rank].to(dev, getattr(torch, idx_dtype)),
                                       ws[rank].to(dev), auxs[rank].to(dev), return_hook=hook)
    if hook:
        buffer.low_latency_wait()
    rows = canonical_rows(topks, rank, local, S_LL, NUM_TOPK)
    counts = [len(r) for r in rows]
    assert_same_bits(recv.counts, torch.tensor(counts, dtype=torch.int32), "counts")
    assert_same_bits(recv.handle.counts, torch.tensor(counts, dtype=torch.int32), "handle.counts")
    assert_same_bits(recv.handle.topk_idx, topks[rank].int(), "handle.topk_idx")
    recv_x = recv.x[0] if fp8 else recv.x
    src_info = recv.src_info.cpu()
    for e in range(local):
        c = counts[e]
        order = torch.argsort(src_info[e, :c].long())
        ids = [i for i, _, _, _ in rows[e]]
        assert_same_bits(src_info[e, :c][order], torch.tensor(ids, dtype=torch.int32),
                         f"src_info of {e}")
        assert_same_bits(src_info[e, c:], torch.full((capacity - c,), -1, dtype=torch.int32),
                         "src_info tail")
        got = recv_x[e, :c].cpu()[order]
        source = data if fp8 else xs
        want = (torch.stack([source[s][t] for _, s, t, _ in rows[e]]) if c else got)
        assert_same_bits(got.view(torch.uint8) if fp8 else got, want, f"x of expert {e}")
        if fp8:
            want_scales = torch.stack([scales[s][t] for _, s, t, _ in rows[e]]) if c else None
            if c:
                assert_same_bits(recv.x[1][e, :c].cpu()[order], want_scales,
                                 f"scales of expert {e}")
        for name, got_s, values in (("weights", recv.weights, ws), ("aux", recv.aux, auxs)):
            got_s = got_s.cpu()
            want_s = torch.tensor([float(values[s][t, k]) for _, s, t, k in rows[e]])
            assert_same_bits(got_s[e, :c][order], want_s, f"{name} of expert {e}")
            assert_same_bits(got_s[e, c:], torch.zeros(capacity - c), f"{name} tail")

    # Combine, weighted by the dispatch's own weights (zero-copy) or by weights of its own.
    ids_here = src_info.clone()
    h = torch.full((local, capacity, HIDDEN), float("nan")).bfloat16()
    w_rows = torch.full((local, capacity), float("nan"))
    s_rows = torch.full((local, capacity), float("nan"))
    for e in range(local):
        valid = [int(i) for i in ids_here[e, :counts[e]]]
        h[e, :counts[e]] = value_rows(valid, HIDDEN, seed)
        w_rows[e, :counts[e]] = value_scalars(valid, seed + 1)
        s_rows[e, :counts[e]] = value_scalars(valid, seed + 2)
    if zero_copy:
        x_rows = buffer.low_latency_combine_input()
        x_rows.copy_(h.to(dev))
        weights = recv.weights
    else:
        x_rows, weights = h.to(dev), w_rows.to(dev)
    out = buffer.low_latency_combine(x_rows, recv.handle, weights=weights,
                                     scalars=s_rows.to(dev), return_hook=hook)
    if hook:
        buffer.low_latency_wait()
    topk = topks[rank]
    y = torch.zeros(topk.shape[0], HIDDEN, dtype=torch.bfloat16)
    want_scalars = torch.zeros(topk.shape, dtype=torch.float32)
    for t in range(topk.shape[0]):
        acc = torch.zeros(HIDDEN)
        for k, e in enumerate(topk[t].tolist()):
            if e < 0:
                continue
            i = (rank * S_LL + t) * NUM_TOPK + k
            w = ws[rank][t, k] if zero_copy else value_scalars([i], seed + 1)[0]
            acc = fma(w, value_rows([i], HIDDEN, seed)[0].float(), acc)
            want_scalars[t, k] = value_scalars([i], seed + 2)[0]
        y[t] = acc.bfloat16()
    assert_same_bits(out.x, y, "combine y")
    assert_same_bits(out.scalars, want_scalars, "combine scalars")

    # A cached dispatch of bf16 rows lands where the routing dispatch's rows did.
    new_x = [x * 2 for x in xs]
    cached = buffer.low_latency_dispatch(new_x[rank].to(dev), handle=recv.handle)
    assert_same_bits(cached.src_info, src_info, "cached src_info")
    for e in range(local):
        c = counts[e]
        order = torch.argsort(src_info[e, :c].long())
        if c:
            want = torch.stack([new_x[s][t] for _, s, t, _ in rows[e]])
            assert_same_bits(cached.x[e, :c].cpu()[order], want, f"cached x of expert {e}")
    buffer.low_latency_combine(buffer.low_latency_combine_input(), recv.handle)

    # combine_backward of the weighted combine above.
    g = torch.Generator().manual_seed(seed + 3)
    grad_y = [torch.randn(x.shape[0], HIDDEN, generator=g).bfloat16() for x in xs]
    grad_x, grad_w = buffer.low_latency_combine_backward(grad_y[rank].to(dev), recv.handle,
                                                         x=h.to(dev), weights=w_rows.to(dev))
    grad_x, grad_w = grad_x.cpu(), grad_w.cpu()
    for e in range(local):
        for j in range(capacity):
            if j >= counts[e]:
                assert not bool(grad_x[e, j].any()) and float(grad_w[e, j]) == 0.0, "tail not 0"
                continue
            i = int(ids_here[e, j])
            s, t = i // NUM_TOPK // S_LL, i // NUM_TOPK % S_LL
            gy = grad_y[s][t].float()
            assert_same_bits(grad_x[e, j], (w_rows[e, j] * gy).bfloat16(), f"grad_x row {j} of {e}")
            dot = torch.dot(gy.double(), h[e, j].double())
            bound = (gy.double().abs() * h[e, j].double().abs()).sum()
            assert abs(float(grad_w[e, j]) - float(dot)) <= 1e-5 * float(bound) + 1e-30
    buffer.low_latency_combine(buffer.low_latency_combine_input(), recv.handle)
    return counts


def errors_case(ctx, seed):
    """The mode off; calls out of turn; a hook's wait with no hook; each raises EpxError with
    its code."""
    off = ctx.buffer(max_tokens_per_rank=4, hidden=HIDDEN, num_experts=ctx.world, num_topk=1)
    x = torch.zeros(1, HIDDEN, dtype=torch.bfloat16, device=ctx.device)
    topk = torch.zeros(1, 1, dtype=torch.int64, device=ctx.device)
    codes = []
    for call in (lambda: off.low_latency_dispatch(x, topk),):
        try:
            call()
        except epx.EpxError as error:
            codes.append(error.code.name)
    buffer = ctx.buffer(max_tokens_per_rank=1, hidden=HIDDEN, num_experts=ctx.world, num_topk=1,
                        low_latency_max_tokens=4)
    try:
        buffer.low_latency_wait()
    except epx.EpxError as error:
        codes.append(error.code.name)
    buffer.low_latency_dispatch(x, topk)
    try:
        buffer.low_latency_dispatch(x, topk)
        buffer.synchronize()
    except epx.EpxError as error:
        codes.append(error.code.name)
        assert "out of turn" in str(error), str(error)
    try:
        buffer.low_latency_dispatch(x, topk)
    except epx.EpxError as error:
        codes.append(error.code.name)
    return codes


def frozen_inputs_case(ctx, seed):
    """Experts that learn from inputs that do not (x and the routing weights without grad):
    the dispatch has no backward, so the combine's backward ends its round itself, and the
    next step's dispatch is in turn."""
    world, rank, dev = ctx.world, ctx.rank, ctx.device
    hidden, num_topk, local = 32, 2, 2
    buffer = ctx.buffer(max_tokens_per_rank=1, hidden=hidden, num_experts=local * world,
                        num_topk=num_topk, low_latency_max_tokens=8)
    g = torch.Generator().manual_seed(seed)
    experts = (torch.randn(local * world, hidden, hidden, generator=g) / hidden ** 0.5).to(dev)
    experts.requires_grad_()
    for _ in range(2):
        x = torch.randn(8, hidden, generator=g).bfloat16().to(dev)
        topk = torch.randint(0, local * world, (8, num_topk), generator=g).to(dev)
        recv_x, _, handle = F.low_latency_dispatch(buffer, x, topk)
        h = torch.stack([expert_mlp(recv_x[e], experts[rank * local + e]) for e in range(local)])
        y = F.low_latency_combine(buffer, h.bfloat16(), handle)
        y.float().sum().backward()
    buffer.synchronize()
    return experts.grad is not None and bool(torch.isfinite(experts.grad).all())
