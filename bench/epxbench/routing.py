"""Top-k routing of every rank, and the layouts one rank receives under it.

Every rank computes every rank's top-k from the same seed, so each knows the whole traffic:
the rows crossing each link (the byte counts), the all-to-all splits of the NCCL baselines, and
where each received row lands in epx's compact and expanded layouts (docs/semantics.md), which
the NCCL pipelines rebuild and the oracle checks.
"""

import torch

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
