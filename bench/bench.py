"""epx benchmark, one command (bench/README.md: what runs, how it is timed, every column):

    python3 bench/bench.py                                  # full sweep, one rank per GPU
    python3 bench/bench.py --tokens 4096 128 --quick        # a subset (uniform, bf16 only)
    python3 bench/bench.py --smoke --out /tmp/bench-smoke   # tiny, gloo + host transport
    python3 bench/bench.py --plot-only bench/baselines/h200x1.json   # redraw table and plot
    python3 bench/bench.py report [--markdown [--update-doc DOC]] bench/baselines/h200x1.json
    python3 bench/bench.py ncu-stalls prof.source-sass.csv [top]     # a profile's stalls

One process per rank, one process group, one run: epx dispatch (compact, expanded, cached
expanded, unsynced counts, fp8), combine (compact, expanded weighted) and combine_backward, the
low-latency dispatch, combine and round (up to --low-latency-tokens tokens), each checked
against a torch reference before it is timed; the same routing through NCCL
all_to_all_single, alone and as the pipeline a user would write; the copy-engine peer bandwidth
as the link limit. A run writes one current record per machine kind, replaced in place:
OUT/MACHINE.json and OUT/MACHINE.png (MACHINE: h200x8 for eight H200s; OUT: --out).
The code is the package bench/epxbench/.
"""

import os

# Before anything that could start NCCL or CUDA: no NVLink multicast on the lent machines.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

from epxbench import REPO, describe_error, say  # noqa: E402
from epxbench.report import failed_checks, machine_name, print_table  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def modified(path):
    """When `path` was last written (ns), None if it does not exist."""
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


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
    p.add_argument("--low-latency-tokens", type=int, default=256,
                   help="the buffers' low_latency_max_tokens: the LL ops run at the token "
                        "counts up to it (0: no LL ops)")
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the NCCL timings (the checks still run)")
    p.add_argument("--quick", action="store_true",
                   help="uniform routing, bf16 only, 3 warm-up calls (samples stay --iters)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes on gloo + the epx host transport (no GPU needed)")
    p.add_argument("--no-graphs", action="store_true",
                   help="skip the CUDA-graph replay timings (graph_time_us)")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "baselines"),
                   help="folder of the record MACHINE.json and its plot (default: "
                        "bench/baselines)")
    p.add_argument("--plot-only", metavar="JSON", help="redraw the table and plot of a record")
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
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:  # a record's figures (epxbench/report.py; no PyTorch needed)
        from epxbench.report import main as report
        return report(argv[1:])
    if argv[:1] == ["ncu-stalls"]:
        from epxbench.report import print_ncu_stalls
        if len(argv) not in (2, 3):
            say("usage: bench.py ncu-stalls PROFILE.source-sass.csv [top]")
            return 2
        print_ncu_stalls(argv[1], *(int(a) for a in argv[2:]))
        return 0
    args = parse_args(argv)
    if args.plot_only:
        from epxbench.plot import plot
        with open(args.plot_only) as f:
            print_table(json.load(f))
        say(f"[bench] plot {plot(args.plot_only)}")
        return 0
    try:  # here, not at the top: report, ncu-stalls and --plot-only need no PyTorch
        import torch
        import torch.multiprocessing as mp
    except ImportError:
        say("[bench] PyTorch is not importable by this Python: only report, ncu-stalls and "
            "--plot-only work")
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
        say(f"[bench] warning: --iters {args.iters} < 20: too few samples for a result")
    if args.experts % world:
        args.experts -= args.experts % world
        say(f"[bench] experts rounded down to {args.experts} to split over {world} ranks")
    os.makedirs(args.out, exist_ok=True)
    result_path = os.path.join(args.out, machine_name(gpu, world) + ".json")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    say(f"[bench] {world} rank(s) on {gpu}; results -> {result_path}")
    from epxbench.sweep import worker
    previous = modified(result_path)  # the record this run replaces, if any
    status = 0
    try:
        mp.spawn(worker, args=(world, args, result_path), nprocs=world, join=True)
    except Exception as caught:  # noqa: BLE001 - keep what was written so far
        say(f"[bench] a rank failed: {describe_error(caught)}")
        status = 1
    if modified(result_path) in (None, previous):
        say("[bench] no results written")
        return 1
    with open(result_path) as f:
        document = json.load(f)
    print_table(document)
    try:
        from epxbench.plot import plot
        say(f"[bench] plot {plot(result_path)}")
    except Exception as caught:  # noqa: BLE001
        say(f"[bench] no plot: {describe_error(caught)}")
    failed = failed_checks(document)
    if failed:
        say(f"[bench] {len(failed)} check(s) failed: "
            + ", ".join(f"{c['routing']}/{c['tokens_per_rank']} {c['op']}" for c in failed))
        status = 1
    say(f"[bench] json {result_path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
