"""A plain-torch oracle for dispatch and combine, written from docs/semantics.md alone.

It computes, from every rank's inputs, what one rank must receive (layouts, counts, handle
fields) and what one source rank must get back from combine, with the exact numerics of §3:
fp32 accumulation, weighted terms as one fused multiply-add, bf16 round-to-nearest-even.
Loops are per token: the test sizes are small, and the loops read like the contract.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import torch


def round_up(value, multiple):
    return (value + multiple - 1) // multiple * multiple


def fma(weight, x, acc):
    """fp32 fma(weight, x, acc) with one rounding: the product of an fp32 weight and a bf16
    value is exact in fp64, so fp64 multiply-add then one rounding to fp32 gives the fused
    result (barring a double-rounding tie, which these tests never meet)."""
    return (weight.double() * x.double() + acc.double()).float()


@dataclass
class Received:
    """What destination rank `rank` receives (docs/semantics.md)."""

    rank: int
    tokens: List[tuple]  # compact rows: (source rank, source token), in order
    recv_topk: torch.Tensor  # [N, K] local expert or -1
    expanded_rows: torch.Tensor  # [N, K] expanded row or -1
    tokens_per_expert: List[int]
    expert_offsets: List[int]  # E_l + 1 entries
    row_owner: List[Optional[tuple]] = field(default_factory=list)  # expanded row -> (n, k)

    @property
    def num_recv(self):
        return len(self.tokens)

    @property
    def num_rows(self):
        return self.expert_offsets[-1]

    def index_of(self, source, token):
        return self._index[(source, token)]

    def __post_init__(self):
        self._index = {key: n for n, key in enumerate(self.tokens)}


def receive_layout(topk_all, rank, num_experts, alignment):
    """The compact and expanded layouts of destination `rank` for every rank's topk_idx."""
    num_ranks = len(topk_all)
    local = num_experts // num_ranks
    num_topk = topk_all[0].shape[1]
    tokens = []
    for source in range(num_ranks):
        for token, experts in enumerate(topk_all[source].tolist()):
            if any(e >= 0 and e // local == rank for e in experts):
                tokens.append((source, token))
    recv_topk = torch.full((len(tokens), num_topk), -1, dtype=torch.int32)
    segments = [[] for _ in range(local)]
    for n, (source, token) in enumerate(tokens):
        for k, e in enumerate(topk_all[source][token].tolist()):
            if e >= 0 and e // local == rank:
                recv_topk[n, k] = e % local
                # (source, token, k) ascending within the expert: compact order, k inner.
                segments[e % local].append((n, k))
    offsets = [0]
    for segment in segments:
        offsets.append(offsets[-1] + round_up(len(segment), alignment))
    expanded_rows = torch.full((len(tokens), num_topk), -1, dtype=torch.int32)
    row_owner = [None] * offsets[-1]
    for e, segment in enumerate(segments):
        for i, (n, k) in enumerate(segment):
            expanded_rows[n, k] = offsets[e] + i
            row_owner[offsets[e] + i] = (n, k)
    return Received(rank, tokens, recv_topk, expanded_rows, [len(s) for s in segments], offsets,
                    row_owner)


def dispatch_outputs(layout, x_all, weights_all=None, aux_all=None, expand=False):
    """recv_x, recv_weights, recv_aux of `layout` (padding rows of recv_x are zero)."""
    hidden = x_all[0].shape[1]
    if not expand:
        rows = [x_all[s][t] for s, t in layout.tokens]
        recv_x = torch.stack(rows) if rows else x_all[0].new_zeros((0, hidden))

        def scalars(values_all):
            if values_all is None:
                return None
            out = torch.zeros(layout.recv_topk.shape, dtype=torch.float32)
            for n, (s, t) in enumerate(layout.tokens):
                here = layout.recv_topk[n] >= 0
                out[n] = torch.where(here, values_all[s][t], torch.zeros(()))
            return out

        return recv_x, scalars(weights_all), scalars(aux_all)
    recv_x = x_all[0].new_zeros((layout.num_rows, hidden))

    def row_scalars(values_all):
        if values_all is None:
            return None
        out = torch.zeros(layout.num_rows, dtype=torch.float32)
        for row, owner in enumerate(layout.row_owner):
            if owner is not None:
                s, t = layout.tokens[owner[0]]
                out[row] = values_all[s][t, owner[1]]
        return out

    for row, owner in enumerate(layout.row_owner):
        if owner is not None:
            s, t = layout.tokens[owner[0]]
            recv_x[row] = x_all[s][t]
    return recv_x, row_scalars(weights_all), row_scalars(aux_all)


def combine_output(source, topk_all, layouts, x_rows, weights_rows=None, scalars_rows=None,
                   bias=(), expand=True, reduce_at="expert", num_experts=None):
    """y [S, H] bf16 and combined scalars [S, K] of `source`, from every rank's expert-side
    tensors (x_rows[r]: expanded [M_r, H] / compact [N_r, H]; weights_rows[r]: [M_r];
    scalars_rows[r]: expanded [M_r] / compact [N_r, K])."""
    num_ranks = len(layouts)
    local = num_experts // num_ranks
    topk = topk_all[source]
    num_tokens, num_topk = topk.shape
    hidden = x_rows[0].shape[1]
    y = torch.zeros((num_tokens, hidden), dtype=torch.bfloat16)
    combined = torch.zeros((num_tokens, num_topk), dtype=torch.float32)
    for t in range(num_tokens):
        acc = torch.zeros(hidden, dtype=torch.float32)
        if expand and reduce_at == "source":
            for k, e in enumerate(topk[t].tolist()):
                if e < 0:
                    continue
                r = e // local
                row = int(layouts[r].expanded_rows[layouts[r].index_of(source, t), k])
                value = x_rows[r][row].float()
                acc = (fma(weights_rows[r][row], value, acc) if weights_rows is not None
                       else acc + value)
        else:
            for r in range(num_ranks):
                if (source, t) not in layouts[r]._index:
                    continue
                n = layouts[r].index_of(source, t)
                if not expand:
                    acc = acc + x_rows[r][n].float()
                    continue
                partial = torch.zeros(hidden, dtype=torch.float32)
                for k in range(num_topk):
                    row = int(layouts[r].expanded_rows[n, k])
                    if row < 0:
                        continue
                    value = x_rows[r][row].float()
                    partial = (fma(weights_rows[r][row], value, partial)
                               if weights_rows is not None else partial + value)
                acc = acc + partial.bfloat16().float()
        for b in bias:
            acc = acc + b[t].float()
        y[t] = acc.bfloat16()
        if scalars_rows is not None:
            for k, e in enumerate(topk[t].tolist()):
                if e < 0:
                    continue
                r = e // local
                n = layouts[r].index_of(source, t)
                if expand:
                    combined[t, k] = scalars_rows[r][int(layouts[r].expanded_rows[n, k])]
                else:
                    combined[t, k] = scalars_rows[r][n, k]
    return y, (combined if scalars_rows is not None else None)


def combine_backward_outputs(layout, grad_y_all, x_rows, weights_rows):
    """grad_x [M, H] bf16 (bf16(w * g), exact) and grad_weights [M] (fp64 dot, as reference)."""
    hidden = x_rows.shape[1]
    grad_x = torch.zeros((layout.num_rows, hidden), dtype=torch.bfloat16)
    grad_w = torch.zeros(layout.num_rows, dtype=torch.float64)
    for row, owner in enumerate(layout.row_owner):
        if owner is None:
            continue
        s, t = layout.tokens[owner[0]]
        g = grad_y_all[s][t].float()
        grad_x[row] = (weights_rows[row] * g).bfloat16()
        grad_w[row] = torch.dot(g.double(), x_rows[row].double())
    return grad_x, grad_w
