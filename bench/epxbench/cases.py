"""The configurations' inputs and what each timed op does: epx and the NCCL baselines.

One configuration is (routing, tokens per rank); every op of it runs on the same routing. The
NCCL baselines are all_to_all_single of the same rows, alone and as the pipeline a user would
write (gather the send rows, all-to-all, permute into expert order / reduce); their split sizes
and permutation indices are precomputed, untimed.
"""

import torch
import torch.distributed as dist

from .routing import Oracle
from .routing import Routing, random_bf16, random_fp8
from .timing import rotation

# op -> (direction of the rows on the link, dtype of the rows, carries weights)
EPX_OPS = {
    "dispatch_compact": ("fwd", "bf16", True),
    "dispatch_expanded": ("fwd", "bf16", True),
    "dispatch_cached": ("fwd", "bf16", True),
    "dispatch_compact_nosync": ("fwd", "bf16", True),
    "dispatch_expanded_nosync": ("fwd", "bf16", True),
    "dispatch_compact_fp8": ("fwd", "fp8", True),
    "dispatch_expanded_fp8": ("fwd", "fp8", True),
    "combine_compact": ("back", "bf16", False),
    "combine_expanded": ("back", "bf16", False),
    "combine_backward": ("fwd", "bf16", False),
}
# epx op -> (NCCL all-to-all alone, NCCL user pipeline) baselines of the same run
BASELINE_OF = {
    "dispatch_compact": ("nccl_a2a_fwd", "nccl_dispatch_compact_pipeline"),
    "dispatch_expanded": ("nccl_a2a_fwd", "nccl_dispatch_expanded_pipeline"),
    "dispatch_cached": ("nccl_a2a_fwd", "nccl_dispatch_expanded_pipeline"),
    "dispatch_compact_nosync": ("nccl_a2a_fwd", "nccl_dispatch_compact_pipeline"),
    "dispatch_expanded_nosync": ("nccl_a2a_fwd", "nccl_dispatch_expanded_pipeline"),
    "dispatch_compact_fp8": ("nccl_a2a_fwd_fp8", None),
    "dispatch_expanded_fp8": ("nccl_a2a_fwd_fp8", None),
    "combine_compact": ("nccl_a2a_back", "nccl_combine_compact_pipeline"),
    "combine_expanded": ("nccl_a2a_back", "nccl_combine_expanded_pipeline"),
    "combine_backward": ("nccl_a2a_fwd", "nccl_combine_backward_pipeline"),
}
# epx ops that never wait on the host, also timed as CUDA-graph replays (--graphs)
GRAPH_OPS = ("dispatch_compact_nosync", "dispatch_expanded_nosync", "dispatch_cached",
             "combine_compact", "combine_expanded", "combine_backward")
# NCCL op -> (direction of the rows on the link, dtype of the rows)
NCCL_OPS = {
    "nccl_a2a_fwd": ("fwd", "bf16"),
    "nccl_a2a_back": ("back", "bf16"),
    "nccl_a2a_fwd_fp8": ("fwd", "fp8"),
    "nccl_dispatch_compact_pipeline": ("fwd", "bf16"),
    "nccl_dispatch_expanded_pipeline": ("fwd", "bf16"),
    "nccl_combine_compact_pipeline": ("back", "bf16"),
    "nccl_combine_expanded_pipeline": ("back", "bf16"),
    "nccl_combine_backward_pipeline": ("fwd", "bf16"),
}


