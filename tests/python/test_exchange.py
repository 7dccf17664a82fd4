"""Buffer.dispatch / combine / combine_backward on several ranks against the plain-torch
oracle of docs/semantics.md (reference.py): layouts, handles and combine results bit for bit;
the errors and the checks that make ranks agree. Last, the low-latency mode
(epx/low_latency.py): its exchange against a torch oracle, its errors, and an expert-parallel MoE
layer through epx.functional's LL functions whose gradients (input, top-k weights, router,
experts) match the same layer on one device within 2e-2."""

import pytest

import gradient_cases
import low_latency_cases
import rank_cases
from ranks import BACKENDS
from test_autograd import check

# (expand, alignment): compact, expanded, expanded padded to 16 rows per expert.
LAYOUTS = [(False, 1), (True, 1), (True, 16)]
LAYOUT_IDS = ["compact", "expanded", "expanded-align16"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_dispatch_matches_reference(run_ranks, backend, world, expand, alignment):
    received = run_ranks(world, backend, rank_cases.dispatch_case, seed=10 + world,
                         expand=expand, alignment=alignment)
    assert sum(received) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_dispatch_int32_topk_unpadded_empty_rank(run_ranks, backend):
    run_ranks(2, backend, rank_cases.dispatch_case, seed=3, expand=True, alignment=8,
              idx_dtype="int32", zero_padding=False, empty_rank=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [False, True], ids=["compact", "expanded"])
def test_dispatch_all_experts_on_one_rank(run_ranks, backend, expand):
    received = run_ranks(2, backend, rank_cases.dispatch_case, seed=4, expand=expand,
                         alignment=4, one_rank_experts=True)
    assert received[1] == 0 and received[0] > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", LAYOUTS, ids=LAYOUT_IDS)
def test_combine_matches_reference(run_ranks, backend, expand, alignment):
    run_ranks(2, backend, rank_cases.combine_case, seed=20, expand=expand, alignment=alignment)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [3, 4])
def test_combine_masked_and_empty(run_ranks, backend, world):
    run_ranks(world, backend, rank_cases.combine_case, seed=21, expand=True, alignment=4,
              empty_rank=0, mask_fraction=0.4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alignment", [1, 16])
def test_combine_backward_matches_reference(run_ranks, backend, alignment):
    run_ranks(2, backend, rank_cases.combine_backward_case, seed=30, alignment=alignment)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand", [False, True], ids=["compact", "expanded"])
def test_fp8_dispatch(run_ranks, backend, expand):
    run_ranks(2, backend, rank_cases.fp8_case, seed=40, expand=expand)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", [(False, 1), (True, 16)],
                         ids=["compact", "expanded-align16"])
def test_unsynced_counts(run_ranks, backend, expand, alignment):
    run_ranks(2, backend, rank_cases.unsynced_case, seed=50, expand=expand, alignment=alignment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_raise_epx_error_on_every_rank(run_ranks, backend):
    run_ranks(2, backend, rank_cases.errors_case, seed=60)


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_missing_peer_times_out(run_ranks, backend):
    messages = run_ranks(2, backend, rank_cases.timeout_case, seed=70)
    assert "timeout" in messages[0]


@pytest.mark.parametrize("backend", ["gloo", "ipc"])
def test_invalid_input_on_one_rank_does_not_strand_peers(run_ranks, backend):
    codes = run_ranks(2, backend, rank_cases.one_rank_invalid_case, seed=71)
    assert codes[0] == "INVALID_ARGUMENT"
    assert codes[1] is not None and codes[1] != "TIMEOUT", codes


@pytest.mark.parametrize("backend", BACKENDS)
def test_buffer_reports_its_sm_budget(run_ranks, backend):
    budgets = run_ranks(2, backend, rank_cases.sm_budget_case, seed=72)
    assert budgets[0] == budgets[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sync_counts", [True, False], ids=["synced", "unsynced"])
def test_one_allocator_callback_per_call(run_ranks, backend, sync_counts):
    calls = run_ranks(2, backend, rank_cases.allocation_calls_case, seed=73,
                      sync_counts=sync_counts)
    assert all(calls)


@pytest.mark.parametrize("backend", BACKENDS)
def test_python_check_on_one_rank_aborts_the_peers(run_ranks, backend):
    timings = run_ranks(2, backend, rank_cases.python_check_on_one_rank_case, seed=80)
    assert max(timings) < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what", ["layout", "weights", "operation"])
def test_ranks_that_disagree_all_raise(run_ranks, backend, what):
    messages = run_ranks(3, backend, rank_cases.mismatch_case, seed=81, what=what)
    assert all("disagree" in m for m in messages), messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_configurations_that_differ_raise_at_setup(run_ranks, backend):
    messages = run_ranks(2, backend, rank_cases.config_mismatch_case, seed=82)
    assert all("hidden" in m for m in messages), messages


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_timeout_makes_the_buffer_unusable_everywhere(run_ranks, backend):
    waits = run_ranks(2, backend, rank_cases.timeout_then_unusable_case, seed=83)
    assert max(waits) < 0.9


# The low-latency mode.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("hook,zero_copy", [(False, False), (True, True), (False, True)],
                         ids=["copied", "hooks-zero-copy", "zero-copy"])
def test_low_latency_exchange_matches_oracle(run_ranks, backend, world, hook, zero_copy):
    counts = run_ranks(world, backend, low_latency_cases.exchange_case, seed=40 + world,
                       hook=hook, zero_copy=zero_copy)
    assert sum(sum(c) for c in counts) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_fp8_and_int32_routing(run_ranks, backend):
    run_ranks(2, backend, low_latency_cases.exchange_case, seed=45, fp8=True, idx_dtype="int32")


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_errors(run_ranks, backend):
    for codes in run_ranks(2, backend, low_latency_cases.errors_case, seed=46):
        assert codes == ["INVALID_ARGUMENT", "INVALID_ARGUMENT", "INVALID_ARGUMENT", "UNUSABLE"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_moe_gradients_match_dense_layer(run_ranks, backend):
    check(run_ranks(2, backend, gradient_cases.moe_grad_case, seed=200, steps=2, low_latency=True),
          steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_moe_gradients_masked_experts_and_a_rank_without_tokens(run_ranks, backend):
    check(run_ranks(3, backend, gradient_cases.moe_grad_case, seed=201, num_topk=3,
                    mask_fraction=0.3, empty_rank=1, low_latency=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_latency_experts_learn_from_inputs_without_grad(run_ranks, backend):
    assert all(run_ranks(2, backend, low_latency_cases.frozen_inputs_case, seed=202))
