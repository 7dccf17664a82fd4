"""epx benchmark (DESIGN.md §6), one command:

    python3 bench/bench.py --out bench/results                 # full sweep, one rank per GPU
    python3 bench/bench.py --tokens 4096 128 --quick           # a subset (uniform, bf16 only)
    python3 bench/bench.py --smoke                             # tiny, gloo + host transport
    python3 bench/bench.py --plot-only bench/results/X.json    # redraw the plot of a JSON

One process per rank (torch.multiprocessing), one process group, one run: epx dispatch (compact,
expanded, cached expanded, unsynced counts, fp8), combine (compact, expanded weighted),
combine_backward; the same routing through NCCL all_to_all_single, alone and as the pipeline a
user would write (gather the send rows, all-to-all, permute into expert order / reduce); and
the copy-engine peer bandwidth (cuda:0 -> cuda:1, 1 GiB, measured in rank 0) as the link limit.

Timing: CUDA events around each call, warm-up calls, an all_reduce of one element plus a device
synchronisation before every sample, the slowest rank's time of each sample, the median over
--iters samples (>= 20). Inputs rotate among enough copies that each sample reads >= 2x L2.
Bytes: token rows (plus the fp32 weights a dispatch carries) that cross NVLink into a rank,
counted per rank without the rows a rank sends itself; `bytes` is the busiest rank's figure
and `gbps` = bytes / time. With one rank nothing crosses a link and every row is counted
(`bytes_counted` says so). See bench/README.md for every column.
"""

import os

# Before anything that could start NCCL or CUDA: no NVLink multicast on the lent machines.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

try:
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
except ImportError:  # --plot-only needs matplotlib alone
    torch = dist = mp = None

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT8 = getattr(torch, "float8_e4m3fn", None) if torch is not None else None
ROTATION_CAP_BYTES = 8 << 30  # at most this much memory per rotated input set

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


def say(*parts):
    print(*parts, flush=True)


def describe_error(error):
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) < 400 else text[:400] + " ..."