class Config:
    """One (routing, tokens) configuration on one rank: the routing plan, its indices on the
    device, the inputs (rotated so that consecutive samples do not find them in L2), the bytes
    each op moves, and the oracle of its outputs."""

    def __init__(self, args, runner, routing_name, tokens, seed):
        self.args, self.runner, self.routing_name, self.tokens = args, runner, routing_name, tokens
        self.device, self.world, self.hidden, self.topk = runner.device, runner.world, \
            args.hidden, args.topk
        device, world, hidden = self.device, self.world, self.hidden
        self.routing = Routing(args, world, runner.rank, tokens, routing_name == "skewed", seed)
        self.plan = plan = self.routing.plan(args.alignment)
        self.send_index, self.order_rows, self.order_k, self.dst_rows, self.gather_full = (
            t.to(device) for t in (plan.send_index, plan.order_rows, plan.order_k,
                                   plan.dst_rows, plan.gather_full))
        self.idx = self.routing.idx[runner.rank].to(device)
        self.weights = self.routing.weights[runner.rank].to(device)
        self.row_bf16, self.row_fp8 = 2 * hidden, hidden + 4 * (hidden // 128)
        n, m, l2 = plan.num_recv, plan.num_rows, args.l2_mb * 1e6
        self.xs = self._rotated(tokens * self.row_bf16, tokens * self.row_bf16, l2,
                                lambda: random_bf16(tokens, hidden, device))
        self.grads = self._rotated(tokens * self.row_bf16, tokens * self.row_bf16, l2,
                                   lambda: random_bf16(tokens, hidden, device))
        self.hs_compact = self._rotated(n * self.row_bf16, n * self.row_bf16, l2,
                                        lambda: random_bf16(n, hidden, device))
        self.hs_expanded = self._rotated(len(plan.dst_rows) * self.row_bf16, m * self.row_bf16,
                                         l2, lambda: random_bf16(m, hidden, device))
        self.w_expanded = torch.rand(m, device=device)  # the NCCL pipelines' per-row weights
        self.oracle = Oracle(self)

    @staticmethod
    def _rotated(nbytes_read, nbytes_alloc, l2, make):
        return [make() for _ in range(rotation(nbytes_read, nbytes_alloc, l2))]

    def nbytes(self, direction, dtype, with_weights, reduce):
        """Bytes into a rank by the rows of this direction, reduced over ranks (max, mean)."""
        per_row = (self.row_fp8 if dtype == "fp8" else self.row_bf16) + \
            (4 * self.topk if with_weights else 0)
        return reduce([self.routing.rows_in(r, direction) * per_row for r in range(self.world)])

    def describe(self):
        plan, routing, world = self.plan, self.routing, self.world
        return (f"{self.routing_name} routing, {self.tokens} tokens/rank: rows into the busiest "
                f"rank {max(routing.rows_in(r, 'fwd') for r in range(world))} (dispatch), "
                f"{max(routing.rows_in(r, 'back') for r in range(world))} (combine); "
                f"rank 0 N={plan.num_recv} M={plan.num_rows}")


def time_all_to_all(cfg, recv, back):
    """all_to_all_single alone, both directions (and fp8 rows forward), into `recv` [N, H] and
    `back` [sum(in_splits), H]: ({op: stats}, {op: CUDA-graph us}). Its copies of the gathered
    send rows are freed on return, before the pipelines allocate theirs."""
    args, runner, plan, device = cfg.args, cfg.runner, cfg.plan, cfg.device
    a2a, out_s, in_s = dist.all_to_all_single, plan.out_splits, plan.in_splits
    recv_u8, back_u8, hs_compact = recv.view(torch.uint8), back.view(torch.uint8), cfg.hs_compact
    sends = [x.index_select(0, cfg.send_index) for x in cfg.xs]
    times, graph_times = {}, {}
    times["nccl_a2a_fwd"] = runner.timed(
        "nccl_a2a_fwd", lambda i: a2a(recv_u8, sends[i % len(sends)].view(torch.uint8),
                                      out_s, in_s))
    times["nccl_a2a_back"] = runner.timed(
        "nccl_a2a_back", lambda i: a2a(back_u8, hs_compact[i % len(hs_compact)]
                                       .view(torch.uint8), in_s, out_s))
    if args.graphs:
        graph_times["nccl_a2a_fwd"] = runner.timed_graph(
            "nccl_a2a_fwd", lambda i: a2a(recv_u8, sends[0].view(torch.uint8), out_s, in_s))
        graph_times["nccl_a2a_back"] = runner.timed_graph(
            "nccl_a2a_back", lambda i: a2a(back_u8, hs_compact[0].view(torch.uint8),
                                           in_s, out_s))
    if not args.no_fp8:
        send_rows, row, n = back.shape[0], cfg.row_fp8, plan.num_recv
        sends8 = [torch.empty(send_rows, row, dtype=torch.uint8, device=device) for _ in
                  range(rotation(send_rows * row, send_rows * row, args.l2_mb * 1e6))]
        recv8 = torch.empty(n, row, dtype=torch.uint8, device=device)
        times["nccl_a2a_fwd_fp8"] = runner.timed(
            "nccl_a2a_fwd_fp8", lambda i: a2a(recv8, sends8[i % len(sends8)], out_s, in_s))
    return times, graph_times


def time_nccl(cfg):
    """The NCCL baselines' median times ({op: stats}) and CUDA-graph replays ({op: us})."""
    plan, device, runner = cfg.plan, cfg.device, cfg.runner
    n, m, hidden = plan.num_recv, plan.num_rows, cfg.hidden
    xs, hs_compact, hs_expanded, grads = cfg.xs, cfg.hs_compact, cfg.hs_expanded, cfg.grads
    send_index, gather_full = cfg.send_index, cfg.gather_full
    order_rows, dst_rows, w_expanded = cfg.order_rows, cfg.dst_rows, cfg.w_expanded
    recv = torch.empty(n, hidden, dtype=torch.bfloat16, device=device)
    back = torch.empty(sum(plan.in_splits), hidden, dtype=torch.bfloat16, device=device)
    times, graph_times = time_all_to_all(cfg, recv, back)
    a2a, out_s, in_s = dist.all_to_all_single, plan.out_splits, plan.in_splits
    recv_u8, back_u8 = recv.view(torch.uint8), back.view(torch.uint8)
    expanded_out = torch.empty(m, hidden, dtype=torch.bfloat16, device=device)
    w_real = w_expanded.index_select(0, dst_rows)

    def dispatch_pipeline(i, expand):
        send = xs[i % len(xs)].index_select(0, send_index)
        a2a(recv_u8, send.view(torch.uint8), out_s, in_s)
        if expand:
            torch.index_select(recv, 0, gather_full, out=expanded_out)

    def combine_pipeline(i, expand):
        if expand:  # expert side: weighted sum of a token's local rows, one row per token
            h = hs_expanded[i % len(hs_expanded)]
            partial = torch.zeros(n, hidden, dtype=torch.float32, device=device)
            partial.index_add_(0, order_rows, h.index_select(0, dst_rows).float()
                               * w_real[:, None])
            rows = partial.to(torch.bfloat16)
        else:
            rows = hs_compact[i % len(hs_compact)]
        a2a(back_u8, rows.view(torch.uint8), in_s, out_s)
        y = torch.zeros(cfg.tokens, hidden, dtype=torch.float32, device=device)
        y.index_add_(0, send_index, back.float())
        return y.to(torch.bfloat16)

    def backward_pipeline(i):
        send = grads[i % len(grads)].index_select(0, send_index)
        a2a(recv_u8, send.view(torch.uint8), out_s, in_s)
        rows = recv.index_select(0, gather_full).float()
        grad_x = (rows * w_expanded[:, None]).to(torch.bfloat16)
        grad_w = (rows * hs_expanded[i % len(hs_expanded)].float()).sum(-1)
        return grad_x, grad_w

    pipelines = {
        "nccl_dispatch_compact_pipeline": lambda i: dispatch_pipeline(i, False),
        "nccl_dispatch_expanded_pipeline": lambda i: dispatch_pipeline(i, True),
        "nccl_combine_compact_pipeline": lambda i: combine_pipeline(i, False),
        "nccl_combine_expanded_pipeline": lambda i: combine_pipeline(i, True),
        "nccl_combine_backward_pipeline": backward_pipeline,
    }
    for name, fn in pipelines.items():
        times[name] = runner.timed(name, fn)
    return times, graph_times


def epx_ops(cfg, buf, buf8, compact, expanded):
    """{op: (fn, check)}: fn(i) runs sample i of the op; check(output of fn(0)) returns
    (problems, what "ok" says) from the oracle. `compact` and `expanded` are first dispatches,
    whose handles the cached dispatch and the combines replay."""
    xs, hs_c, hs_e, grads, idx, weights = (cfg.xs, cfg.hs_compact, cfg.hs_expanded, cfg.grads,
                                           cfg.idx, cfg.weights)
    handle_c, handle_e, w_rows = compact.handle, expanded.handle, expanded.weights
    align, oracle = cfg.args.alignment, cfg.oracle

    def dispatch(i, **options):
        return buf.dispatch(xs[i % len(xs)], idx, weights, **options)

    def check_dispatch(out):
        return oracle.dispatch(out, xs[0])

    ops = {
        "dispatch_compact": (dispatch, check_dispatch),
        "dispatch_expanded": (lambda i: dispatch(i, expand=True, expert_alignment=align),
                              check_dispatch),
        "dispatch_cached": (lambda i: buf.dispatch(xs[i % len(xs)], weights=weights,
                                                   handle=handle_e), check_dispatch),
        "dispatch_compact_nosync": (lambda i: dispatch(i, sync_counts=False), check_dispatch),
        "dispatch_expanded_nosync": (
            lambda i: dispatch(i, expand=True, expert_alignment=align, sync_counts=False),
            check_dispatch),
        "combine_compact": (lambda i: buf.combine(hs_c[i % len(hs_c)], handle_c),
                            lambda out: oracle.combine(out, hs_c[0])),
        "combine_expanded": (lambda i: buf.combine(hs_e[i % len(hs_e)], handle_e, weights=w_rows),
                             lambda out: oracle.combine(out, hs_e[0], w_rows)),
        "combine_backward": (
            lambda i: buf.combine_backward(grads[i % len(grads)], handle_e,
                                           x=hs_e[i % len(hs_e)], weights=w_rows),
            lambda out: oracle.combine_backward(out, grads[0], hs_e[0], w_rows)),
    }
    if buf8 is not None:
        x8s = cfg._rotated(cfg.tokens * cfg.row_fp8, cfg.tokens * cfg.row_fp8,
                           cfg.args.l2_mb * 1e6, lambda: random_fp8(cfg.tokens, cfg.hidden,
                                                                    cfg.device))

        def check_fp8(out):
            return oracle.dispatch(out, x8s[0])

        ops["dispatch_compact_fp8"] = (
            lambda i: buf8.dispatch(x8s[i % len(x8s)], idx, weights), check_fp8)
        ops["dispatch_expanded_fp8"] = (
            lambda i: buf8.dispatch(x8s[i % len(x8s)], idx, weights, expand=True,
                                    expert_alignment=align), check_fp8)
    return ops


def unfused_backward(cfg, buf, expanded):
    """What combine_backward replaces: cached dispatch of grad_y, scale, row dot in torch."""
    grads, hs_e = cfg.grads, cfg.hs_expanded
    handle_e, w_rows = expanded.handle, expanded.weights

    def run(i):
        rows = buf.dispatch(grads[i % len(grads)], handle=handle_e).x.float()
        grad_x = (rows * w_rows[:, None]).to(torch.bfloat16)
        grad_w = (rows * hs_e[i % len(hs_e)].float()).sum(-1)
        return grad_x, grad_w
    return run
