"""epx.nn.ExpertParallelMoE against the same layer on one device (fp64): y and the gradients of
the input, the router and the experts, in both layouts, with experts as a list of modules or as
stacked weights, with counts synced to the host or kept on the device."""

import pytest

import rank_cases
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
    check(run_ranks(2, backend, rank_cases.moe_layer_case, seed=300, layout=layout,
                    grouped=grouped, sync_counts=sync_counts))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_on_three_ranks_renormalized(run_ranks, backend):
    check(run_ranks(3, backend, rank_cases.moe_layer_case, seed=301, layout="expanded",
                    grouped=False, sync_counts=True, renormalize=True))


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
    reports = run_ranks(2, "gloo", rank_cases.transformers_case, seed=310, folder=str(tmp_path),
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

    import epx

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    package_roots = [os.path.dirname(folder) for folder in epx.__path__]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        package_roots + [os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, os.path.join(root, "examples", "train_moe.py"),
                          "--backend", "gloo", "--steps", "40", "--print-every", "10"],
                         env=environment, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "largest relative difference between the curves" in run.stdout, run.stdout
