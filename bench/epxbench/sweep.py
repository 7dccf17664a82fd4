"""The per-rank worker: the process group, the epx buffers, the sweep over configurations, and
the record of every case (rank 0 rewrites the JSON after each one)."""

import datetime
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.distributed as dist

from . import REPO, describe_error, say
from .cases import (BASELINE_OF, EPX_OPS, GRAPH_OPS, NCCL_OPS, Config, epx_ops, time_nccl,
                    unfused_backward)
from .low_latency import LL_BASELINE_OF, LL_GRAPH_OPS, LL_OPS, LowLatency
from .report import HEADER, table_row, write_json
from .timing import Runner, link_limit


def gbps(nbytes, time_us):
    return round(nbytes / time_us / 1e3, 2) if time_us else None


def timing_fields(stats, bytes_max, bytes_mean, world):
    return {"time_us": round(stats["median"], 2), "time_us_min": round(stats["min"], 2),
            "time_us_p90": round(stats["p90"], 2), "bytes": int(bytes_max),
            "bytes_mean": int(bytes_mean), "gbps": gbps(bytes_max, stats["median"]),
            "bytes_counted": "rows into the busiest rank from other ranks" if world > 1
            else "local (one rank: every row, nothing crosses a link)"}


def new_case(cfg, impl, op, dtype, stats, direction, with_weights, check):
    return {"impl": impl, "op": op, "routing": cfg.routing_name, "tokens_per_rank": cfg.tokens,
            "dtype": dtype, "check": check,
            **timing_fields(stats, cfg.nbytes(direction, dtype, with_weights, max),
                            cfg.nbytes(direction, dtype, with_weights, statistics.mean),
                            cfg.world)}


def verify(cfg, op, fn, check, reference):
    """One call fn(0), its output checked by the oracle: the case's `check`, the same on every
    rank ("not run" without the reference's all-to-all); None (noted) if the call raised."""
    runner = cfg.runner
    out = runner.attempt(op, lambda: fn(0))
    if out is None:
        return None
    if not reference:
        return "not run"
    try:
        problems, ok = check(out)
    except Exception as caught:  # noqa: BLE001 - a check that cannot run is a failed check
        problems, ok = [f"the check raised {describe_error(caught)}"], "ok"
    detail = runner.gathered("; ".join(problems))
    if detail:
        runner.note(f"{cfg.routing_name}/{cfg.tokens} {op}: mismatch: {detail}")
        return f"mismatch: {detail}"
    return ok


def run_config(args, runner, buf, buf8, routing_name, tokens, seed, record):
    """Times every op for one (routing, tokens) configuration; record(case) keeps each."""
    cfg = Config(args, runner, routing_name, tokens, seed)
    if runner.rank == 0:
        say(f"[bench] {cfg.describe()}")
    # The reference's all-to-all of the first input: no baseline and no check without it.
    reference = runner.attempt("all_to_all_single baseline",
                               lambda: cfg.oracle.received(cfg.xs[0])) is not None
    first = None
    if buf is not None:  # the handles the cached dispatch and the combines replay
        first = runner.attempt("epx dispatch (first call)", lambda: (
            buf.dispatch(cfg.xs[0], cfg.idx, cfg.weights),
            buf.dispatch(cfg.xs[0], cfg.idx, cfg.weights, expand=True,
                         expert_alignment=args.alignment)))

    # -- NCCL all_to_all_single, alone and as the pipeline a user would write --------------------
    times, graph_times = {}, {}
    if reference and not args.no_baseline:
        times, graph_times = time_nccl(cfg)
    for name, (direction, dtype) in NCCL_OPS.items():
        stats = times.get(name)
        if stats is None:
            continue
        # No check: the all-to-all is the reference's own data path.
        case = new_case(cfg, "nccl", name, dtype, stats, direction, False, None)
        alone = {"fwd": "nccl_a2a_fwd_fp8" if dtype == "fp8" else "nccl_a2a_fwd",
                 "back": "nccl_a2a_back"}[direction]
        if graph_times.get(name):
            case["graph_time_us"] = round(graph_times[name], 2)
        if times.get(alone):  # a pipeline against the all-to-all inside it
            case["nccl_time_us"] = round(times[alone]["median"], 2)
            case["nccl_bytes"] = case["bytes"]
            case["nccl_gbps"] = gbps(case["bytes"], times[alone]["median"])
            case["vs_nccl"] = round(times[alone]["median"] / stats["median"], 3)
        record(case)

    # -- epx: each op checked once, then timed ---------------------------------------------------
    if first is None:
        return
    compact, expanded = first
    for op, (fn, check) in epx_ops(cfg, buf, buf8, compact, expanded).items():
        verdict = verify(cfg, op, fn, check, reference)
        stats = runner.timed(op, fn) if verdict is not None else None
        if stats is None:
            continue
        direction, dtype, with_weights = EPX_OPS[op]
        case = new_case(cfg, "epx", op, dtype, stats, direction, with_weights, verdict)
        alone, pipeline = BASELINE_OF[op]
        base = times.get(alone)
        if base:
            nccl_bytes = cfg.nbytes(direction, dtype, False, max)
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
            unfused = runner.timed("combine_backward_unfused",
                                   unfused_backward(cfg, buf, expanded))
            if unfused:
                case["unfused_time_us"] = round(unfused["median"], 2)
                case["vs_unfused"] = round(unfused["median"] / stats["median"], 3)
        record(case)

    if buf.low_latency_max_tokens >= tokens:
        time_low_latency(cfg, buf, buf8 if buf8 is not None and
                         buf8.low_latency_max_tokens >= tokens else None, times, record)


