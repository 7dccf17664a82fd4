"""Trains an expert-parallel mixture-of-experts layer for a few steps with epx.

Each rank holds a slice of the experts; the router and the input projection are replicated
(their gradients are averaged over the ranks, as data-parallel weights would be). Tokens go to
their experts with epx.functional.dispatch and come back with epx.functional.combine; backward
runs through both, so the router learns through its top-k weights. The task is a toy
regression onto a fixed random "teacher" MoE, so the loss goes down within a few steps.

    python3 examples/train_moe.py                 # GPUs with NCCL when >= 2 are visible, else gloo
    python3 examples/train_moe.py --backend gloo --world 4 --layout compact
    torchrun --nproc-per-node 2 examples/train_moe.py

Needs the epx package (pip install --no-build-isolation ., or a CMake build and
PYTHONPATH=python:build/python, see python/README.md).
"""

import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import epx
import epx.functional as F


class ExpertParallelMoE(torch.nn.Module):
    """Router (linear -> softmax -> top-k, weights renormalised) and SiLU-MLP experts, of which
    this rank holds experts [rank * E_l, (rank + 1) * E_l)."""

    def __init__(self, buffer, hidden, ffn, num_experts, top_k, layout, alignment):
        super().__init__()
        self.buffer, self.top_k = buffer, top_k
        self.expand, self.alignment = layout == "expanded", alignment
        self.local_experts = num_experts // buffer.num_ranks
        self.router = torch.nn.Linear(hidden, num_experts, bias=False)
        self.w_in = torch.nn.Parameter(torch.randn(self.local_experts, hidden, ffn) * hidden ** -0.5)
        self.w_out = torch.nn.Parameter(torch.randn(self.local_experts, ffn, hidden) * ffn ** -0.5)

    def expert(self, e, rows):
        return torch.nn.functional.silu(rows.float() @ self.w_in[e]) @ self.w_out[e]

    def forward(self, x):  # x: [S, H] bf16 -> [S, H] bf16
        probs = torch.softmax(self.router(x.float()), dim=-1)
        weights, topk_idx = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        recv_x, recv_w, handle = F.dispatch(self.buffer, x, topk_idx, weights,
                                            expand=self.expand, expert_alignment=self.alignment)
        if self.expand:
            # Rows grouped by local expert, each segment padded to `alignment` rows: one GEMM
            # per expert over its segment (padding rows are zero and get no gradient).
            offsets = handle.host_expert_offsets
            h = torch.cat([self.expert(e, recv_x[offsets[e]:offsets[e + 1]])
                           for e in range(self.local_experts)])
            return F.combine(self.buffer, h.bfloat16(), handle, recv_w)
        # Compact: one row per (token, rank); this rank applies its experts' weights itself.
        local_k = handle.recv_topk_idx.long()
        h = torch.zeros(recv_x.shape, dtype=torch.float32, device=recv_x.device)
        for e in range(self.local_experts):
            coefficient = (recv_w * (local_k == e)).sum(dim=1, keepdim=True)
            h = h + coefficient * self.expert(e, recv_x)
        return F.combine(self.buffer, h.bfloat16(), handle)


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
    # Replicated weights start equal on every rank; experts differ per rank.
    torch.manual_seed(1234)
    embed = torch.nn.Linear(args.hidden, args.hidden).to(device)
    teacher = torch.nn.Linear(args.hidden, args.hidden).to(device)
    buffer = epx.Buffer(dist.group.WORLD, max_tokens_per_rank=args.tokens, hidden=args.hidden,
                        num_experts=args.experts, num_topk=args.topk)
    torch.manual_seed(1234 + rank)
    moe = ExpertParallelMoE(buffer, args.hidden, args.ffn, args.experts, args.topk, args.layout,
                            args.alignment).to(device)
    replicated = list(embed.parameters()) + list(moe.router.parameters())
    for p in replicated:
        dist.broadcast(p.data, src=0)
    optimizer = torch.optim.Adam(list(embed.parameters()) + list(moe.parameters()), lr=args.lr)
    if rank == 0:
        print(f"{world} ranks, {args.backend} -> epx {buffer.transport} transport; "
              f"{args.experts} experts ({moe.local_experts} per rank), top-{args.topk}, "
              f"{args.layout} layout", flush=True)

    generator = torch.Generator().manual_seed(99 + rank)
    for step in range(args.steps):
        # Ranks may hold different token counts (rank 1 holds none on odd steps).
        tokens = 0 if (world > 1 and rank == 1 and step % 2) else max(1, args.tokens - 7 * (rank % 2))
        inputs = torch.randn(tokens, args.hidden, generator=generator).to(device)
        with torch.no_grad():
            target = torch.tanh(teacher(inputs))
        y = moe(embed(inputs).bfloat16())
        squared = (y.float() - target).pow(2).sum()
        count = torch.tensor([float(tokens * args.hidden)], device=device)
        dist.all_reduce(count)
        loss = squared / count  # this rank's share of the global mean
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        for p in replicated:
            dist.all_reduce(p.grad)  # data-parallel weights: sum of the ranks' shares
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            print(f"step {step:3d}  loss {total.item():.5f}", flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["nccl", "gloo"], default=None,
                        help="default: nccl with >= 2 GPUs (epx built with CUDA), else gloo "
                             "(epx host transport)")
    parser.add_argument("--world", type=int, default=None, help="ranks to spawn (default 2)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64, help="max tokens per rank")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--layout", choices=["expanded", "compact"], default="expanded")
    parser.add_argument("--alignment", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
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
