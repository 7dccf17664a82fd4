"""Top-k routing of every rank, and the layouts one rank receives under it.

Every rank computes every rank's top-k from the same seed, so each knows the whole traffic:
the rows crossing each link (the byte counts), the all-to-all splits of the NCCL baselines, and
where each received row lands in epx's compact and expanded layouts (docs/semantics.md), which
the NCCL pipelines rebuild and the oracle checks.

The oracle (Oracle): what every timed epx op must return, computed with torch from the routing
plan (`check`).

Dispatch copies bits, so its reference is the all-to-all of the same rows (NCCL moves bytes and
nothing else), permuted into the expanded layout where the op expands; the weights travel with
them. Combine follows the numerics of docs/semantics.md (src/plan/numerics.hpp), reproduced
term by term in the same order: an fp32 accumulator from +0; a weighted term is one fused
multiply-add; an expanded combine sums a token's rows on each expert rank in ascending k and
rounds that partial to bf16, the source adds the ranks' rows in ascending rank order and rounds
once (round to nearest even). The same all-to-all carries the reference's rows between the
sides. So every comparison but one is of bits: combine_backward's grad_weights may sum in any
order and must lie within 1e-5 of sum |g| |x| of the fp64 dot, as the test suite requires
(tests/python/rank_cases.py; tests/python/reference.py is the per-token form of the same).
"""

import math

import torch
import torch.distributed as dist

FLOAT8 = getattr(torch, "float8_e4m3fn", None)


