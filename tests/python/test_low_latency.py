"""The low-latency mode through the Python package (epx/low_latency.py): the exchange against a
torch oracle, its errors, and an expert-parallel MoE layer through epx.functional's LL
functions whose gradients (input, top-k weights, router, experts) match the same layer on one
device within 2e-2."""

import pytest

import low_latency_cases
import rank_cases
from ranks import BACKENDS
from test_autograd import check


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("hook,zero_copy", [(False, False), (True, True), (False, True)],
                         ids=["copied", "hooks-zero-copy", "zero-copy"])
def test_exchange_matches_oracle(run_ranks, backend, world, hook, zero_copy):
    counts = run_ranks(world, backend, low_latency_cases.exchange_case, seed=40 + world,
                       hook=hook, zero_copy=zero_copy)
    assert sum(sum(c) for c in counts) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_and_int32_routing(run_ranks, backend):
    run_ranks(2, backend, low_latency_cases.exchange_case, seed=45, fp8=True, idx_dtype="int32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(run_ranks, backend):
    for codes in run_ranks(2, backend, low_latency_cases.errors_case, seed=46):
        assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "UNUSABLE"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_gradients_match_dense_layer(run_ranks, backend):
    check(run_ranks(2, backend, rank_cases.moe_grad_case, seed=200, steps=2, low_latency=True),
          steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_gradients_masked_experts_and_a_rank_without_tokens(run_ranks, backend):
    check(run_ranks(3, backend, rank_cases.moe_grad_case, seed=201, num_topk=3,
                    mask_fraction=0.3, empty_rank=1, low_latency=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_learn_from_inputs_without_grad(run_ranks, backend):
    assert all(run_ranks(2, backend, low_latency_cases.frozen_inputs_case, seed=202))
