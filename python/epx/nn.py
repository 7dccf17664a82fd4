"""epx.nn: an expert-parallel mixture-of-experts layer as a torch.nn.Module.

    moe = epx.nn.ExpertParallelMoE(buffer, router, experts)   # experts: this rank's E_l
    y = moe(x)                                                # x: [..., H], y like x

Each rank holds a slice of the experts (global experts [rank * E_l, (rank + 1) * E_l)); the
router is replicated (average its gradients over the ranks as for data-parallel weights).
Forward and backward run through epx.functional, so the layer works on every transport, under
torch.compile (sync_counts=False, PyTorch >= 2.4) and inside CUDA graphs (sync_counts=False).
"""

from typing import Sequence, Union

import torch

from . import functional as F
from .buffer import Buffer

LAYOUTS = ("expanded", "compact")


class ExpertParallelMoE(torch.nn.Module):
    """route -> dispatch -> experts -> combine.

    buffer: the layer's epx.Buffer; its num_experts is the router's output size and its
      num_topk the experts per token.
    router: a module mapping x [S, H] to logits [S, E]; a token's top-k weights are the softmax
      probabilities of its top-k experts (renormalised to sum to 1 with `renormalize`).
    experts: this rank's E_l experts, either
      - a sequence (list, nn.ModuleList) of E_l modules, each mapping rows [n, H] to [n, H]; or
      - one module called as experts(rows, local_expert_idx) -> [n, H], for experts whose
        weights are stacked ([E_l, ...] tensors: a grouped GEMM): local_expert_idx [n] int64 is
        the local expert of each row, -1 on rows that hold no token (their outputs are never
        read, but must be finite: their gradients are zero, and 0 * inf is NaN).
    layout: "expanded" (one row per (token, local expert), grouped by expert; combine applies
      the weights and its fused backward gives their gradient) or "compact" (one row per
      (token, rank); the experts' outputs are weighted here, before combine).
    expert_alignment: expanded segments padded to a multiple of this (GEMM tiles).
    sync_counts: False keeps the counts on the device (no host synchronisation: needed for
      torch.compile and CUDA graphs); rows are then the worst case and every expert of a
      sequence runs on all of them (a grouped module sees the -1 rows instead).
    """

    def __init__(self, buffer: Buffer, router: torch.nn.Module,
                 experts: Union[Sequence[torch.nn.Module], torch.nn.Module], *,
                 layout: str = "expanded", expert_alignment: int = 1, sync_counts: bool = True,
                 renormalize: bool = False):
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.buffer = buffer
        self.router = router
        self.grouped = isinstance(experts, torch.nn.Module) and not isinstance(
            experts, (torch.nn.ModuleList, torch.nn.Sequential))
        self.experts = experts if self.grouped else torch.nn.ModuleList(experts)
        if not self.grouped and len(self.experts) != buffer.local_experts:
            raise ValueError(f"{len(self.experts)} experts given, the buffer has "
                             f"{buffer.local_experts} per rank")
        self.expand = layout == "expanded"
        self.expert_alignment = expert_alignment
        self.sync_counts = sync_counts
        self.renormalize = renormalize

    def route(self, x):
        """(top-k weights [S, K] fp32, top-k expert ids [S, K] int64) of tokens x [S, H]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, topk_idx = probs.topk(self.buffer.num_topk, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, topk_idx

    def forward(self, x):
        tokens = x.reshape(-1, x.shape[-1])
        weights, topk_idx = self.route(tokens)
        recv_x, recv_weights, handle = F.dispatch(
            self.buffer, tokens.to(torch.bfloat16), topk_idx, weights, expand=self.expand,
            expert_alignment=self.expert_alignment, sync_counts=self.sync_counts)
        rows = recv_x.to(x.dtype)  # the experts compute in the layer's dtype; epx moves bf16
        if self.expand:
            out = self._expanded(rows, handle)
            y = F.combine(self.buffer, out.to(torch.bfloat16), handle, recv_weights)
        else:
            out = self._compact(rows, recv_weights, handle)
            y = F.combine(self.buffer, out.to(torch.bfloat16), handle)
        return y.to(x.dtype).reshape(x.shape)

    def _expanded(self, rows, handle):
        if self.grouped:
            return self.experts(rows, handle.local_expert_idx)
        offsets = handle.host_expert_offsets
        if offsets is not None:  # synced: each expert runs on its own segment alone
            return torch.cat([expert(rows[offsets[e]:offsets[e + 1]])
                              for e, expert in enumerate(self.experts)])
        expert_idx = handle.local_expert_idx.unsqueeze(1)
        out = torch.zeros_like(rows)
        for e, expert in enumerate(self.experts):
            out = torch.where(expert_idx == e, expert(rows), out)
        return out

    def _compact(self, rows, recv_weights, handle):
        local_k = handle.recv_topk_idx.long()  # [N, K]: the local expert of (row, k), or -1
        out = torch.zeros_like(rows, dtype=torch.float32)
        if self.grouped:
            for k in range(local_k.shape[1]):
                term = recv_weights[:, k:k + 1] * self.experts(rows, local_k[:, k]).float()
                out = out + torch.where(local_k[:, k:k + 1] >= 0, term, torch.zeros_like(term))
            return out
        for e, expert in enumerate(self.experts):
            coefficient = (recv_weights * (local_k == e)).sum(dim=1, keepdim=True)
            out = out + coefficient * expert(rows).float()
        return out
