"""epx inside Hugging Face transformers (>= 5.x), imported only when asked for.

transformers runs the experts of an MoE model whose expert-parallel plan has an
"ep_dispatch_experts" rule (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3, gpt-oss and others)
through the `EPImplementation` that `DistributedConfig.ep_implementation` names in
`transformers.distributed.expert_parallel.EPImplementationInterface`. `register_transformers`
adds epx's there:

    import epx.integrations
    epx.integrations.register_transformers(max_tokens_per_rank=4096)   # name "epx"
    model = AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(ep_size=world, fsdp_size=world,
                                                   ep_implementation="epx"))

Each rank keeps its own batch (data parallel, `tp_size=1`); every (token, expert) pair travels
to the expert's rank with epx's expanded dispatch and comes back weighted with its combine, so
gradients reach the hidden states and the routing weights on every rank (epx.functional).
"""

import weakref

import torch

from . import functional as F
from .buffer import Buffer

# Buffers by (group, sizes, options): the MoE layers of one model share one, whose staging
# every exchange reuses in turn, instead of one workspace per layer.
_SHARED_BUFFERS = weakref.WeakValueDictionary()


def transformers_ep_implementation(max_tokens_per_rank, *, expert_alignment=1, sync_counts=True,
                                   transport="auto", timeout_seconds=100.0):
    """An `EPImplementation` subclass running transformers' experts through epx.

    max_tokens_per_rank: the most tokens one rank hands one MoE layer in a forward (batch x
      sequence); more raise epx.EpxError. expert_alignment: expanded segments padded to this
      (the experts' grouped GEMM tiles). sync_counts=False keeps the counts on the device (CUDA
      graphs), at the price of running the experts' gathers over the worst-case rows.
    transport, timeout_seconds: as for epx.Buffer.
    """
    from transformers.distributed.expert_parallel import EPImplementation

    class EpxEP(EPImplementation):
        """Dispatch (expanded, by expert) -> this rank's experts -> weighted combine."""

        def __init__(self, experts, ep_mesh, tp_mesh):
            super().__init__(experts, ep_mesh, tp_mesh)
            if tp_mesh.size() > 1:
                raise ValueError("epx's expert parallelism takes a batch per rank (tp_size=1); "
                                 "with tensor parallelism use ep_implementation='all_to_all'")
            self.buffer = None  # made at the first forward, when the sizes are known

        def _buffer_for(self, hidden, num_topk):
            group = self.ep_mesh.get_group()
            num_experts = self.num_local_experts * self.ep_mesh.size()
            key = (group, max_tokens_per_rank, hidden, num_experts, num_topk, transport,
                   timeout_seconds)
            buffer = _SHARED_BUFFERS.get(key)
            if buffer is None:  # collective: every rank runs its first MoE layer together
                buffer = Buffer(group, max_tokens_per_rank=max_tokens_per_rank, hidden=hidden,
                                num_experts=num_experts, num_topk=num_topk,
                                timeout_seconds=timeout_seconds, transport=transport)
                _SHARED_BUFFERS[key] = buffer
            return buffer

        def __call__(self, hidden_states, top_k_index, top_k_weights):
            if self.buffer is None:
                self.buffer = self._buffer_for(hidden_states.shape[-1], top_k_index.shape[-1])
            recv_x, recv_weights, handle = F.dispatch(
                self.buffer, hidden_states.to(torch.bfloat16), top_k_index,
                top_k_weights.float(), expand=True, expert_alignment=expert_alignment,
                sync_counts=sync_counts)
            # One row per (token, local expert): the experts run top-1 with unit weights, and
            # rows holding no token get the id transformers' experts skip (num_local_experts).
            expert_idx = handle.local_expert_idx
            expert_idx = torch.where(expert_idx < 0, self.num_local_experts, expert_idx)
            rows = recv_x.to(hidden_states.dtype)
            out = self.experts_forward(rows, expert_idx.unsqueeze(1),
                                       torch.ones(rows.shape[0], 1, dtype=rows.dtype,
                                                  device=rows.device))
            y = F.combine(self.buffer, out.to(torch.bfloat16), handle, recv_weights)
            return y.to(hidden_states.dtype)

    return EpxEP


def register_transformers(max_tokens_per_rank, *, name="epx", **options):
    """Registers epx's EPImplementation with transformers under `name` (then
    `DistributedConfig(ep_implementation=name)` picks it); options as for
    transformers_ep_implementation. Returns the class."""
    from transformers.distributed.expert_parallel import EPImplementationInterface

    implementation = transformers_ep_implementation(max_tokens_per_rank, **options)
    EPImplementationInterface.register(name, implementation)
    return implementation