class Routing:
    """Top-k routing of all ranks and what one rank sends and receives under it."""

    def __init__(self, args, world, rank, tokens, skewed, seed):
        self.world, self.rank, self.tokens = world, rank, tokens
        self.experts, self.topk = args.experts, args.topk
        self.local_experts = args.experts // world
        generator = torch.Generator().manual_seed(seed)
        bias = torch.zeros(args.experts)
        if skewed:  # the first quarter of the experts (on the first ranks) is favoured
            bias[: max(1, args.experts // 4)] = args.skew
        self.idx, self.weights, self.dest = [], [], []
        for _ in range(world):
            scores = torch.randn(tokens, args.experts, generator=generator) + bias
            top, idx = scores.topk(args.topk, dim=1)
            self.idx.append(idx)
            self.weights.append(torch.softmax(top, dim=1).float())
            dest = torch.zeros(tokens, world, dtype=torch.bool)
            dest.scatter_(1, idx // self.local_experts, True)
            self.dest.append(dest)
        # counts[s][d]: tokens source s sends to rank d (once per token and rank)
        self.counts = [[int(self.dest[s][:, d].sum()) for d in range(world)] for s in range(world)]

    def rows_in(self, r, direction):
        """Token rows arriving at rank r over the link (fwd: dispatch, back: combine)."""
        if direction == "fwd":
            pairs = [(s, r) for s in range(self.world)]
        else:
            pairs = [(r, d) for d in range(self.world)]
        return sum(self.counts[s][d] for s, d in pairs if s != d or self.world == 1)

    def plan(self, alignment):
        """This rank's all-to-all splits, its compact layout (the all-to-all output: source
        rank, then token) and the permutation into the expanded layout."""
        r, world, local = self.rank, self.world, self.local_experts
        send = [torch.nonzero(self.dest[r][:, d]).flatten() for d in range(world)]
        # The source tokens in send order (by destination rank, then token).
        self.send_index = torch.cat(send) if send else torch.zeros(0, dtype=torch.long)
        self.in_splits = [self.counts[r][d] for d in range(world)]
        self.out_splits = [self.counts[s][r] for s in range(world)]
        self.num_recv = sum(self.out_splits)  # N: rows of the compact layout / a2a output
        # Expanded rows: one per (source, token, k) whose expert is here, ordered by (local
        # expert, source, token, k) -- the a2a output keeps (source, token) order.
        keys, rows, ks, experts, recv_weights = [], [], [], [], []
        offset = 0
        for s in range(world):
            tokens_here = torch.nonzero(self.dest[s][:, r]).flatten()
            idx = self.idx[s][tokens_here]
            hit = (idx // local) == r
            # A compact row's weights: the (token, k) scalars whose expert is local, else 0.
            recv_weights.append(torch.where(hit, self.weights[s][tokens_here],
                                            torch.zeros(())))
            j, k = torch.nonzero(hit, as_tuple=True)
            e = idx[j, k] - r * local
            keys.append(((e * world + s) * max(1, self.tokens) + j) * self.topk + k)
            rows.append(offset + j)
            ks.append(k)
            experts.append(e)
            offset += len(tokens_here)
        keys, rows, ks, experts = torch.cat(keys), torch.cat(rows), torch.cat(ks), \
            torch.cat(experts)
        self.recv_weights = torch.cat(recv_weights)  # [N, K] fp32
        order = torch.argsort(keys)
        self.order_rows = rows[order]  # a2a output row feeding each real expanded row
        self.order_k = ks[order]  # and the k of that row's (token, k)
        experts = experts[order]
        per_expert = torch.bincount(experts, minlength=local)
        padded = (per_expert + alignment - 1) // alignment * alignment
        offsets = torch.zeros(local + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(padded, 0)
        group_start = torch.zeros(local + 1, dtype=torch.long)
        group_start[1:] = torch.cumsum(per_expert, 0)
        rank_in_expert = torch.arange(len(experts)) - group_start[experts]
        self.dst_rows = offsets[experts] + rank_in_expert  # real expanded row positions
        self.num_rows = int(offsets[-1])  # M
        self.offsets = offsets.tolist()
        self.gather_full = torch.zeros(self.num_rows, dtype=torch.long)  # padding reads row 0
        self.gather_full[self.dst_rows] = self.order_rows
        return self


def random_bf16(rows, hidden, device):
    return torch.randn(rows, hidden, device=device).to(torch.bfloat16)


def random_fp8(rows, hidden, device):
    """(e4m3 data, fp32 scales per 128 columns); uint8 bits where torch has no float8."""
    data = torch.randn(rows, hidden, device=device)
    data = data.to(FLOAT8) if FLOAT8 is not None else (data * 16).to(torch.int16).to(torch.uint8)
    scales = torch.rand(rows, hidden // 128, device=device) + 0.5
    return data, scales

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CHUNK_ROWS = 4096  # rows per fp64 temporary, so the oracle's memory stays small at 8192 tokens
GRAD_WEIGHTS_TOLERANCE = 1e-5
BACKWARD_OK = "ok (grad_weights rel 1e-5)"


def bits(tensor):
    """The tensor's bits as integers: equal bits, not merely equal values (+0 against -0)."""
    return tensor.view(INT_OF_SIZE[tensor.element_size()])


def difference(what, got, want):
    """"" if `got` has the shape and the bits of `want`, else what differs, in a few words."""
    if tuple(got.shape) != tuple(want.shape):
        return f"{what} shape {tuple(got.shape)}, want {tuple(want.shape)}"
    if got.dtype != want.dtype:
        return f"{what} dtype {got.dtype}, want {want.dtype}"
    bad = bits(got) != bits(want)
    count = int(bad.sum())
    if not count:
        return ""
    return (f"{what}: {count} of {got.numel()} values differ, the first at "
            f"{bad.nonzero()[0].tolist()}")


def fma(weight, x, acc):
    """fp32 fma(weight, x, acc) row by row with one rounding: the product of an fp32 weight and
    a bf16 value is exact in fp64, so the fp64 sum rounded to fp32 is the fused result barring
    a double-rounding tie (the emulation of tests/python/reference.py)."""
    return (weight.double()[:, None] * x.double() + acc.double()).float()


class Oracle:
    """The references of one configuration on one rank. Its exchanges are collective: every
    rank calls the same checks in the same order."""

    def __init__(self, cfg):
        self.cfg = cfg
        plan, device = cfg.plan, cfg.device
        self.compact_weights = plan.recv_weights.to(device)  # [N, K]
        expanded = torch.zeros(plan.num_rows)  # [M], 0 in padding rows
        expanded[plan.dst_rows] = plan.recv_weights[plan.order_rows, plan.order_k]
        self.expanded_weights = expanded.to(device)
        self._received = []  # (source rows, their compact rows): shared by several ops

    def _exchange(self, rows, num_out, out_splits, in_splits):
        """all_to_all_single of [*, C] rows of any dtype, as bytes."""
        row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
        out = torch.empty(num_out, row_bytes, dtype=torch.uint8, device=self.cfg.device)
        dist.all_to_all_single(out, rows.contiguous().view(torch.uint8), out_splits, in_splits)
        return out.view(rows.dtype)

    def received(self, rows):
        """This source's [S, C] rows -> [N, C] in compact order (source rank, then token): what
        a compact dispatch delivers here."""
        for source, compact in self._received:
            if source is rows:
                return compact
        plan = self.cfg.plan
        # As integers: index_select need not support every dtype (float8).
        sent = bits(rows).index_select(0, self.cfg.send_index)
        compact = self._exchange(sent, plan.num_recv, plan.out_splits, plan.in_splits)
        compact = compact.view(rows.dtype)
        self._received.append((rows, compact))
        return compact

    def returned(self, rows):
        """Compact rows [N, C] -> [sum(in_splits), C] in send order (destination rank, then
        token): what a combine brings back to this source."""
        plan = self.cfg.plan
        return self._exchange(rows, sum(plan.in_splits), plan.in_splits, plan.out_splits)

    def expert_sums(self, h, weights):
        """The expert side of an expanded combine: per compact row, fma(weight, row, acc) over
        its expanded rows in ascending k from +0, rounded to bf16."""
        cfg = self.cfg
        acc = torch.zeros(cfg.plan.num_recv, cfg.hidden, dtype=torch.float32, device=cfg.device)
        for k in range(cfg.topk):
            for terms in torch.nonzero(cfg.order_k == k).flatten().split(CHUNK_ROWS):
                n, row = cfg.order_rows[terms], cfg.dst_rows[terms]  # n unique for one k
                acc[n] = fma(weights[row], h[row], acc[n])
        return acc.to(torch.bfloat16)

    def source_sums(self, returned):
        """The source side of a combine: per token, the rows of the ranks it went to added in
        ascending rank order from +0 (fp32), rounded once to bf16."""
        cfg = self.cfg
        acc = torch.zeros(cfg.tokens, cfg.hidden, dtype=torch.float32, device=cfg.device)
        start = 0
        for count in cfg.plan.in_splits:  # destination ranks in ascending order
            tokens = cfg.send_index[start:start + count]  # each token once per rank
            acc[tokens] = acc[tokens] + returned[start:start + count].float()
            start += count
        return acc.to(torch.bfloat16)

    # -- the checks: each returns (problems, what "ok" says), problems empty when it passed --

    def dispatch(self, out, source):
        """A dispatch of `source` ([S, H] bf16 or (fp8 data, scales)) with the routing's
        weights: compact, expanded, cached or unsynced, as out.handle says."""
        cfg, handle = self.cfg, out.handle
        n = cfg.plan.num_recv
        m = cfg.plan.num_rows if handle.expand else n
        # Unsynced outputs have worst-case sizes: rows at and past N / M are unspecified.
        counts = ([handle.num_recv_tokens, handle.num_rows] if handle.counts_synced
                  else handle.device_counts.tolist())
        if counts != [n, m]:
            return [f"N, M = {counts}, want {[n, m]}"], "ok"
        if handle.expand and handle.expert_offsets.tolist() != cfg.plan.offsets:
            return ["expert offsets differ"], "ok"
        if isinstance(source, tuple):
            pairs = [("fp8 data", out.x[0], source[0]), ("fp8 scales", out.x[1], source[1])]
        else:
            pairs = [("x", out.x, source)]
        problems = []
        for what, got, rows in pairs:
            got, want = bits(got)[:m], bits(self.received(rows))
            if handle.expand:  # real rows only: padding rows of x are unspecified
                got = got.index_select(0, cfg.dst_rows)
                want = want.index_select(0, cfg.order_rows)
            problems.append(difference(what, got, want))
        want_weights = self.expanded_weights if handle.expand else self.compact_weights
        problems.append(difference("weights", out.weights[:m], want_weights))
        return [p for p in problems if p], "ok"

    def combine(self, out, h, weights=None):
        """A combine of expert-side rows `h`: compact [N, H], or expanded [M, H] with per-row
        `weights` (reduced on the expert side, the default)."""
        rows = h if weights is None else self.expert_sums(h, weights)
        want = self.source_sums(self.returned(rows))
        problems = [difference("y", out.x, want)]
        return [p for p in problems if p], "ok"

    def combine_backward(self, out, grad_y, x, weights):
        """(grad_x, grad_weights) of an expanded combine of `x` with `weights`: grad_x =
        bf16(w * g) exactly, grad_weights within the tolerance; padding rows 0."""
        cfg = self.cfg
        grad_x, grad_weights = out
        m = cfg.plan.num_rows
        g = self.received(grad_y)  # grad_y rows travel like a dispatch
        want_x = torch.zeros(m, cfg.hidden, dtype=torch.bfloat16, device=cfg.device)
        dot = torch.zeros(m, dtype=torch.float64, device=cfg.device)
        bound = torch.zeros(m, dtype=torch.float64, device=cfg.device)  # 0: exact in padding
        for chunk in torch.arange(len(cfg.dst_rows), device=cfg.device).split(CHUNK_ROWS):
            rows = cfg.dst_rows[chunk]
            g_rows = g.index_select(0, cfg.order_rows[chunk]).float()
            # One fp32 product, then one bf16 rounding.
            want_x[rows] = (weights[rows][:, None] * g_rows).to(torch.bfloat16)
            g64, x64 = g_rows.double(), x[rows].double()
            dot[rows] = (g64 * x64).sum(-1)
            bound[rows] = (g64.abs() * x64.abs()).sum(-1)
        problems = [difference("grad_x", grad_x, want_x)]
        if tuple(grad_weights.shape) != (m,) or grad_weights.dtype != torch.float32:
            problems.append(f"grad_weights {grad_weights.dtype} {tuple(grad_weights.shape)}, "
                            f"want float32 {(m,)}")
        else:
            over = (grad_weights.double() - dot).abs() > GRAD_WEIGHTS_TOLERANCE * bound
            if bool(over.any()):
                problems.append(f"grad_weights: {int(over.sum())} of {m} rows beyond "
                                f"{GRAD_WEIGHTS_TOLERANCE} of sum |g| |x|, the first "
                                f"{int(over.nonzero()[0])}")
        return [p for p in problems if p], BACKWARD_OK
