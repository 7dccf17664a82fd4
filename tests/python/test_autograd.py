"""epx.functional through an expert-parallel MoE layer against the same layer on one device
(router linear -> softmax top-k weights -> experts -> weighted sum, optionally each term scaled
by 1 + aux): gradients of the input, the top-k (router) weights, the router, the experts and aux
agree within 2e-2 relative error, in both layouts, with counts synced or kept on the device."""

import pytest

import gradient_cases
from ranks import BACKENDS

TOLERANCE = 2e-2


def check(reports, steps=1):
    for rank, report in enumerate(reports):
        assert len(report) == steps
        for step, entry in enumerate(report):
            for name in ("x", "weights", "router", "experts", "aux"):
                if name in entry:
                    assert entry[name] <= TOLERANCE, (
                        f"rank {rank} step {step}: {name} gradient relative error "
                        f"{entry[name]:.3g} > {TOLERANCE}: {entry}")
    return reports


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", [(True, 1), (True, 16), (False, 1)],
                         ids=["expanded", "expanded-align16", "compact"])
def test_moe_gradients_match_dense_layer(run_ranks, backend, expand, alignment):
    check(run_ranks(2, backend, gradient_cases.moe_grad_case, seed=100, expand=expand,
                    alignment=alignment))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_masked_experts_and_a_rank_without_tokens(run_ranks, backend, expand):
    reports = check(run_ranks(3, backend, gradient_cases.moe_grad_case, seed=101, expand=expand,
                              alignment=4, mask_fraction=0.3, empty_rank=1, num_topk=3))
    assert reports[1][0]["tokens"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_two_steps_reuse_the_buffer(run_ranks, backend, expand):
    check(run_ranks(2, backend, gradient_cases.moe_grad_case, seed=102, expand=expand,
                    alignment=8, steps=2), steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_router_weight_gradient_is_not_dropped(run_ranks, backend, expand):
    """Only the top-k weights connect the loss to the router (the expert choice is discrete):
    if dispatch's backward dropped combine's scalar channel, or combine's backward dropped
    dL/dw, the router gradient would be zero or wrong."""
    reports = check(run_ranks(2, backend, gradient_cases.moe_grad_case, seed=103, expand=expand))
    for report in reports:
        entry = report[0]
        assert entry["want_router_norm"] > 0
        assert entry["router_norm"] > 0.5 * entry["want_router_norm"]
        assert entry["router"] <= TOLERANCE
        if entry["tokens"]:
            assert entry["weights_norm"] > 0 and entry["weights"] <= TOLERANCE


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_output_noncontiguous_grad_and_padding(run_ranks, backend):
    padding_rows = run_ranks(2, backend, gradient_cases.autograd_edges_case, seed=104)
    assert sum(padding_rows) > 0  # the case exercises padding rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
@pytest.mark.parametrize("loss", ["sum", "mean", "mse"])
def test_empty_ranks_and_experts_without_grad(run_ranks, backend, expand, loss):
    tokens = run_ranks(3, backend, gradient_cases.autograd_losses_case, seed=105, expand=expand,
                       loss=loss)
    assert tokens[0] == 0 and tokens[1] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [True, False], ids=["expanded", "compact"])
def test_aux_gets_its_gradient(run_ranks, backend, expand):
    """aux's gradient comes home through dispatch's second scalar pass, next to the weights'."""
    reports = check(run_ranks(2, backend, gradient_cases.moe_grad_case, seed=106, expand=expand,
                              alignment=4, mask_fraction=0.2, with_aux=True))
    for report in reports:
        assert "aux" in report[0] and report[0]["aux_norm"] > 0, report


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", [(True, 4), (False, 1)],
                         ids=["expanded-align4", "compact"])
def test_unsynced_counts_gradients(run_ranks, backend, expand, alignment):
    """sync_counts=False: worst-case rows, experts picked by handle.local_expert_idx (no host
    offsets); rows past the counts get no gradient and change nothing. A rank without tokens."""
    check(run_ranks(3, backend, gradient_cases.moe_grad_case, seed=107, expand=expand,
                    alignment=alignment, mask_fraction=0.2, empty_rank=1, with_aux=True,
                    sync_counts=False, steps=2), steps=2)
