"""epx benchmark (DESIGN.md §6): epx dispatch/combine/combine_backward against the pipeline a
user would otherwise write (NCCL all_to_all_single, alone and with the permutation into expert
order) and the copy-engine peer bandwidth, in one process group and one run.

    python3 bench/bench.py --out bench/results            # full sweep on every visible GPU
    python3 bench/bench.py --tokens 4096 128 --quick      # a subset
    python3 bench/bench.py --smoke                        # tiny, gloo + host transport (no GPU)
    python3 bench/bench.py --plot-only bench/results/X.json

Timing: CUDA events around each operation, a barrier before every sample, warm-up, median of
--iters samples, the slowest rank's time per sample. Inputs rotate among enough copies to exceed
the L2 cache. Bandwidth counts the bytes of token rows (plus scalars) that cross NVLink into the
busiest rank (rows a rank sends to itself are local copies and are not counted); with one GPU
nothing crosses a link and every row is counted (marked "local").
"""

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

L2_BYTES = 60 * 2**20


def log(rank, *args):
    if rank == 0:
        print(*args, flush=True)


# ---- routing ----------------------------------------------------------------------------------

def make_routing(world, tokens, experts, topk, skewed, seed):
    """Every rank's top-k (all ranks compute all of it, so each knows the full traffic)."""
    gen = torch.Generator().manual_seed(seed)
    routes = []
    bias = torch.zeros(experts)
    if skewed:  # a quarter of the experts (those of the first ranks) draw most tokens
        bias[: max(1, experts // 4)] = 2.0
    for _ in range(world):
        scores = torch.randn(tokens, experts, generator=gen) + bias
        weights, idx = torch.topk(scores.softmax(-1), topk, dim=-1)
        routes.append((idx.to(torch.int64), weights.to(torch.float32)))
    return routes


def traffic(routes, world, local_experts):
    """counts[s][d] = tokens source s sends to rank d (once per token and rank)."""
    counts = [[0] * world for _ in range(world)]
    for s, (idx, _) in enumerate(routes):
        ranks = (idx // local_experts)
        for d in range(world):
            counts[s][d] = int((ranks == d).any(dim=1).sum())
    return counts


# ---- timing -----------------------------------------------------------------------------------

def time_op(fn, iters, warmup, device):
    """Median over samples of the slowest rank's time (us); fn(i) runs sample i."""
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize(device)
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(iters):
        dist.barrier()
        torch.cuda.synchronize(device)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        t = torch.tensor([start.elapsed_time(end) * 1000.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        samples.append(float(t.item()))
    return statistics.median(samples)


def link_limit(device_count, rank):
    """Copy-engine peer bandwidth cuda:0 -> cuda:1 (GB/s), measured by rank 0."""
    if rank != 0 or device_count < 2:
        return None, "single GPU: no peer link" if device_count < 2 else None
    try:
        src = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")
        dst = torch.empty(2**30, dtype=torch.uint8, device="cuda:1")
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(torch.cuda.current_stream("cuda:0"))
            dst.copy_(src, non_blocking=True)
            e.record(torch.cuda.current_stream("cuda:0"))
            e.synchronize()
            times.append(s.elapsed_time(e) / 1000.0)
        del src, dst
        return 2**30 / statistics.median(times) / 1e9, None
    except Exception as error:  # noqa: BLE001 - recorded, not fatal
        return None, f"copy-engine measurement failed: {error}"


# ---- one configuration ------------------------------------------------------------------------

def run_case(buf, args, rank, world, tokens, routing_name, device, seed):
    import epx  # noqa: F401  (imported in the worker after torch)

    hidden, experts, topk = args.hidden, args.experts, args.topk
    local_experts = experts // world
    routes = make_routing(world, tokens, experts, topk, routing_name == "skewed", seed)
    counts = traffic(routes, world, local_experts)
    idx, weights = routes[rank]
    idx, weights = idx.to(device), weights.to(device)
    row_bytes = hidden * 2
    copies = max(2, min(8, math.ceil(2 * L2_BYTES / max(1, tokens * row_bytes))))
    xs = [torch.randn(tokens, hidden, device=device).to(torch.bfloat16) for _ in range(copies)]

    def remote_rows_in(r):
        return sum(counts[s][r] for s in range(world) if s != r or world == 1)

    def remote_rows_out(r):
        return sum(counts[r][d] for d in range(world) if d != r or world == 1)

    disp_bytes = max(remote_rows_in(r) * (row_bytes + 4 * topk) for r in range(world))
    comb_bytes = max(remote_rows_out(r) * row_bytes for r in range(world))
    results = {}

    # epx
    compact = buf.dispatch(xs[0], idx, weights)
    expanded = buf.dispatch(xs[0], idx, weights, expand=True, expert_alignment=128)
    results["dispatch_compact"] = time_op(
        lambda i: buf.dispatch(xs[i % copies], idx, weights), args.iters, args.warmup, device)
    results["dispatch_expanded"] = time_op(
        lambda i: buf.dispatch(xs[i % copies], idx, weights, expand=True, expert_alignment=128),
        args.iters, args.warmup, device)
    results["dispatch_cached"] = time_op(
        lambda i: buf.dispatch(xs[i % copies], weights=weights, handle=expanded.handle),
        args.iters, args.warmup, device)
    h_compact = compact.x.clone()
    h_expanded = expanded.x.clone()
    results["combine_compact"] = time_op(
        lambda i: buf.combine(h_compact, compact.handle), args.iters, args.warmup, device)
    results["combine_expanded"] = time_op(
        lambda i: buf.combine(h_expanded, expanded.handle, weights=expanded.weights),
        args.iters, args.warmup, device)
    grad_y = torch.randn(tokens, hidden, device=device).to(torch.bfloat16)
    results["combine_backward"] = time_op(
        lambda i: buf.combine_backward(grad_y, expanded.handle, x=h_expanded,
                                       weights=expanded.weights),
        args.iters, args.warmup, device)

    # The unfused alternative to combine_backward: cached expanded dispatch, scale, row dot.
    def unfused_backward(i):
        rows = buf.dispatch(grad_y, handle=expanded.handle).x
        grad_x = (rows.float() * expanded.weights[:, None]).to(torch.bfloat16)
        grad_w = (rows.float() * h_expanded.float()).sum(-1)
        return grad_x, grad_w
    results["combine_backward_unfused"] = time_op(unfused_backward, args.iters, args.warmup,
                                                  device)

    # NCCL all_to_all_single on the same routing (each token row once per destination rank).
    nccl = {}
    try:
        dest = idx // local_experts
        per_dest = [torch.nonzero((dest == d).any(dim=1)).flatten() for d in range(world)]
        send_index = torch.cat(per_dest)
        in_splits = [counts[rank][d] for d in range(world)]
        out_splits = [counts[s][rank] for s in range(world)]
        recv = torch.empty(sum(out_splits), hidden, dtype=torch.bfloat16, device=device)
        sends = [x.index_select(0, send_index) for x in xs]
        nccl["a2a"] = time_op(
            lambda i: dist.all_to_all_single(recv, sends[i % copies], out_splits, in_splits),
            args.iters, args.warmup, device)
        back = torch.empty(sum(in_splits), hidden, dtype=torch.bfloat16, device=device)
        nccl["a2a_back"] = time_op(
            lambda i: dist.all_to_all_single(back, recv, in_splits, out_splits),
            args.iters, args.warmup, device)
        # With the permutation into expert order: index_select before, expanded gather after
        # (one gather per (token, k) local to this rank, grouped by expert).
        order = _expert_order(routes, rank, world, local_experts, counts, device)

        def a2a_permuted(i):
            send = xs[i % copies].index_select(0, send_index)
            dist.all_to_all_single(recv, send, out_splits, in_splits)
            return recv.index_select(0, order)
        nccl["a2a_permuted"] = time_op(a2a_permuted, args.iters, args.warmup, device)
    except Exception as error:  # noqa: BLE001
        nccl["error"] = str(error)
    return results, nccl, disp_bytes, comb_bytes


def _expert_order(routes, rank, world, local_experts, counts, device):
    """Row of the all-to-all output feeding each expanded row (expert, source, token, k)."""
    rows = []
    base = 0
    received = []  # per source: list of (token, [local experts])
    for s in range(world):
        idx = routes[s][0]
        dest = idx // local_experts
        toks = torch.nonzero((dest == rank).any(dim=1)).flatten().tolist()
        received.append((base, toks, idx))
        base += counts[s][rank]
    for e in range(local_experts):
        g = rank * local_experts + e
        for s, (offset, toks, idx) in enumerate(received):
            for j, t in enumerate(toks):
                rows.extend([offset + j] * int((idx[t] == g).sum()))
    return torch.tensor(rows, dtype=torch.int64, device=device)


# ---- the worker -------------------------------------------------------------------------------

def worker(rank, world, args, result_path):
    smoke = args.smoke
    backend = "gloo" if smoke else "nccl"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    if not smoke:
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    import epx
    device = torch.device("cpu") if smoke else torch.device("cuda", rank)
    link, link_note = (None, "smoke run") if smoke else link_limit(torch.cuda.device_count(), rank)
    link_t = torch.tensor([link or 0.0], device=device)
    dist.broadcast(link_t, 0)
    link = float(link_t.item()) or None
    cases = []
    notes = [n for n in [link_note] if n]
    buf = epx.Buffer(None, max_tokens_per_rank=max(args.tokens), hidden=args.hidden,
                     num_experts=args.experts, num_topk=args.topk, num_sms=args.num_sms)
    for routing in args.routing:
        for tokens in args.tokens:
            log(rank, f"[bench] {routing} routing, {tokens} tokens/rank ...")
            if smoke:
                _smoke_case(buf, args, rank, world, tokens, routing, device)
                continue
            try:
                epx_t, nccl_t, disp_bytes, comb_bytes = run_case(
                    buf, args, rank, world, tokens, routing, device, seed=tokens * 7 + len(routing))
            except Exception as error:  # noqa: BLE001
                notes.append(f"{routing}/{tokens}: {error}")
                log(rank, f"[bench]   failed: {error}")
                continue
            for op, t in epx_t.items():
                is_dispatch = op.startswith("dispatch")
                nbytes = disp_bytes if is_dispatch else comb_bytes
                nccl_us = nccl_t.get("a2a" if is_dispatch else "a2a_back")
                case = {
                    "op": op, "routing": routing, "tokens_per_rank": tokens,
                    "hidden": args.hidden, "num_experts": args.experts, "num_topk": args.topk,
                    "time_us": round(t, 2), "bytes": nbytes,
                    "gbps": round(nbytes / t / 1e3, 2) if t else None,
                    "nccl_time_us": round(nccl_us, 2) if nccl_us else None,
                    "nccl_gbps": round(nbytes / nccl_us / 1e3, 2) if nccl_us else None,
                    "nccl_permuted_time_us": round(nccl_t["a2a_permuted"], 2)
                    if "a2a_permuted" in nccl_t and is_dispatch else None,
                    "link_gbps": round(link, 1) if link else None,
                    "num_sms": args.num_sms or 24,
                    "bytes_counted": "remote rows into the busiest rank" if world > 1 else "local",
                }
                if case["nccl_time_us"]:
                    case["vs_nccl"] = round(case["nccl_time_us"] / t, 3)
                if case["nccl_permuted_time_us"]:
                    case["vs_nccl_permuted"] = round(case["nccl_permuted_time_us"] / t, 3)
                if link and case["gbps"]:
                    case["vs_link"] = round(case["gbps"] / link, 3)
                if op == "combine_backward":
                    case["vs_unfused"] = round(epx_t["combine_backward_unfused"] / t, 3)
                cases.append(case)
                log(rank, "  " + _row(case))
            if "error" in nccl_t:
                notes.append(f"nccl {routing}/{tokens}: {nccl_t['error']}")
            if rank == 0:
                _write(result_path, args, world, link, cases, notes)
    dist.barrier()
    dist.destroy_process_group()


def _smoke_case(buf, args, rank, world, tokens, routing, device):
    routes = make_routing(world, tokens, args.experts, args.topk, routing == "skewed", 1)
    idx, w = routes[rank]
    x = torch.randn(tokens, args.hidden).to(torch.bfloat16)
    r = buf.dispatch(x, idx, w, expand=True, expert_alignment=128)
    y = buf.combine(r.x, r.handle, weights=r.weights).x
    assert y.shape == x.shape
    log(rank, f"  smoke ok: {tokens} tokens, {r.handle.num_rows} expanded rows")


def _row(c):
    def f(v, spec):
        return format(v, spec) if v is not None else "-"
    return (f"{c['op']:<26} {c['routing']:<8} {c['tokens_per_rank']:>5}  "
            f"{f(c['time_us'], '9.1f')} us  {f(c['gbps'], '7.1f')} GB/s  "
            f"nccl {f(c['nccl_gbps'], '7.1f')} GB/s  link {f(c['link_gbps'], '6.1f')}  "
            f"x{f(c.get('vs_nccl'), '.2f')} vs nccl")


def _git_commit():
    if os.environ.get("EPX_COMMIT"):
        return os.environ["EPX_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def _write(path, args, world, link, cases, notes):
    meta = {"date": datetime.datetime.utcnow().isoformat() + "Z", "commit": _git_commit(),
            "num_ranks": world, "torch": torch.__version__, "link_gbps": link,
            "args": vars(args), "notes": notes}
    if torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
        try:
            meta["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            meta["nccl"] = "unknown"
        try:
            meta["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                text=True).splitlines()[0]
        except Exception:  # noqa: BLE001
            meta["driver"] = "unknown"
    with open(path, "w") as f:
        json.dump({**meta, "cases": cases}, f, indent=1)


def plot(path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = json.load(open(path))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for op, style in (("dispatch_expanded", "o-"), ("combine_expanded", "s-"),
                      ("dispatch_compact", "o--"), ("combine_compact", "s--")):
        pts = sorted((c["tokens_per_rank"], c["gbps"]) for c in data["cases"]
                     if c["op"] == op and c["routing"] == "uniform" and c["gbps"])
        if pts:
            ax.plot(*zip(*pts), style, label=f"epx {op}")
    pts = sorted((c["tokens_per_rank"], c["nccl_gbps"]) for c in data["cases"]
                 if c["op"] == "dispatch_compact" and c["routing"] == "uniform" and c["nccl_gbps"])
    if pts:
        ax.plot(*zip(*pts), "k^-", label="NCCL all_to_all_single")
    if data.get("link_gbps"):
        ax.axhline(data["link_gbps"], color="r", ls=":", label="copy-engine link limit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("GB/s into the busiest rank")
    ax.set_title(f"epx on {data.get('num_ranks')}x {data.get('gpu', '?')} (hidden "
                 f"{data['args']['hidden']}, top-{data['args']['topk']} of {data['args']['experts']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = os.path.splitext(path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 4096, 8192])
    p.add_argument("--routing", nargs="+", default=["uniform", "skewed"])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--num-sms", type=int, default=0)
    p.add_argument("--world", type=int, default=0, help="ranks (default: visible GPUs)")
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--quick", action="store_true", help="uniform routing only, 10 samples")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on gloo + host transport")
    p.add_argument("--plot-only", metavar="JSON")
    args = p.parse_args()
    if args.plot_only:
        print(plot(args.plot_only))
        return
    if args.quick:
        args.routing, args.iters = ["uniform"], 10
    if args.smoke:
        args.tokens, args.hidden, args.experts, args.topk = [16, 32], 128, 8, 2
        world = args.world or 2
    else:
        world = args.world or torch.cuda.device_count()
        args.experts = args.experts - args.experts % world
    os.makedirs(args.out, exist_ok=True)
    gpu = "cpu" if args.smoke else torch.cuda.get_device_name(0).replace(" ", "-")
    stamp = datetime.datetime.utcnow().strftime("%Y%m%d-%H%M%S")
    result_path = os.path.join(args.out, f"bench-{gpu}-{world}gpu-{stamp}.json")
    start = time.time()
    mp.spawn(worker, args=(world, args, result_path), nprocs=world, join=True)
    if os.path.exists(result_path):
        print(f"[bench] wrote {result_path} in {time.time() - start:.0f} s")
        try:
            print(f"[bench] plot {plot(result_path)}")
        except Exception as error:  # noqa: BLE001
            print(f"[bench] no plot: {error}")


if __name__ == "__main__":
    sys.exit(main())
