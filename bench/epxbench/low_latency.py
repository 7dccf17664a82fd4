"""The low-latency (LL) ops of one configuration (docs/semantics.md, "Low-latency mode"): what
each timed sample runs, the bytes it moves, and its check.

LL dispatches and combines must alternate on every rank, so each op's samples carry the other
half of the round untimed (Runner.measure's `before`/`after`): `ll_dispatch` is timed with its
combine after it, `ll_combine` with its dispatch before it; `ll_round` times both, also as a
CUDA-graph replay (a graph of one call alone would break the alternation at its second
replay). The combine is the zero-copy one: its input is the buffer's combine region and its
weights the dispatch's own weights view.

The check runs one round on the first input with an identity expert (the received rows copied
into the combine region): per local expert, the received (source rank, token, k) multiset
against the routing (row order inside an expert is decided at run time), every row's bits and
weight against the source's row (all ranks' inputs gathered), weights 0 and src_info -1 past
the counts; y against fma over k ascending of the token's own weights and row, fp32 from +0,
one rounding to bf16.
"""

import torch
import torch.distributed as dist

from .routing import difference, fma
from .routing import random_fp8

# op -> (dtype of the dispatched rows, directions whose rows it moves)
LL_OPS = {
    "ll_dispatch": ("bf16", ("fwd",)),
    "ll_dispatch_fp8": ("fp8", ("fwd",)),
    "ll_combine": ("bf16", ("back",)),
    "ll_round": ("bf16", ("fwd", "back")),
}
# LL op -> the NCCL all_to_all_single of the same run it is compared with
LL_BASELINE_OF = {"ll_dispatch": "nccl_a2a_fwd", "ll_dispatch_fp8": "nccl_a2a_fwd_fp8",
                  "ll_combine": "nccl_a2a_back"}
LL_GRAPH_OPS = ("ll_round",)


def row_bytes(rows):
    """[..., C] of any dtype as [..., C * size] bytes (indexing and gloo need not support
    every dtype: float8, int16)."""
    return rows.contiguous().view(torch.uint8)


def gathered_bytes(rows):
    """The bytes of every rank's [S, C] rows, as [R, S, C * size] on this rank's CPU."""
    send = row_bytes(rows)
    parts = [torch.empty_like(send) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, send)
    return torch.stack(parts).cpu()


