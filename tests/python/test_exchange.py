"""Buffer.dispatch / combine / combine_backward on several ranks against the plain-torch
oracle of docs/semantics.md (reference.py): layouts, handles and combine results bit for bit."""

import pytest

import rank_cases
from ranks import BACKENDS

# (expand, alignment): compact, expanded, expanded padded to 16 rows per expert.
LAYOUTS = [(False, 1), (True, 1), (True, 16)]
LAYOUT_IDS = ["compact", "expanded", "expanded-align16"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("expand,alignment", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("world", [2, 3])
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
def test_combine_three_ranks_masked_and_empty(run_ranks, backend):
    run_ranks(3, backend, rank_cases.combine_case, seed=21, expand=True, alignment=4,
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
@pytest.mark.parametrize("expand,alignment", [(False, 1), (True, 16)], ids=["compact", "expanded-align16"])
def test_unsynced_counts(run_ranks, backend, expand, alignment):
    run_ranks(2, backend, rank_cases.unsynced_case, seed=50, expand=expand, alignment=alignment)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_raise_epx_error_on_every_rank(run_ranks, backend):
    run_ranks(2, backend, rank_cases.errors_case, seed=60)


def test_missing_peer_times_out(run_ranks):
    # Host transport only: on GPUs a timed-out kernel is exercised by tests/gpu.
    messages = run_ranks(2, "gloo", rank_cases.timeout_case, seed=70)
    assert "timeout" in messages[0]


def test_invalid_input_on_one_rank_does_not_strand_peers(run_ranks):
    codes = run_ranks(2, "gloo", rank_cases.one_rank_invalid_case, seed=71)
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
