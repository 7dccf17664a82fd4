"""epx under torch.compile and in CUDA graphs: the custom operators (PyTorch >= 2.5; skipped
before) checked by torch.library.opcheck, epx.nn.ExpertParallelMoE compiled with
fullgraph=True (no graph break) giving the loss and gradients of the eager layer and of the
dense one, and a whole forward + backward step captured in a CUDA graph and replayed with new
routing (CUDA transports only)."""

import pytest

import epx
import rank_cases
from ranks import BACKENDS

needs_custom_ops = pytest.mark.skipif(
    not epx.functional.CUSTOM_OPS,
    reason="epx's custom operators need PyTorch >= 2.5 (torch.library.custom_op, ordered effects)")


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_operators_pass_opcheck(run_ranks, backend, expand):
    run_ranks(2, backend, rank_cases.opcheck_case, seed=400, expand=expand)


def check(reports, loss_tolerance, grad_tolerance):
    for rank, report in enumerate(reports):
        for step, entry in enumerate(report):
            for name in ("y", "x", "router", "w_in", "w_out"):
                assert entry[name] <= 2e-2, f"rank {rank} step {step}: {name} vs dense: {entry}"
            assert entry["loss_vs_eager"] <= loss_tolerance, f"rank {rank} step {step}: {entry}"
            assert entry["grads_vs_eager"] <= grad_tolerance, f"rank {rank} step {step}: {entry}"


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "compact"])
@pytest.mark.parametrize("grouped", [False, True], ids=["module-list", "stacked"])
def test_compiled_layer_matches_eager(run_ranks, backend, layout, grouped):
    """aot_eager: the graph torch.compile traces (custom ops, fake sizes, registered autograd)
    run as traced, so eager and compiled agree bit for bit."""
    check(run_ranks(2, backend, rank_cases.moe_layer_case, seed=401, layout=layout,
                    grouped=grouped, sync_counts=False, compile_backend="aot_eager"), 0.0, 0.0)


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiled_layer(run_ranks, backend):
    """inductor (CPU: C++ code generation) fuses the experts' arithmetic, so gradients may
    differ from eager in the last bits; the loss is the combine's bf16 output, the same. In the
    second step rank 1 holds no tokens: its graph, specialised to 0 tokens, must still run
    every exchange (a compiler that drops one leaves the peer waiting)."""
    check(run_ranks(2, backend, rank_cases.moe_layer_case, seed=402, layout="expanded",
                    grouped=False, sync_counts=False, compile_backend="inductor",
                    empty_rank=1, timeout=300), 1e-6, 1e-5)


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_refuses_synced_counts(run_ranks, backend):
    messages = run_ranks(2, backend, rank_cases.compile_synced_case, seed=403)
    assert all("sync_counts=False" in message for message in messages), messages


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "gloo"])
@pytest.mark.parametrize("layout", ["expanded", "compact"])
def test_cuda_graph_replays_forward_and_backward(run_ranks, backend, layout):
    assert all(run_ranks(2, backend, rank_cases.capture_case, seed=404, layout=layout))
