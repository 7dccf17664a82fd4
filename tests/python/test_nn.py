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
