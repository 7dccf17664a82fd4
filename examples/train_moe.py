"""Trains a small mixture-of-experts model with epx.nn.ExpertParallelMoE, next to the same
model on one device, and prints both loss curves.

Each rank holds a slice of the experts; the input projection and the router are replicated
(their gradients are summed over the ranks, as data-parallel weights would be). Tokens reach
their experts through epx's dispatch and come back through its combine; backward runs through
both, so the router learns through its top-k weights. The task is a toy regression onto a fixed
random "teacher". Rank 0 also trains the dense twin (every expert, every rank's tokens, fp32 on
one device) from the same initial weights with the same batches: the two curves differ only by
epx's bf16 rows, and the run fails when they drift apart by more than --tolerance.

    python3 examples/train_moe.py                 # GPUs with NCCL when >= 2 are visible, else gloo
    python3 examples/train_moe.py --backend gloo --world 4 --layout compact --steps 100
    python3 examples/train_moe.py --compile       # torch.compile(fullgraph=True), PyTorch >= 2.4
    torchrun --nproc-per-node 2 examples/train_moe.py

Needs the epx package (pip install --no-build-isolation ., or a CMake build and
PYTHONPATH=python:build/python, see python/README.md).
"""

import argparse
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import epx


class Expert(torch.nn.Module):
    """silu(x @ w_in) @ w_out."""

    def __init__(self, w_in, w_out):
        super().__init__()
        self.w_in, self.w_out = torch.nn.Parameter(w_in.clone()), torch.nn.Parameter(w_out.clone())

    def forward(self, rows):
        return torch.nn.functional.silu(rows @ self.w_in) @ self.w_out


class DenseMoE(torch.nn.Module):
    """The same layer on one device: every expert, the router's renormalised top-k weights."""

    def __init__(self, router, experts, top_k):
        super().__init__()
        self.router, self.experts, self.top_k = router, torch.nn.ModuleList(experts), top_k

    def forward(self, x):
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, topk_idx = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        y = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            coefficient = (weights * (topk_idx == e)).sum(dim=-1, keepdim=True)
            y = y + coefficient * expert(x)
        return y


def initial_weights(args):
    """Every weight of the model, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(1234)
    hidden, ffn, experts = args.hidden, args.ffn, args.experts
    return dict(embed=torch.randn(hidden, hidden, generator=g) * hidden ** -0.5,
                teacher=torch.randn(hidden, hidden, generator=g) * hidden ** -0.5,
                router=torch.randn(experts, hidden, generator=g) * hidden ** -0.5,
                w_in=torch.randn(experts, hidden, ffn, generator=g) * hidden ** -0.5,
                w_out=torch.randn(experts, ffn, hidden, generator=g) * ffn ** -0.5)


def linear(weight):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def batch(args, world, rank, step):
    """Rank `rank`'s tokens at `step` (rank 1 holds none on odd steps), the same wherever made."""
    g = torch.Generator().manual_seed(99 + 1000 * step + rank)
    tokens = 0 if (world > 1 and rank == 1 and step % 2) else max(1, args.tokens - 7 * (rank % 2))
    return torch.randn(tokens, args.hidden, generator=g)


def train(rank, world, args, init_method):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(args.backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    weights = initial_weights(args)
    buffer = epx.Buffer(dist.group.WORLD, max_tokens_per_rank=args.tokens, hidden=args.hidden,
                        num_experts=args.experts, num_topk=args.topk)
    local = buffer.local_experts
    first = rank * local
    embed, teacher = linear(weights["embed"]).to(device), linear(weights["teacher"]).to(device)
    moe = epx.nn.ExpertParallelMoE(
        buffer, linear(weights["router"]),
        [Expert(weights["w_in"][e], weights["w_out"][e]) for e in range(first, first + local)],
        layout=args.layout, expert_alignment=args.alignment,
        sync_counts=not args.compile, renormalize=True).to(device)
    step_moe = torch.compile(moe, fullgraph=True) if args.compile else moe
    replicated = list(embed.parameters()) + list(moe.router.parameters())
    optimizer = torch.optim.Adam(list(embed.parameters()) + list(moe.parameters()), lr=args.lr)
    dense = None
    if rank == 0:
        dense_embed = linear(weights["embed"]).to(device)
        dense = DenseMoE(linear(weights["router"]),
                         [Expert(weights["w_in"][e], weights["w_out"][e])
                          for e in range(args.experts)], args.topk).to(device)
        dense_optimizer = torch.optim.Adam(list(dense_embed.parameters()) +
                                           list(dense.parameters()), lr=args.lr)
        print(f"{world} ranks, {args.backend} -> epx {buffer.transport} transport; "
              f"{args.experts} experts ({local} per rank), top-{args.topk}, {args.layout} layout"
              f"{', compiled' if args.compile else ''}\n"
              f"{'step':>5}  {'epx (expert parallel)':>22}  {'one device':>12}", flush=True)

    worst = 0.0
    for step in range(args.steps):
        inputs = batch(args, world, rank, step).to(device)
        with torch.no_grad():
            target = torch.tanh(teacher(inputs))
        y = step_moe(embed(inputs))
        squared = (y - target).pow(2).sum()
        count = torch.tensor([float(inputs.shape[0] * args.hidden)], device=device)
        dist.all_reduce(count)
        loss = squared / count  # this rank's share of the global mean
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for p in replicated:
            dist.all_reduce(p.grad)  # data-parallel weights: sum of the ranks' shares
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if dense is not None:
            every = torch.cat([batch(args, world, r, step) for r in range(world)]).to(device)
            with torch.no_grad():
                dense_target = torch.tanh(teacher(every))
            dense_loss = (dense(dense_embed(every)) - dense_target).pow(2).mean()
            dense_optimizer.zero_grad()
            dense_loss.backward()
            dense_optimizer.step()
            drift = abs(total.item() - dense_loss.item()) / dense_loss.item()
            worst = max(worst, drift)
            if step % args.print_every == 0 or step == args.steps - 1:
                print(f"{step:5d}  {total.item():22.5f}  {dense_loss.item():12.5f}", flush=True)
    dist.destroy_process_group()
    if dense is not None:
        print(f"largest relative difference between the curves: {worst:.2e} "
              f"(tolerance {args.tolerance:g})", flush=True)
        if worst > args.tolerance:
            sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="default: nccl with >= 2 GPUs (epx built with CUDA), else gloo "
                             "(epx host transport)")
    parser.add_argument("--world", type=int, default=None, help="ranks to spawn (default 2)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--print-every", type=int, default=25)
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per rank")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--layout", choices=list(epx.nn.LAYOUTS), default="expanded")
    parser.add_argument("--alignment", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the MoE layer (fullgraph; counts kept on the device)")
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="largest relative difference allowed between the two loss curves")
    args = parser.parse_args()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.backend is None:
        args.backend = "nccl" if gpus >= 2 else "gloo"

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        train(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, "env://")
        return
    world = args.world or (min(gpus, 8) if args.backend == "nccl" else 2)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(train, args=(world, args, f"file://{folder}/store"), nprocs=world)


if __name__ == "__main__":
    main()