class LowLatency:
    """The LL ops of one configuration on one rank: `buf` (and `buf8`, fp8, or None) built with
    low_latency_max_tokens >= the configuration's tokens."""

    def __init__(self, cfg, buf, buf8):
        self.cfg, self.buf, self.buf8 = cfg, buf, buf8
        self.capacity = buf.low_latency_max_tokens  # S_ll
        self.combine_input = buf.low_latency_combine_input()
        self.x8s = None
        if buf8 is not None:
            self.x8s = cfg._rotated(cfg.tokens * cfg.row_fp8, cfg.tokens * cfg.row_fp8,
                                    cfg.args.l2_mb * 1e6,
                                    lambda: random_fp8(cfg.tokens, cfg.hidden, cfg.device))
        self.pending = None  # the dispatch the next combine closes

    # -- bytes ---------------------------------------------------------------------------------

    def rows_in(self, r, direction):
        """(token, k) rows arriving at rank r over the link: one per (t, k), no deduplication
        (fwd: dispatch, back: combine)."""
        routing = self.cfg.routing
        world, local = routing.world, routing.local_experts
        if direction == "fwd":
            pairs = [(s, r) for s in range(world)]
        else:
            pairs = [(r, d) for d in range(world)]
        return sum(int((routing.idx[s] // local == d).sum()) for s, d in pairs
                   if s != d or world == 1)

    def nbytes(self, op, reduce):
        """Bytes into a rank by the op's rows, reduced over ranks (max, mean): a dispatched row
        carries its fp32 weight, a combined row none."""
        cfg = self.cfg
        dtype, directions = LL_OPS[op]
        per_row = {"fwd": (cfg.row_fp8 if dtype == "fp8" else cfg.row_bf16) + 4,
                   "back": cfg.row_bf16}
        return reduce([sum(self.rows_in(r, d) * per_row[d] for d in directions)
                       for r in range(cfg.world)])

    # -- the calls -----------------------------------------------------------------------------

    def dispatch(self, i, fp8=False):
        cfg = self.cfg
        if fp8:
            out = self.buf8.low_latency_dispatch(self.x8s[i % len(self.x8s)], cfg.idx,
                                                 cfg.weights)
        else:
            out = self.buf.low_latency_dispatch(cfg.xs[i % len(cfg.xs)], cfg.idx, cfg.weights)
        self.pending = (self.buf8 if fp8 else self.buf, out)
        return out

    def combine(self, i=0):
        buf, out = self.pending
        self.pending = None
        combine_input = self.combine_input if buf is self.buf else buf.low_latency_combine_input()
        return buf.low_latency_combine(combine_input, out.handle, weights=out.weights)

    def ops(self):
        """{op: (fn, before, after)} for Runner.timed; fn(i) is the timed sample."""
        ops = {
            "ll_dispatch": (self.dispatch, None, self.combine),
            "ll_combine": (self.combine, self.dispatch, None),
            "ll_round": (lambda i: (self.dispatch(i), self.combine()), None, None),
        }
        if self.buf8 is not None:
            ops["ll_dispatch_fp8"] = (lambda i: self.dispatch(i, fp8=True), None, self.combine)
        return ops

    # -- the check -----------------------------------------------------------------------------

    def check_dispatch(self, out, source):
        """The round's dispatch of `source` ([S, H] bf16 or (fp8 data, scales))."""
        cfg, routing, capacity = self.cfg, self.cfg.routing, self.capacity
        local, topk, rank = routing.local_experts, cfg.topk, cfg.runner.rank
        # The (expert, key) pairs the routing sends here, key = (source * S_ll + t) * K + k.
        want = []
        for s in range(cfg.world):
            expert = routing.idx[s] - rank * local
            t, k = torch.nonzero((expert >= 0) & (expert < local), as_tuple=True)
            want.append(expert[t, k] * (cfg.world * capacity * topk)
                        + (s * capacity + t) * topk + k)
        want = torch.sort(torch.cat(want)).values
        counts, src_info = out.counts.cpu(), out.src_info.cpu()
        valid = torch.arange(src_info.shape[1])[None, :] < counts[:, None]
        keys = src_info[valid].long()
        expert = torch.nonzero(valid, as_tuple=True)[0]
        got = torch.sort(expert * (cfg.world * capacity * topk) + keys).values
        problems = [difference("(expert, source, token, k) received", got, want)]
        if problems[0]:
            return problems
        past = ~valid
        problems.append(difference("src_info past the counts", src_info[past],
                                   torch.full_like(src_info[past], -1)))
        weights = out.weights.cpu()
        problems.append(difference("weights past the counts", weights[past],
                                   torch.zeros_like(weights[past])))
        s, t, k = keys // (capacity * topk), keys // topk % capacity, keys % topk
        all_weights = torch.stack(routing.weights)  # [R, S, K]
        problems.append(difference("weights", weights[valid], all_weights[s, t, k]))
        pairs = ([("fp8 data", out.x[0], source[0]), ("fp8 scales", out.x[1], source[1])]
                 if isinstance(source, tuple) else [("x", out.x, source)])
        mask = valid.to(cfg.device)
        for what, recv, rows in pairs:
            everyone = gathered_bytes(rows)  # [R, S, C * size]
            problems.append(difference(what, row_bytes(recv)[mask].cpu(), everyone[s, t]))
        return [p for p in problems if p]

    def check_combine(self, y):
        """The round's combine of the identity expert (the dispatched rows themselves)."""
        cfg = self.cfg
        x, weights = cfg.xs[0], cfg.weights
        acc = torch.zeros(cfg.tokens, cfg.hidden, dtype=torch.float32, device=cfg.device)
        for k in range(cfg.topk):
            acc = fma(weights[:, k], x, acc)
        return [p for p in [difference("y", y, acc.to(torch.bfloat16))] if p]

    def verify(self, runner):
        """One round on the first input, checked: {op: verdict} on every rank, None for ops
        whose round raised (noted)."""
        # A check that raises still closes its round: the next LL call must be a dispatch.
        def round_trip():
            out = self.dispatch(0)
            try:
                problems = self.check_dispatch(out, self.cfg.xs[0])
            finally:
                self.combine_input.copy_(out.x)  # the identity expert, written in place
                y = self.combine().x
            return problems, self.check_combine(y)
        result = runner.attempt("low-latency round (check)", round_trip)
        if result is None:
            return {}
        detail = [runner.gathered("; ".join(part)) for part in result]
        verdicts = {"ll_dispatch": detail[0], "ll_combine": detail[1],
                    "ll_round": "; ".join(d for d in detail if d)}
        if self.buf8 is not None:
            def fp8_round():
                out = self.dispatch(0, fp8=True)
                try:
                    return self.check_dispatch(out, self.x8s[0])
                finally:
                    self.combine()
            problems = runner.attempt("low-latency fp8 round (check)", fp8_round)
            if problems is not None:
                verdicts["ll_dispatch_fp8"] = runner.gathered("; ".join(problems))
        for op, detail in verdicts.items():
            if detail:
                runner.note(f"{self.cfg.routing_name}/{self.cfg.tokens} {op}: mismatch: "
                            f"{detail}")
        return {op: f"mismatch: {detail}" if detail else "ok" for op, detail in verdicts.items()}
