"""Code that runs on every rank (through ranks.RankPool): each function takes the rank's
context, runs collective epx operations and checks this rank's outputs against the oracle
(reference.py), computed from every rank's inputs, which every rank regenerates from the seed.
These are the exchanges, their errors and the checks that make ranks agree; the gradient and
layer cases are in gradient_cases.py.
"""

import torch
import torch.distributed as dist

import epx
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


def assert_same_bits(actual, expected, what):
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape, \
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.equal(actual, expected):
        bad = (actual != expected).nonzero()[:5].tolist()
        raise AssertionError(f"{what}: differs at {bad} (of {actual.numel()} elements)")


SIZES = dict(max_tokens=20, hidden=64, num_topk=3)


def setup_buffer_and_inputs(ctx, seed, local_experts=3, **input_options):
    num_experts = local_experts * ctx.world
    inputs = make_inputs(seed, ctx.world, SIZES["max_tokens"], SIZES["hidden"], num_experts,
                         SIZES["num_topk"], **input_options)
    buffer = ctx.buffer(max_tokens_per_rank=SIZES["max_tokens"], hidden=SIZES["hidden"],
                        num_experts=num_experts, num_topk=SIZES["num_topk"])
    return buffer, num_experts, inputs


def dispatch_case(ctx, seed, expand, alignment, idx_dtype="int64", zero_padding=True,
                  **input_options):
    """dispatch (and its cached replay) against the oracle, row for row and bit for bit."""
    buffer, num_experts, (xs, topks, ws, auxs) = setup_buffer_and_inputs(ctx, seed, **input_options)
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
    assert_same_bits(handle.expert_offsets,
                     torch.tensor(layout.expert_offsets, dtype=torch.int32), "expert_offsets")
    assert_same_bits(
        handle.src_token,
        torch.tensor([s * SIZES["max_tokens"] + t for s, t in layout.tokens], dtype=torch.int32),
        "src_token")
    assert_same_bits(handle.expanded_rows, layout.expanded_rows, "expanded_rows")
    if expand:
        assert result.topk_idx is None and handle.recv_topk_idx is None
        real = torch.tensor([owner is not None for owner in layout.row_owner], dtype=torch.bool)
        got_x = result.x.cpu()
        if not zero_padding:  # padding rows are unspecified: compare the real rows only
            got_x = torch.where(real.unsqueeze(1), got_x, torch.zeros((), dtype=got_x.dtype))
        assert_same_bits(got_x, want_x, "recv_x")
    else:
        assert_same_bits(result.topk_idx, layout.recv_topk, "recv topk_idx")
        assert_same_bits(handle.recv_topk_idx, layout.recv_topk, "handle.recv_topk_idx")
        assert_same_bits(result.x, want_x, "recv_x")
    assert_same_bits(result.weights, want_w, "recv weights")
    assert_same_bits(result.aux, want_aux, "recv aux")

    # Cached dispatch replays the layout row for row, with new scalars.
    new_w = ws[rank].to(dev) * 2
    cached = buffer.dispatch(xs[rank].to(dev), weights=new_w, handle=handle)
    assert cached.handle is handle
    if zero_padding or not expand:
        assert_same_bits(cached.x, result.x, "cached recv_x")
    assert_same_bits(cached.weights, want_w * 2, "cached recv weights")
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
    buffer, num_experts, (xs, topks, ws, auxs) = setup_buffer_and_inputs(ctx, seed, **input_options)
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
        assert_same_bits(out.x, want_y, what + " y")
        assert_same_bits(out.scalars, want_s, what + " scalars")
    out = buffer.combine(h_rows[rank].to(dev), handle)
    assert out.scalars is None
    return True


def combine_backward_case(ctx, seed, alignment, **input_options):
    """The fused backward: grad_x = bf16(w * g) exactly, grad_w = dot(g, x) within 1e-5."""
    buffer, num_experts, (xs, topks, ws, auxs) = setup_buffer_and_inputs(ctx, seed, **input_options)
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
    assert_same_bits(grad_x, want_x, "grad_x")
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
    assert_same_bits(recv_data.view(torch.uint8), want_data, "fp8 data")
    assert_same_bits(recv_scales, want_scales, "fp8 scales")
    assert_same_bits(result.weights, want_w, "weights")
    cached = buffer.dispatch(xs[rank].to(dev), handle=result.handle)
    want_x, _, _ = dispatch_outputs(layout, xs, None, None, expand)
    assert_same_bits(cached.x, want_x, "bf16 cached dispatch on an fp8 buffer")
    return True


def unsynced_case(ctx, seed, expand, alignment):
    """sync_counts=False: worst-case outputs, counts on the device, same rows in the same
    places, and the same combine result."""
    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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
    assert_same_bits(handle.device_counts, torch.tensor([n, m], dtype=torch.int64), "device_counts")
    assert_same_bits(lazy.x[:m], synced.x, "recv_x rows")
    assert_same_bits(lazy.weights[:m], synced.weights, "recv weights")
    assert_same_bits(handle.src_token[:n], synced.handle.src_token, "src_token")
    h = torch.randn(lazy.x.shape, generator=torch.Generator().manual_seed(seed + rank))
    h = h.bfloat16().to(dev)
    kwargs = dict(weights=lazy.weights) if expand else {}
    y_lazy = buffer.combine(h, handle, **kwargs).x
    kwargs = dict(weights=synced.weights) if expand else {}
    y_synced = buffer.combine(h[:m].contiguous(), synced.handle, **kwargs).x
    assert_same_bits(y_lazy, y_synced.cpu(), "combine y")
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
    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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
    assert_same_bits(result.x, want_x, "recv_x after errors")
    return True


# -- gradients ----------------------------------------------------------------------------------

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
        buffer, _, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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

    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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
    assert_same_bits(buffer.dispatch(x, topk, w).x, want_x, "recv_x after the aborted calls")
    return max(timings)


def mismatch_case(ctx, seed, what):
    """Ranks that disagree about a call all raise INVALID_ARGUMENT naming what differs, and the
    buffer works afterwards (nothing was exchanged, nothing is left half done):
      layout: expand=True on rank 0 only; weights: combine weights on rank 0 only;
      operation: rank 0 dispatches while the others combine."""
    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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


def timeout_then_unusable_case(ctx, seed):
    """Rank 0 runs an operation alone (a backward its peers skipped) and times out; from then on
    the buffer is unusable on every rank: rank 0's next call and each peer's next call raise
    UNUSABLE at once (no silently wrong result, no second timeout); a new buffer works."""
    import time

    buffer, num_experts, (xs, topks, ws, _) = setup_buffer_and_inputs(ctx, seed)
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
    assert_same_bits(buffer.dispatch(x, topk, w).x, want_x, "recv_x on another buffer")
    return waited


# -- epx.nn.ExpertParallelMoE, eager, compiled and captured -------------------------------------
