"""pytest wiring: rank pools shared by the whole session, and the backends to run on.

Every multi-rank test is parametrised over the backend (ranks.py): "gloo" (epx's host transport,
CPU tensors; runs everywhere), "nccl" (epx's NCCL transport, one GPU per rank) and "ipc" (epx's
CUDA-IPC transport, every rank count on one GPU); a backend this machine or build cannot run is
skipped with the reason.
"""

import pytest

from ranks import RankPool, backend_skip_reason


@pytest.fixture(scope="session")
def _pools():
    pools = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def run_ranks(_pools):
    """run_ranks(world, backend, function, **kwargs) -> per-rank results (skips when the
    backend cannot run here)."""

    def run(world, backend, function, **kwargs):
        reason = backend_skip_reason(backend, world)
        if reason:
            pytest.skip(reason)
        key = (world, backend)
        pool = _pools.get(key)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = _pools[key] = RankPool(world, backend)
        return pool.run(function, **kwargs)

    return run