# ---- routing: every rank computes every rank's top-k, so each knows the whole traffic ----------

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
        # counts[s][d]: tokens source s sends to rank d (once per token and rank, DESIGN §2)
        self.counts = [[int(self.dest[s][:, d].sum()) for d in range(world)] for s in range(world)]

    def rows_in(self, r, direction):
        """Token rows arriving at rank r over the link (fwd: dispatch, back: combine)."""
        if direction == "fwd":
            pairs = [(s, r) for s in range(self.world)]
        else:
            pairs = [(r, d) for d in range(self.world)]
        return sum(self.counts[s][d] for s, d in pairs if s != d or self.world == 1)

    def plan(self, alignment):
        """This rank's all-to-all splits and the permutation into the expanded layout."""
        r, world, local = self.rank, self.world, self.local_experts
        send = [torch.nonzero(self.dest[r][:, d]).flatten() for d in range(world)]
        self.send_index = torch.cat(send) if send else torch.zeros(0, dtype=torch.long)
        self.in_splits = [self.counts[r][d] for d in range(world)]
        self.out_splits = [self.counts[s][r] for s in range(world)]
        self.num_recv = sum(self.out_splits)  # N: rows of the compact layout / a2a output
        # Expanded rows: one per (source, token, k) whose expert is here, ordered by (local
        # expert, source, token, k) -- the a2a output keeps (source, token) order.
        keys, rows, experts = [], [], []
        offset = 0
        for s in range(world):
            tokens_here = torch.nonzero(self.dest[s][:, r]).flatten()
            idx = self.idx[s][tokens_here]
            hit = (idx // local) == r
            j, k = torch.nonzero(hit, as_tuple=True)
            e = idx[j, k] - r * local
            keys.append(((e * world + s) * max(1, self.tokens) + j) * self.topk + k)
            rows.append(offset + j)
            experts.append(e)
            offset += len(tokens_here)
        keys, rows, experts = torch.cat(keys), torch.cat(rows), torch.cat(experts)
        order = torch.argsort(keys)
        self.order_rows = rows[order]  # a2a output row feeding each real expanded row
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


# ---- timing ------------------------------------------------------------------------------------

class Runner:
    """Collective timing and agreement between ranks; one per worker."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.cuda = device.type == "cuda"
        self.notes = []
        # Agreement, notes and results travel on a gloo group: no kernels on the GPUs.
        self.cpu_group = dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=args.nccl_timeout)) \
            if self.cuda else None
        self._token = torch.zeros(1, device=device)
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def barrier(self):
        """Before each sample: a one-element all_reduce on the device, then a synchronisation."""
        dist.all_reduce(self._token)
        self.sync()

    def agree(self, ok):
        """True on every rank if `ok` on every rank."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return bool(flag.item())

    def max_over_ranks(self, values):
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return tensor.tolist()

    def note(self, text):
        self.notes.append(text)
        if self.rank == 0:
            say(f"[bench]   note: {text}")

    def failed(self, what, error):
        """Agree on failure; every rank notes what each rank saw. True if anyone failed."""
        if self.agree(error is None):
            return False
        seen = [None] * self.world
        dist.all_gather_object(seen, error, group=self.cpu_group)
        detail = "; ".join(f"rank {r}: {e}" for r, e in enumerate(seen) if e)
        self.note(f"{what} skipped: {detail or 'failed'}")
        return True

    def worst_samples(self, run):
        """--iters samples of run(i), each after a barrier (CUDA events on the GPU, the host
        clock on the CPU): the slowest rank's time of each sample in us, sorted."""
        samples = []
        for i in range(self.args.iters):
            self.barrier()
            if self.cuda:
                self._start.record()
                run(i)
                self._end.record()
                self._end.synchronize()
                samples.append(self._start.elapsed_time(self._end) * 1e3)
            else:
                begin = time.perf_counter()
                run(i)
                samples.append((time.perf_counter() - begin) * 1e6)
        return sorted(self.max_over_ranks(samples))

    def measure(self, fn):
        """Per-sample max over ranks -> (median, min, p90) in us; fn(i) runs sample i."""
        for i in range(self.args.warmup):
            fn(i)
        self.sync()
        worst = self.worst_samples(fn)
        return {"median": statistics.median(worst), "min": worst[0],
                "p90": worst[min(len(worst) - 1, int(math.ceil(0.9 * len(worst))) - 1)]}

    def measure_graph(self, fn):
        """Like measure, for an op that never waits on the host: fn(0) captured once in a CUDA
        graph (after warm-up calls), each sample one replay. The device time without Python,
        the binding's host work and the kernel launches (what a CUDA-graph user pays)."""
        for i in range(self.args.warmup):
            fn(0)
        self.sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            keep = fn(0)  # outputs stay alive with the graph's memory pool
        graph.replay()
        self.sync()
        worst = self.worst_samples(lambda i: graph.replay())
        del keep, graph
        return statistics.median(worst)

    def timed_graph(self, name, fn):
        """measure_graph(fn) in us, or None on every rank (with a note) if any rank failed."""
        return self.timed(f"{name} (CUDA graph)", fn, self.measure_graph) if self.cuda else None

    def timed(self, name, fn, measure=None):
        """measure(fn) (default: self.measure), or None on every rank (with a note) if it raised
        on any rank."""
        error, stats = None, None
        try:
            stats = (measure or self.measure)(fn)
        except Exception as caught:  # noqa: BLE001 - recorded, the sweep goes on
            error = describe_error(caught)
        if self.failed(name, error):
            return None
        return stats


def rotation(nbytes_read, nbytes_alloc, l2_bytes):
    """How many copies of an input make the samples read >= 2x L2 between reuses."""
    if nbytes_alloc <= 0:
        return 1
    need = max(2, math.ceil(2 * l2_bytes / max(1, nbytes_read)))
    fit = max(2, ROTATION_CAP_BYTES // nbytes_alloc)
    return min(need, fit, 256)


def link_limit(runner):
    """Copy-engine bandwidth cuda:0 -> cuda:1 (GB/s, or None) measured in rank 0 while the
    other ranks wait on the CPU, and whether the copy was peer to peer; shared with all."""
    value, p2p, error = 0.0, 0.0, None
    if runner.rank == 0:
        try:
            if torch.cuda.device_count() < 2:
                raise RuntimeError("one GPU visible: no peer link to measure")
            p2p = 1.0 if torch.cuda.can_device_access_peer(0, 1) else 0.0
            if not p2p:
                runner.note("cuda:0 cannot access cuda:1 directly (no P2P): the copy below "
                            "goes through the host and is not the NVLink limit")
            size = 1 << 30
            src = torch.empty(size, dtype=torch.uint8, device="cuda:0")
            dst = torch.empty(size, dtype=torch.uint8, device="cuda:1")
            stream = torch.cuda.current_stream(torch.device("cuda:0"))
            times = []
            for i in range(13):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize("cuda:0")
                torch.cuda.synchronize("cuda:1")
                start.record(stream)
                dst.copy_(src, non_blocking=True)  # a peer copy on the source's stream
                end.record(stream)
                end.synchronize()
                torch.cuda.synchronize("cuda:1")
                if i >= 3:
                    times.append(start.elapsed_time(end) / 1e3)
            value = size / statistics.median(times) / 1e9
            del src, dst
            torch.cuda.empty_cache()
        except Exception as caught:  # noqa: BLE001
            error = describe_error(caught)
    value, p2p = runner.max_over_ranks([value, p2p])
    if error:
        runner.note(f"copy-engine link limit not measured: {error}")
    return (value or None), bool(p2p)


# ---- one configuration -------------------------------------------------------------------------

def random_bf16(rows, hidden, device):
    return torch.randn(rows, hidden, device=device).to(torch.bfloat16)


def random_fp8(rows, hidden, device):
    data = torch.randn(rows, hidden, device=device)
    data = data.to(FLOAT8) if FLOAT8 is not None else (data * 16).to(torch.int16).to(torch.uint8)
    scales = torch.rand(rows, hidden // 128, device=device) + 0.5
    return data, scales


def run_config(ctx, buf, buf8, routing_name, tokens, seed, report):
    """Times every op for one (routing, tokens) configuration; report(case) records each."""
    args, runner, device = ctx["args"], ctx["runner"], ctx["device"]
    rank, world, hidden, topk = runner.rank, runner.world, args.hidden, args.topk
    l2 = args.l2_mb * 1e6
    routing = Routing(args, world, rank, tokens, routing_name == "skewed", seed).plan(
        args.alignment)
    plan = routing
    n, m = plan.num_recv, plan.num_rows
    send_index = plan.send_index.to(device)
    order_rows, dst_rows = plan.order_rows.to(device), plan.dst_rows.to(device)
    gather_full = plan.gather_full.to(device)
    idx, weights = routing.idx[rank].to(device), routing.weights[rank].to(device)
    row_bf16, row_fp8 = 2 * hidden, hidden + 4 * (hidden // 128)
    if rank == 0:
        say(f"[bench] {routing_name} routing, {tokens} tokens/rank: rows into the busiest rank "
            f"{max(routing.rows_in(r, 'fwd') for r in range(world))} (dispatch), "
            f"{max(routing.rows_in(r, 'back') for r in range(world))} (combine); "
            f"rank 0 N={n} M={m}")

    def nbytes(direction, dtype, with_weights, reduce):
        per_row = (row_fp8 if dtype == "fp8" else row_bf16) + (4 * topk if with_weights else 0)
        values = [routing.rows_in(r, direction) * per_row for r in range(world)]
        return reduce(values)

    # Inputs, rotated so that consecutive samples do not find them in L2.
    copies_x = rotation(tokens * row_bf16, tokens * row_bf16, l2)
    xs = [random_bf16(tokens, hidden, device) for _ in range(copies_x)]
    grads = [random_bf16(tokens, hidden, device) for _ in range(copies_x)]
    copies_c = rotation(n * row_bf16, n * row_bf16, l2)
    hs_compact = [random_bf16(n, hidden, device) for _ in range(copies_c)]
    copies_e = rotation(len(dst_rows) * row_bf16, m * row_bf16, l2)
    hs_expanded = [random_bf16(m, hidden, device) for _ in range(copies_e)]
    w_expanded = torch.rand(m, device=device)

    times = {}
    graph_times = {}  # op -> median us of CUDA-graph replays (ops without host waits)

    # -- correctness of the comparison: epx's layouts equal what the NCCL pipeline builds --------
    check = "not run"
    recv = torch.empty(n, hidden, dtype=torch.bfloat16, device=device)
    compact = expanded = None
    error = None
    try:
        dist.all_to_all_single(recv.view(torch.uint8), xs[0].index_select(0, send_index)
                               .view(torch.uint8), plan.out_splits, plan.in_splits)
        runner.sync()
    except Exception as caught:  # noqa: BLE001
        error = describe_error(caught)
    baseline_ok = not runner.failed("all_to_all_single baseline", error)
    error = None
    if buf is not None:
        try:
            compact = buf.dispatch(xs[0], idx, weights)
            expanded = buf.dispatch(xs[0], idx, weights, expand=True,
                                    expert_alignment=args.alignment)
            runner.sync()
        except Exception as caught:  # noqa: BLE001
            error = describe_error(caught)
        if runner.failed("epx dispatch (first call)", error):
            compact = expanded = None
    if baseline_ok and compact is not None:
        mismatch = []
        if compact.handle.num_recv_tokens != n:
            mismatch.append(f"N {compact.handle.num_recv_tokens} != {n}")
        elif not torch.equal(compact.x, recv):
            mismatch.append("compact rows differ from the all-to-all output")
        if expanded.handle.num_rows != m or list(expanded.handle.host_expert_offsets) != \
                plan.offsets:
            mismatch.append(f"M {expanded.handle.num_rows} != {m} or expert offsets differ")
        elif not torch.equal(expanded.x.index_select(0, dst_rows),
                             recv.index_select(0, order_rows)):
            mismatch.append("expanded rows differ from the permuted all-to-all output")
        check = "ok" if runner.agree(not mismatch) else "mismatch"
        if check != "ok":
            seen = [None] * world
            dist.all_gather_object(seen, "; ".join(mismatch), group=runner.cpu_group)
            runner.note(f"{routing_name}/{tokens}: epx and the NCCL pipeline disagree: "
                        + "; ".join(f"rank {r}: {s}" for r, s in enumerate(seen) if s))

    # -- NCCL all_to_all_single, alone and as the pipeline a user would write --------------------
    if baseline_ok and not args.no_baseline:
        send_rows = sum(plan.in_splits)
        sends = [x.index_select(0, send_index) for x in xs]
        recv_u8 = recv.view(torch.uint8)
        back = torch.empty(send_rows, hidden, dtype=torch.bfloat16, device=device)
        back_u8 = back.view(torch.uint8)
        a2a = dist.all_to_all_single
        out_s, in_s = plan.out_splits, plan.in_splits
        times["nccl_a2a_fwd"] = runner.timed(
            "nccl_a2a_fwd", lambda i: a2a(recv_u8, sends[i % copies_x].view(torch.uint8),
                                          out_s, in_s))
        times["nccl_a2a_back"] = runner.timed(
            "nccl_a2a_back", lambda i: a2a(back_u8, hs_compact[i % copies_c].view(torch.uint8),
                                           in_s, out_s))
        if args.graphs:
            graph_times["nccl_a2a_fwd"] = runner.timed_graph(
                "nccl_a2a_fwd", lambda i: a2a(recv_u8, sends[0].view(torch.uint8), out_s, in_s))
            graph_times["nccl_a2a_back"] = runner.timed_graph(
                "nccl_a2a_back", lambda i: a2a(back_u8, hs_compact[0].view(torch.uint8),
                                               in_s, out_s))
        if not args.no_fp8:
            sends8 = [torch.empty(send_rows, row_fp8, dtype=torch.uint8, device=device)
                      for _ in range(rotation(send_rows * row_fp8, send_rows * row_fp8, l2))]
            recv8 = torch.empty(n, row_fp8, dtype=torch.uint8, device=device)
            times["nccl_a2a_fwd_fp8"] = runner.timed(
                "nccl_a2a_fwd_fp8", lambda i: a2a(recv8, sends8[i % len(sends8)], out_s, in_s))
            del sends8, recv8
        del sends
        expanded_out = torch.empty(m, hidden, dtype=torch.bfloat16, device=device)
        w_real = w_expanded.index_select(0, dst_rows)

        def dispatch_pipeline(i, expand):
            send = xs[i % copies_x].index_select(0, send_index)
            a2a(recv_u8, send.view(torch.uint8), out_s, in_s)
            if expand:
                torch.index_select(recv, 0, gather_full, out=expanded_out)

        def combine_pipeline(i, expand):
            if expand:  # expert side: weighted sum of a token's local rows, one row per token
                h = hs_expanded[i % copies_e]
                partial = torch.zeros(n, hidden, dtype=torch.float32, device=device)
                partial.index_add_(0, order_rows, h.index_select(0, dst_rows).float()
                                   * w_real[:, None])
                rows = partial.to(torch.bfloat16)
            else:
                rows = hs_compact[i % copies_c]
            a2a(back_u8, rows.view(torch.uint8), in_s, out_s)
            y = torch.zeros(tokens, hidden, dtype=torch.float32, device=device)
            y.index_add_(0, send_index, back.float())
            return y.to(torch.bfloat16)

        def backward_pipeline(i):
            send = grads[i % copies_x].index_select(0, send_index)
            a2a(recv_u8, send.view(torch.uint8), out_s, in_s)
            rows = recv.index_select(0, gather_full).float()
            grad_x = (rows * w_expanded[:, None]).to(torch.bfloat16)
            grad_w = (rows * hs_expanded[i % copies_e].float()).sum(-1)
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
        del expanded_out
    for name, (direction, dtype) in NCCL_OPS.items():
        stats = times.get(name)
        if stats is None:
            continue
        case = {"impl": "nccl", "op": name, "routing": routing_name, "tokens_per_rank": tokens,
                "dtype": dtype, "check": check,
                **timing_fields(stats, nbytes(direction, dtype, False, max),
                                nbytes(direction, dtype, False, statistics.mean), world)}
        alone = {"fwd": "nccl_a2a_fwd_fp8" if dtype == "fp8" else "nccl_a2a_fwd",
                 "back": "nccl_a2a_back"}[direction]
        if graph_times.get(name):
            case["graph_time_us"] = round(graph_times[name], 2)
        if times.get(alone):  # a pipeline against the all-to-all inside it
            case["nccl_time_us"] = round(times[alone]["median"], 2)
            case["nccl_bytes"] = case["bytes"]
            case["nccl_gbps"] = gbps(case["bytes"], times[alone]["median"])
            case["vs_nccl"] = round(times[alone]["median"] / stats["median"], 3)
        report(case)

    # -- epx ----------------------------------------------------------------------------------
    if compact is None:
        return
    handle_c, handle_e, w_rows = compact.handle, expanded.handle, expanded.weights
    align = args.alignment
    epx_fns = {
        "dispatch_compact": lambda i: buf.dispatch(xs[i % copies_x], idx, weights),
        "dispatch_expanded": lambda i: buf.dispatch(xs[i % copies_x], idx, weights,
                                                    expand=True, expert_alignment=align),
        "dispatch_cached": lambda i: buf.dispatch(xs[i % copies_x], weights=weights,
                                                  handle=handle_e),
        "dispatch_compact_nosync": lambda i: buf.dispatch(xs[i % copies_x], idx, weights,
                                                          sync_counts=False),
        "dispatch_expanded_nosync": lambda i: buf.dispatch(
            xs[i % copies_x], idx, weights, expand=True, expert_alignment=align,
            sync_counts=False),
        "combine_compact": lambda i: buf.combine(hs_compact[i % copies_c], handle_c),
        "combine_expanded": lambda i: buf.combine(hs_expanded[i % copies_e], handle_e,
                                                  weights=w_rows),
        "combine_backward": lambda i: buf.combine_backward(
            grads[i % copies_x], handle_e, x=hs_expanded[i % copies_e], weights=w_rows),
    }
    if buf8 is not None:
        x8s = [random_fp8(tokens, hidden, device) for _ in range(
            rotation(tokens * row_fp8, tokens * row_fp8, l2))]
        epx_fns["dispatch_compact_fp8"] = lambda i: buf8.dispatch(x8s[i % len(x8s)], idx,
                                                                  weights)
        epx_fns["dispatch_expanded_fp8"] = lambda i: buf8.dispatch(
            x8s[i % len(x8s)], idx, weights, expand=True, expert_alignment=align)

    def unfused_backward(i):  # what combine_backward replaces: cached dispatch, scale, dot
        rows = buf.dispatch(grads[i % copies_x], handle=handle_e).x.float()
        grad_x = (rows * w_rows[:, None]).to(torch.bfloat16)
        grad_w = (rows * hs_expanded[i % copies_e].float()).sum(-1)
        return grad_x, grad_w

    for op, fn in epx_fns.items():
        stats = runner.timed(op, fn)
        if stats is None:
            continue
        direction, dtype, with_weights = EPX_OPS[op]
        case = {"impl": "epx", "op": op, "routing": routing_name, "tokens_per_rank": tokens,
                "dtype": dtype, "check": check,
                **timing_fields(stats, nbytes(direction, dtype, with_weights, max),
                                nbytes(direction, dtype, with_weights, statistics.mean), world)}
        alone, pipeline = BASELINE_OF[op]
        base = times.get(alone)
        if base:
            nccl_bytes = nbytes(direction, dtype, False, max)
            case["nccl_time_us"] = round(base["median"], 2)
            case["nccl_bytes"] = nccl_bytes
            case["nccl_gbps"] = gbps(nccl_bytes, base["median"])
            case["vs_nccl"] = round(base["median"] / stats["median"], 3)
        if pipeline and times.get(pipeline):
            case["nccl_pipeline_time_us"] = round(times[pipeline]["median"], 2)
            case["vs_nccl_pipeline"] = round(times[pipeline]["median"] / stats["median"], 3)
        if args.graphs and op in GRAPH_OPS:
            graph_us = runner.timed_graph(op, fn)
            if graph_us:
                case["graph_time_us"] = round(graph_us, 2)
                nccl_graph = graph_times.get(alone)
                if nccl_graph:
                    case["nccl_graph_time_us"] = round(nccl_graph, 2)
                    case["vs_nccl_graph"] = round(nccl_graph / graph_us, 3)
        if op == "combine_backward":
            unfused = runner.timed("combine_backward_unfused", unfused_backward)
            if unfused:
                case["unfused_time_us"] = round(unfused["median"], 2)
                case["vs_unfused"] = round(unfused["median"] / stats["median"], 3)
        report(case)


def gbps(nbytes, time_us):
    return round(nbytes / time_us / 1e3, 2) if time_us else None


def timing_fields(stats, bytes_max, bytes_mean, world):
    return {"time_us": round(stats["median"], 2), "time_us_min": round(stats["min"], 2),
            "time_us_p90": round(stats["p90"], 2), "bytes": int(bytes_max),
            "bytes_mean": int(bytes_mean), "gbps": gbps(bytes_max, stats["median"]),
            "bytes_counted": "rows into the busiest rank from other ranks" if world > 1
            else "local (one rank: every row, nothing crosses a link)"}


# ---- the worker --------------------------------------------------------------------------------

def worker(rank, world, args, result_path):
    try:
        run_worker(rank, world, args, result_path)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        raise


def make_buffer(epx, args, fp8):
    options = dict(max_tokens_per_rank=max(args.tokens), hidden=args.hidden,
                   num_experts=args.experts, num_topk=args.topk, fp8_dispatch=fp8,
                   timeout_seconds=args.epx_timeout)
    if args.num_sms:
        options["num_sms"] = args.num_sms
    return epx.Buffer(dist.group.WORLD, **options)


def configured_sms(buf):
    """The SMs (blocks per kernel) the buffer's kernels use; None on the host transport."""
    return int(buf.num_sms) or None


def run_worker(rank, world, args, result_path):
    started = time.time()
    torch.set_num_threads(max(1, min(8, (os.cpu_count() or 1) // world)))
    device = torch.device("cpu")
    if not args.smoke:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group("gloo" if args.smoke else "nccl", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.nccl_timeout))
    runner = Runner(args, rank, world, device)
    meta = metadata(args, world)
    if args.smoke:
        runner.note("smoke run: gloo + epx host transport on CPU tensors, host timers; the "
                    "'nccl' columns are gloo all_to_all_single; no link figure")
        link = None
    else:
        link, meta["link_p2p"] = link_limit(runner)
    if rank == 0:
        say(f"[bench] {world} rank(s), {meta.get('gpu', 'cpu')}, torch {meta['torch']}, "
            f"nccl {meta.get('nccl', 'n/a')}, commit {meta['commit'][:12]}, link "
            f"{'%.1f GB/s' % link if link else 'n/a'}")

    buf = buf8 = epx = None
    error = None
    try:
        import epx  # noqa: F811 - after torch and the process group, as a user would
    except Exception as caught:  # noqa: BLE001
        error = describe_error(caught)
    if not runner.failed("import epx (every epx op)", error):
        error = None
        try:
            buf = make_buffer(epx, args, False)
        except Exception as caught:  # noqa: BLE001
            error = describe_error(caught)
        if runner.failed("epx.Buffer (every epx op)", error):
            buf = None
        if buf is not None and not args.no_fp8:
            error = None
            try:
                buf8 = make_buffer(epx, args, True)
            except Exception as caught:  # noqa: BLE001
                error = describe_error(caught)
            if runner.failed("epx.Buffer(fp8_dispatch=True) (fp8 dispatch)", error):
                buf8 = None
    num_sms = configured_sms(buf) if buf is not None else None
    if buf is not None and num_sms is None:
        runner.note("num_sms: none (host transport, no kernels)")

    cases = []

    def report(case):
        case.update({"hidden": args.hidden, "num_experts": args.experts, "num_topk": args.topk,
                     "num_ranks": world, "expert_alignment": args.alignment,
                     "link_gbps": round(link, 1) if link else None,
                     "num_sms": num_sms if case["impl"] == "epx" else None})
        case["vs_link"] = round(case["gbps"] / link, 3) if link and case["gbps"] else None
        cases.append(case)
        if rank == 0:
            say("[bench]   " + table_row(case))
            write_json(result_path, meta, link, cases, runner.notes, args)

    configs = [(r, t) for r in args.routing for t in args.tokens]
    if rank == 0:
        write_json(result_path, meta, link, cases, runner.notes, args)
        say("[bench]   " + HEADER)
    for number, (routing_name, tokens) in enumerate(configs):
        over = args.budget_s and time.time() - started > args.budget_s
        if not runner.agree(not over):
            runner.note(f"time budget of {args.budget_s} s spent: skipped "
                        + ", ".join(f"{r}/{t}" for r, t in configs[number:]))
            break
        if rank == 0:
            say(f"[bench] ({number + 1}/{len(configs)}) {time.time() - started:.0f} s")
        seed = args.seed + 1009 * tokens + (7 if routing_name == "skewed" else 0)
        ctx = {"args": args, "runner": runner, "device": device}
        error = None
        try:
            run_config(ctx, buf, buf8, routing_name, tokens, seed, report)
        except Exception as caught:  # noqa: BLE001
            error = describe_error(caught)
            traceback.print_exc()
        runner.failed(f"{routing_name}/{tokens} (rest of the configuration)", error)
        if runner.cuda:
            torch.cuda.empty_cache()
    if rank == 0:
        write_json(result_path, meta, link, cases, runner.notes, args, done=True)
        say(f"[bench] finished in {time.time() - started:.0f} s")
    runner.barrier()
    del buf, buf8
    dist.destroy_process_group()


# ---- output ------------------------------------------------------------------------------------

def git_commit():
    """(commit, whether tracked files differ from it or None if unknown). $EPX_COMMIT wins: the
    device machine's copy of the repository can report a stale HEAD (tools/device-run.sh)."""
    if os.environ.get("EPX_COMMIT"):
        return os.environ["EPX_COMMIT"], None
    try:
        def git(*words):
            return subprocess.run(["git", "-C", REPO, *words], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        commit = git("rev-parse", "HEAD")
        if commit:
            return commit, bool(git("status", "--porcelain", "--untracked-files=no"))
    except Exception:  # noqa: BLE001
        pass
    return "unknown", None


def metadata(args, world):
    commit, dirty = git_commit()
    meta = {"commit": commit, "uncommitted_changes": dirty, "num_ranks": world,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname()}
    if not args.smoke and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["cuda"] = torch.version.cuda
        try:
            meta["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception as caught:  # noqa: BLE001
            meta["nccl"] = f"unknown ({describe_error(caught)})"
        try:
            meta["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
        except Exception:  # noqa: BLE001
            meta["driver"] = "unknown"
        meta["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
    else:
        meta["gpu"] = "cpu (smoke)"
    return meta


def write_json(path, meta, link, cases, notes, args, done=False):
    document = {**meta, "link_gbps": round(link, 1) if link else None, "complete": done,
                "args": {k: v for k, v in vars(args).items()}, "notes": list(notes),
                "cases": cases}
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(document, f, indent=1)
    os.replace(temporary, path)


def fmt(value, spec):
    """`value` formatted with `spec` ("9.1f"), or "-" in the same width."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "-".rjust(int(width or 1))
    return format(value, spec)


HEADER = (f"{'op':<32} {'routing':<8} {'tokens':>6} {'time_us':>9} {'GB/s':>7} "
          f"{'nccl_us':>9} {'nccl_GB/s':>9} {'pipe_us':>9} {'vs_nccl':>7} {'vs_pipe':>7} "
          f"{'vs_link':>7} {'graph_us':>8} {'nccl_gr':>7} {'sms':>4} check")


def table_row(c):
    return (f"{c['op']:<32} {c['routing']:<8} {c['tokens_per_rank']:>6} "
            f"{fmt(c.get('time_us'), '9.1f')} {fmt(c.get('gbps'), '7.1f')} "
            f"{fmt(c.get('nccl_time_us'), '9.1f')} {fmt(c.get('nccl_gbps'), '9.1f')} "
            f"{fmt(c.get('nccl_pipeline_time_us'), '9.1f')} {fmt(c.get('vs_nccl'), '7.2f')} "
            f"{fmt(c.get('vs_nccl_pipeline'), '7.2f')} {fmt(c.get('vs_link'), '7.2f')} "
            f"{fmt(c.get('graph_time_us'), '8.1f')} {fmt(c.get('nccl_graph_time_us'), '7.1f')} "
            f"{fmt(c.get('num_sms'), '4d')} {c.get('check', '-')}")


def print_table(document):
    say(f"\n== epx benchmark: {document.get('num_ranks')} x {document.get('gpu')}, commit "
        f"{str(document.get('commit'))[:12]}, nccl {document.get('nccl', '-')}, link "
        f"{fmt(document.get('link_gbps'), '.1f')} GB/s (copy engine)")
    say(HEADER)
    order = {"uniform": 0, "skewed": 1}
    for case in sorted(document["cases"], key=lambda c: (order.get(c["routing"], 2),
                                                         c["tokens_per_rank"],
                                                         c.get("impl", "epx") != "epx")):
        say(table_row(case))
    for note in document.get("notes", []):
        say(f"note: {note}")


def plot(path):
    """A PNG next to the JSON: GB/s against tokens per rank, one panel per routing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        document = json.load(f)
    cases = document["cases"]
    routings = [r for r in ("uniform", "skewed") if any(c["routing"] == r for c in cases)]
    if not routings:
        raise ValueError(f"{path}: no cases to plot")
    lines = [("dispatch_compact", "epx dispatch compact", "o-", "C0"),
             ("dispatch_expanded", "epx dispatch expanded", "o--", "C0"),
             ("dispatch_compact_fp8", "epx dispatch compact fp8", "o:", "C2"),
             ("combine_compact", "epx combine compact", "s-", "C1"),
             ("combine_expanded", "epx combine expanded", "s--", "C1"),
             ("nccl_a2a_fwd", "NCCL all_to_all_single (dispatch rows)", "^-", "k"),
             ("nccl_a2a_back", "NCCL all_to_all_single (combine rows)", "v-", "0.3"),
             ("nccl_dispatch_expanded_pipeline", "NCCL a2a + permutation (dispatch)", "^--",
              "0.5")]
    fig, axes = plt.subplots(1, len(routings), figsize=(6.5 * len(routings), 4.6),
                             squeeze=False)
    for ax, routing in zip(axes[0], routings):
        for op, label, style, color in lines:
            points = sorted((c["tokens_per_rank"], c["gbps"]) for c in cases
                            if c["op"] == op and c["routing"] == routing and c.get("gbps"))
            if points:
                ax.plot(*zip(*points), style, color=color, label=label)
        if document.get("link_gbps"):
            ax.axhline(document["link_gbps"], color="r", ls=":",
                       label=f"copy-engine link limit ({document['link_gbps']:.0f} GB/s)")
        ax.set_xscale("log", base=2)
        ticks = sorted({c["tokens_per_rank"] for c in cases if c["routing"] == routing})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("tokens per rank")
        ax.set_ylabel("GB/s into the busiest rank")
        ax.set_title(f"{routing} routing")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    args = document.get("args", {})
    fig.suptitle(f"epx on {document.get('num_ranks')} x {document.get('gpu')}, hidden "
                 f"{args.get('hidden')}, top-{args.get('topk')} of {args.get('experts')}, "
                 f"commit {str(document.get('commit'))[:10]}", fontsize=10)
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ---- main --------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 4096, 8192],
                   help="tokens per rank (default: 128 512 4096 8192)")
    p.add_argument("--routing", nargs="+", choices=["uniform", "skewed"],
                   default=["uniform", "skewed"])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--alignment", type=int, default=128, help="expert_alignment (expanded)")
    p.add_argument("--skew", type=float, default=1.0,
                   help="skewed routing: score bias of the favoured quarter of the experts")
    p.add_argument("--iters", type=int, default=20, help="timed samples (>= 20 for results)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-sms", type=int, default=0, help="epx SM budget (0: library default)")
    p.add_argument("--world", type=int, default=0,
                   help="ranks (default: every visible GPU; --smoke: 2)")
    p.add_argument("--l2-mb", type=float, default=60.0, help="L2 size the rotation defeats")
    p.add_argument("--budget-s", type=float, default=0,
                   help="skip the remaining configurations after this many seconds")
    p.add_argument("--epx-timeout", type=float, default=60.0, help="epx timeout_seconds")
    p.add_argument("--nccl-timeout", type=float, default=300.0,
                   help="process-group timeout: a hang becomes an error after this")
    p.add_argument("--no-fp8", action="store_true", help="skip fp8 dispatch")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the NCCL timings (the layout check still runs)")
    p.add_argument("--quick", action="store_true",
                   help="uniform routing, bf16 only, 3 warm-up calls (samples stay --iters)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on gloo + the epx host transport (no GPU needed)")
    p.add_argument("--no-graphs", action="store_true",
                   help="skip the CUDA-graph replay timings (graph_time_us)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--plot-only", metavar="JSON", help="redraw the plot of a results JSON")
    args = p.parse_args(argv)
    args.graphs = not args.no_graphs and not args.smoke
    if args.quick:
        args.routing, args.no_fp8, args.warmup = ["uniform"], True, min(args.warmup, 3)
    if args.smoke:
        if "--tokens" not in (argv if argv is not None else sys.argv):
            args.tokens = [16, 40]
        args.hidden, args.experts, args.topk, args.warmup = 256, 8, 2, min(args.warmup, 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        with open(args.plot_only) as f:
            print_table(json.load(f))
        say(f"[bench] plot {plot(args.plot_only)}")
        return 0
    if torch is None:
        say("[bench] PyTorch is not importable by this Python: only --plot-only works")
        return 2
    if args.smoke:
        world = args.world or 2
        gpu = "cpu"
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            say("[bench] no GPU visible: run with --smoke for the host-transport check")
            return 2
        world = args.world or torch.cuda.device_count()
        if world > torch.cuda.device_count():
            say(f"[bench] --world {world} but {torch.cuda.device_count()} GPU(s) visible")
            return 2
        gpu = torch.cuda.get_device_name(0)
    if args.iters < 20:
        say(f"[bench] warning: --iters {args.iters} < 20: not a result DESIGN §6 accepts")
    if args.experts % world:
        args.experts -= args.experts % world
        say(f"[bench] experts rounded down to {args.experts} to split over {world} ranks")
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in gpu)
    result_path = os.path.join(args.out, f"bench-{name}-{world}gpu-{stamp}.json")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    say(f"[bench] {world} rank(s) on {gpu}; results -> {result_path}")
    status = 0
    try:
        mp.spawn(worker, args=(world, args, result_path), nprocs=world, join=True)
    except Exception as caught:  # noqa: BLE001 - keep what was written so far
        say(f"[bench] a rank failed: {describe_error(caught)}")
        status = 1
    if not os.path.exists(result_path):
        say("[bench] no results written")
        return 1
    with open(result_path) as f:
        document = json.load(f)
    print_table(document)
    try:
        say(f"[bench] plot {plot(result_path)}")
    except Exception as caught:  # noqa: BLE001
        say(f"[bench] no plot: {describe_error(caught)}")
    say(f"[bench] json {result_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