def time_low_latency(cfg, buf, buf8, times, record):
    """The low-latency ops (epxbench/low_latency.py): checked by one round, then timed; the
    NCCL all-to-all of the same run beside them (its rows once per token and rank, the LL
    rows once per (token, k))."""
    runner, world = cfg.runner, cfg.world
    ll = LowLatency(cfg, buf, buf8)
    verdicts = ll.verify(runner)
    for op, (fn, before, after) in ll.ops().items():
        if op not in verdicts:
            continue
        stats = runner.timed(op, fn, before, after)
        if stats is None:
            continue
        dtype = LL_OPS[op][0]
        case = {"impl": "epx", "op": op, "routing": cfg.routing_name,
                "tokens_per_rank": cfg.tokens, "dtype": dtype, "check": verdicts[op],
                **timing_fields(stats, ll.nbytes(op, max), ll.nbytes(op, statistics.mean),
                                world),
                "low_latency_max_tokens": ll.capacity}
        case["bytes_counted"] = ("(token, k) rows into the busiest rank from other ranks"
                                 if world > 1 else "local (one rank: every (token, k) row)")
        base = times.get(LL_BASELINE_OF.get(op))
        if base:
            nccl_bytes = cfg.nbytes("back" if op == "ll_combine" else "fwd", dtype, False, max)
            case["nccl_time_us"] = round(base["median"], 2)
            case["nccl_bytes"] = nccl_bytes
            case["nccl_gbps"] = gbps(nccl_bytes, base["median"])
            case["vs_nccl"] = round(base["median"] / stats["median"], 3)
        if cfg.args.graphs and op in LL_GRAPH_OPS:
            graph_us = runner.timed_graph(op, fn)
            if graph_us:
                case["graph_time_us"] = round(graph_us, 2)
        record(case)


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
    if args.low_latency_tokens and min(args.tokens) <= args.low_latency_tokens:
        options["low_latency_max_tokens"] = args.low_latency_tokens
    return epx.Buffer(dist.group.WORLD, **options)


def make_buffers(runner, args):
    """(bf16 buffer, fp8 buffer): None where that buffer could not be made (noted)."""
    try:
        import epx  # after torch and the process group, as a user would
    except Exception as caught:  # noqa: BLE001
        error = describe_error(caught)
    else:
        error = None
    if runner.failed("import epx (every epx op)", error):
        return None, None
    buf = runner.attempt("epx.Buffer (every epx op)", lambda: make_buffer(epx, args, False))
    buf8 = None
    if buf is not None and not args.no_fp8:
        buf8 = runner.attempt("epx.Buffer(fp8_dispatch=True) (fp8 dispatch)",
                              lambda: make_buffer(epx, args, True))
    return buf, buf8


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

    buf, buf8 = make_buffers(runner, args)
    # Which transport epx picked ("auto" may take NCCL or CUDA IPC): the figures depend on it.
    meta["transport"] = buf.transport if buf is not None else None
    # The SMs (blocks per kernel) the buffer's kernels use; none on the host transport.
    num_sms = (int(buf.num_sms) or None) if buf is not None else None
    if buf is not None and num_sms is None:
        runner.note("num_sms: none (host transport, no kernels)")

    cases = []

    def record(case):
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
        error = None
        try:
            run_config(args, runner, buf, buf8, routing_name, tokens, seed, record)
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


# ---- what ran where ----------------------------------------------------------------------------

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
