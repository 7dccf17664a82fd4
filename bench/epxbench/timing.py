"""How a sample is taken, and how ranks agree on what happened.

CUDA events around each call (the host clock on the CPU); warm-up calls first; before every
sample a one-element all_reduce on the device and a synchronisation, so that every rank starts
together; per sample the slowest rank's time; the median over --iters samples. Inputs rotate
among copies (rotation()) so that consecutive samples do not find them in L2.
"""

import datetime
import math
import statistics
import time

import torch
import torch.distributed as dist

from . import describe_error, say

ROTATION_CAP_BYTES = 8 << 30  # at most this much memory per rotated input set


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

    def gathered(self, text):
        """"" on every rank if `text` is empty on every rank, else what each rank said."""
        if self.agree(not text):
            return ""
        seen = [None] * self.world
        dist.all_gather_object(seen, text, group=self.cpu_group)
        return "; ".join(f"rank {r}: {s}" for r, s in enumerate(seen) if s)

    def note(self, text):
        self.notes.append(text)
        if self.rank == 0:
            say(f"[bench]   note: {text}")

    def failed(self, what, error):
        """Agree on failure; every rank notes what each rank saw. True if anyone failed."""
        detail = self.gathered(error or "")
        if detail:
            self.note(f"{what} skipped: {detail}")
        return bool(detail)

    def attempt(self, what, fn):
        """fn() on every rank, then a device synchronisation (an asynchronous error surfaces
        here); its result, or None on every rank (with a note) if it raised on any rank."""
        error, result = None, None
        try:
            result = fn()
            self.sync()
        except Exception as caught:  # noqa: BLE001 - recorded, the sweep goes on
            error = describe_error(caught)
        return None if self.failed(what, error) else result

    def worst_samples(self, run, before=None, after=None):
        """--iters samples of run(i), each after a barrier (CUDA events on the GPU, the host
        clock on the CPU): the slowest rank's time of each sample in us, sorted. before(i) and
        after(i), where given, run untimed around sample i (ops that must alternate with
        another: the low-latency dispatch and combine)."""
        samples = []
        for i in range(self.args.iters):
            if before:
                before(i)
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
            if after:
                after(i)
        return sorted(self.max_over_ranks(samples))

    def measure(self, fn, before=None, after=None):
        """Per-sample max over ranks -> (median, min, p90) in us; fn(i) runs sample i, between
        the untimed before(i) and after(i) where given (warm-up calls too)."""
        for i in range(self.args.warmup):
            if before:
                before(i)
            fn(i)
            if after:
                after(i)
        self.sync()
        worst = self.worst_samples(fn, before, after)
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
            keep = fn(0)  # noqa: F841 - its outputs stay allocated while the graph replays
        graph.replay()
        self.sync()
        return statistics.median(self.worst_samples(lambda i: graph.replay()))

    def timed(self, name, fn, before=None, after=None):
        """measure(fn, before, after), or None on every rank (with a note) if it raised on any
        rank."""
        return self.attempt(name, lambda: self.measure(fn, before, after))

    def timed_graph(self, name, fn):
        """measure_graph(fn) in us, or None on every rank (with a note) if any rank failed;
        None without CUDA."""
        if not self.cuda:
            return None
        return self.attempt(f"{name} (CUDA graph)", lambda: self.measure_graph(fn))


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
