"""Runs test code on several ranks: a pool of spawned processes, one per rank, each with a
torch.distributed group through a FileStore. Backends:
  - "gloo": epx's host transport, CPU tensors (runs everywhere);
  - "nccl": an NCCL group and epx's NCCL transport, one GPU per rank;
  - "ipc": a gloo group and epx's CUDA-IPC transport, CUDA tensors, rank r on GPU r % GPUs
    (so every rank count runs on one GPU).

A pool is started once per (world size, backend) and reused by every test: a test sends the
name of a module-level function to all ranks and gets back each rank's return value. Starting
processes (importing torch) is what costs time on a small machine; an exchange costs little.
A rank that raises, or does not answer in time, fails the test and retires the pool (its
peers may be stuck in a collective); the next test starts a fresh one.
"""

import importlib
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch.multiprocessing as mp

# Each exchange in these tests takes milliseconds; a peer that misses a barrier fails fast.
BUFFER_TIMEOUT_SECONDS = 30.0
JOB_TIMEOUT_SECONDS = 150.0


BACKENDS = ["gloo", "nccl", "ipc"]


def backend_skip_reason(backend, world):
    """Why `backend` cannot run `world` ranks here, or None."""
    if backend == "gloo":
        return None
    import torch

    import epx

    if not epx._C.built_with_cuda:
        return "epx was built without the CUDA transport"
    if not torch.cuda.is_available():
        return "torch.cuda is not available"
    if backend == "nccl" and torch.cuda.device_count() < world:
        return f"needs {world} GPUs, {torch.cuda.device_count()} visible"
    return None


@dataclass
class RankContext:
    """What a rank function receives as its first argument."""

    rank: int
    world: int
    backend: str
    device: object  # torch.device

    @property
    def on_gpu(self):
        return self.backend != "gloo"

    def buffer(self, **kwargs):
        import epx

        kwargs.setdefault("timeout_seconds", BUFFER_TIMEOUT_SECONDS)
        kwargs.setdefault("transport", {"gloo": "host", "nccl": "nccl", "ipc": "ipc"}[self.backend])
        return epx.Buffer(None, **kwargs)


def _worker(rank, world, backend, store_path, commands, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if backend == "gloo":
            device = torch.device("cpu")
        else:
            index = rank if backend == "nccl" else rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            device = torch.device("cuda", index)
        dist.init_process_group("nccl" if backend == "nccl" else "gloo",
                                init_method=f"file://{store_path}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=120))
        context = RankContext(rank, world, backend, device)
    except BaseException:
        results.put((rank, False, "rank setup failed:\n" + traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        job = commands.get()
        if job is None:
            break
        module_name, function_name, kwargs = job
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            results.put((rank, True, function(context, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except BaseException:
        pass


class RankPool:
    def __init__(self, world, backend):
        self.world = world
        self.backend = backend
        self.broken = False
        self._dir = tempfile.mkdtemp(prefix="epx-pytest-")
        context = mp.get_context("spawn")
        self._results = context.Queue()
        self._commands = [context.Queue() for _ in range(world)]
        self._processes = [
            context.Process(target=_worker, daemon=True,
                            args=(rank, world, backend, os.path.join(self._dir, "store"),
                                  self._commands[rank], self._results))
            for rank in range(world)
        ]
        for process in self._processes:
            process.start()
        self._collect("start", JOB_TIMEOUT_SECONDS)

    def run(self, function, timeout=JOB_TIMEOUT_SECONDS, **kwargs):
        """function(context, **kwargs) on every rank; the list of their results by rank."""
        if self.broken:
            raise RuntimeError("this rank pool failed before; start a new one")
        for commands in self._commands:
            commands.put((function.__module__, function.__name__, kwargs))
        return self._collect(function.__name__, timeout)

    def _collect(self, what, timeout):
        deadline = time.monotonic() + timeout
        answers = {}
        while len(answers) < self.world:
            try:
                rank, ok, payload = self._results.get(timeout=1.0)
                answers[rank] = (ok, payload)
                if not ok:  # its peers may now wait for it in vain: give them a moment only
                    deadline = min(deadline, time.monotonic() + 5.0)
                continue
            except queue.Empty:
                pass
            dead = [r for r, p in enumerate(self._processes) if not p.is_alive() and r not in answers]
            if dead or time.monotonic() > deadline:
                self.broken = True
                missing = sorted(set(range(self.world)) - set(answers))
                reason = f"exited (ranks {dead})" if dead else f"timed out after {timeout:.0f} s"
                details = "".join(f"\n--- rank {r} ---\n{p}" for r, (ok, p) in answers.items()
                                  if not ok)
                raise AssertionError(f"{what}: ranks {missing} {reason}{details}")
        failures = {r: p for r, (ok, p) in answers.items() if not ok}
        if failures:
            self.broken = True
            raise AssertionError(f"{what} failed on ranks {sorted(failures)}:" + "".join(
                f"\n--- rank {r} ---\n{p}" for r, p in sorted(failures.items())))
        return [answers[r][1] for r in range(self.world)]

    def close(self):
        for commands in self._commands:
            try:
                commands.put(None)
            except (OSError, ValueError):
                pass
        for process in self._processes:
            process.join(timeout=0 if self.broken else 10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        shutil.rmtree(self._dir, ignore_errors=True)
