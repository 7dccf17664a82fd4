"""epx.nn.ExpertParallelMoE against the same layer on one device (fp64): y and the gradients of
the input, the router and the experts, in both layouts, with experts as a list of modules or as
stacked weights, with counts synced to the host or kept on the device. Then the layer under
torch.compile and in CUDA graphs: the custom operators (PyTorch >= 2.5; skipped before) checked
by torch.library.opcheck, the layer compiled with fullgraph=True (no graph break) giving the
loss and gradients of the eager layer and of the dense one, and a whole forward + backward step
captured in a CUDA graph and replayed with new routing (CUDA transports only). Last, epx inside
a transformers model and the training example."""

import pytest

import epx
import gradient_cases
from ranks import BACKENDS

TOLERANCE = 2e-2


def check(reports):
    for rank, report in enumerate(reports):
        for step, entry in enumerate(report):
            for name in ("y", "x", "router", "w_in", "w_out"):
                assert entry[name] <= TOLERANCE, (
                    f"rank {rank} step {step}: {name} relative error {entry[name]:.3g}: {entry}")
    return reports


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expanded", "compact"])
@pytest.mark.parametrize("grouped", [False, True], ids=["module-list", "stacked"])
@pytest.mark.parametrize("sync_counts", [True, False], ids=["synced", "unsynced"])
def test_layer_matches_dense(run_ranks, backend, layout, grouped, sync_counts):
    check(run_ranks(2, backend, gradient_cases.moe_layer_case, seed=300, layout=layout,
                    grouped=grouped, sync_counts=sync_counts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_on_three_ranks_renormalized(run_ranks, backend):
    check(run_ranks(3, backend, gradient_cases.moe_layer_case, seed=301, layout="expanded",
                    grouped=False, sync_counts=True, renormalize=True))


needs_custom_ops = pytest.mark.skipif(
    not epx.functional.CUSTOM_OPS,
    reason="epx's custom operators need PyTorch >= 2.5 (torch.library.custom_op, ordered effects)")


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_operators_pass_opcheck(run_ranks, backend, expand):
    run_ranks(2, backend, gradient_cases.opcheck_case, seed=400, expand=expand)


def check_compiled(reports, loss_tolerance, grad_tolerance):
    for rank, report in enumerate(reports):
        for step, entry in enumerate(report):
            for name in ("y", "x", "router", "w_in", "w_out"):
                assert entry[name] <= 2e-2, f"rank {rank} step {step}: {name} vs dense: {entry}"
            assert entry["loss_vs_eager"] <= loss_tolerance, f"rank {rank} step {step}: {entry}"
            assert entry["grads_vs_eager"] <= grad_tolerance, f"rank {rank} step {step}: {entry}"


# One rank too: the CUDA transport's one-rank NCCL communicator is what one GPU can run.
@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("layout", ["expanded", "compact"])
@pytest.mark.parametrize("grouped", [False, True], ids=["module-list", "stacked"])
def test_compiled_layer_matches_eager(run_ranks, backend, world, layout, grouped):
    """aot_eager: the graph torch.compile traces (custom ops, fake sizes, registered autograd)
    run as traced, so eager and compiled agree bit for bit."""
    reports = run_ranks(world, backend, gradient_cases.moe_layer_case, seed=401, layout=layout,
                        grouped=grouped, sync_counts=False, compile_backend="aot_eager")
    check_compiled(reports, 0.0, 0.0)


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiled_layer(run_ranks, backend):
    """inductor (CPU: C++ code generation) fuses the experts' arithmetic, so gradients may
    differ from eager in the last bits; the loss is the combine's bf16 output, the same. In the
    second step rank 1 holds no tokens: its graph, specialised to 0 tokens, must still run
    every exchange (a compiler that drops one leaves the peer waiting)."""
    reports = run_ranks(2, backend, gradient_cases.moe_layer_case, seed=402, layout="expanded",
                        grouped=False, sync_counts=False, compile_backend="inductor",
                        empty_rank=1, timeout=300)
    check_compiled(reports, 1e-6, 1e-5)


@needs_custom_ops
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_refuses_synced_counts(run_ranks, backend):
    messages = run_ranks(2, backend, gradient_cases.compile_synced_case, seed=403)
    assert all("sync_counts=False" in message for message in messages), messages


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "gloo"])
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("layout", ["expanded", "compact"])
def test_cuda_graph_replays_forward_and_backward(run_ranks, backend, world, layout):
    assert all(run_ranks(world, backend, gradient_cases.capture_case, seed=404, layout=layout))


def _transformers_skip_reason():
    try:
        from transformers.distributed import expert_parallel
    except ImportError as error:
        return f"transformers with expert parallelism is not installed ({error})"
    if not hasattr(expert_parallel, "EPImplementationInterface"):
        return "this transformers has no EPImplementationInterface"
    try:
        import accelerate  # noqa: F401 - from_pretrained(distributed_config=...) needs it
    except ImportError:
        return "accelerate is not installed (transformers' distributed loading needs it)"
    return None


@pytest.mark.skipif(_transformers_skip_reason() is not None,
                    reason=str(_transformers_skip_reason()))
def test_transformers_expert_parallel_model(run_ranks, tmp_path):
    """epx as transformers' EPImplementation in a tiny random Qwen3-MoE on 2 ranks (gloo, host
    transport): the logits, loss and every parameter's gradient of the same model on one
    device."""
    reports = run_ranks(2, "gloo", gradient_cases.transformers_case, seed=310, folder=str(tmp_path),
                        timeout=300)
    for rank, report in enumerate(reports):
        assert report["local_experts"] == 2 and report["epx_buffers"] == 1, report
        assert report["logits"] <= TOLERANCE and report["loss"] <= TOLERANCE, (rank, report)
        assert report["worst_grad"][1] <= TOLERANCE, (rank, report)


def test_training_example_follows_the_dense_model():
    """examples/train_moe.py on 2 ranks (gloo, host transport): its loss curve stays within the
    example's tolerance of the same model trained on one device (it exits non-zero otherwise)."""
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    package_roots = [os.path.dirname(folder) for folder in epx.__path__]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        package_roots + [os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "train_moe.py"),
                          "--backend", "gloo", "--steps", "40", "--print-every", "10"],
                         env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "largest relative difference between the curves" in run.stdout, run.stdout
