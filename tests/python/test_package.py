"""The package as a user meets it. In this process: the extension loads without PyTorch, errors
map to epx.EpxError, sizes are reported without allocating. Then README.md's Python snippets,
run as README shows them, each on 2 ranks: one Python process per rank with the environment
torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The snippets use gloo, so
epx's host transport: they run on any machine."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import epx


def test_error_class():
    assert issubclass(epx.EpxError, RuntimeError)
    assert epx.EpxError.__module__ == "epx"
    assert {"INVALID_ARGUMENT", "INVALID_ROUTING", "HANDLE_MISMATCH", "TIMEOUT"} <= set(
        epx.ErrorCode.__members__)


def test_invalid_config_raises_epx_error():
    with pytest.raises(epx.EpxError) as info:
        epx.workspace_bytes(3, max_tokens_per_rank=8, hidden=64, num_experts=4, num_topk=2)
    assert info.value.code == epx.ErrorCode.INVALID_ARGUMENT
    with pytest.raises(epx.EpxError):
        epx.workspace_bytes(2, max_tokens_per_rank=8, hidden=100, num_experts=4, num_topk=2,
                            fp8_dispatch=True)


def test_workspace_bytes_grows_with_tokens():
    small = epx.workspace_bytes(2, max_tokens_per_rank=8, hidden=128, num_experts=4, num_topk=2)
    large = epx.workspace_bytes(2, max_tokens_per_rank=64, hidden=128, num_experts=4, num_topk=2)
    assert 0 < small < large


def test_extension_does_not_link_torch():
    """One build serves any PyTorch: epx._C must not depend on libtorch or libc10."""
    if not sys.platform.startswith("linux"):
        pytest.skip("checked with ldd on Linux")
    try:
        libraries = subprocess.run(["ldd", epx._C.__file__], capture_output=True, text=True,
                                   check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"ldd unavailable: {error}")
    assert "libtorch" not in libraries and "libc10" not in libraries, libraries


def test_extension_imports_without_torch():
    # Load the module file alone, so that the package (which imports torch) stays out.
    script = ("import importlib.util, sys\n"
              f"spec = importlib.util.spec_from_file_location('epx._C', {epx._C.__file__!r})\n"
              "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
              "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_buffer_needs_a_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(epx.EpxError):
        epx.Buffer(None, max_tokens_per_rank=8, hidden=64, num_experts=4, num_topk=2)


# README.md's Python snippets.

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "README.md")
WORLD = 2
TIMEOUT_SECONDS = 150.0


def python_snippets():
    with open(README, encoding="utf-8") as readme:
        return re.findall(r"^```python\n(.*?)^```$", readme.read(), re.DOTALL | re.MULTILINE)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readme_has_python_snippets():
    assert python_snippets(), "README.md holds no ```python block"


@pytest.mark.parametrize("index", range(len(python_snippets())))
def test_readme_python_snippet_runs(index, tmp_path):
    script = tmp_path / f"readme_snippet_{index}.py"
    script.write_text(python_snippets()[index], encoding="utf-8")
    # The folders this process found epx in (its sources and the compiled module may differ).
    package_roots = [os.path.dirname(folder) for folder in epx.__path__]
    python_path = os.pathsep.join(package_roots + [os.environ.get("PYTHONPATH", "")])
    environment = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                       WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
                       PYTHONPATH=python_path)
    logs = [tmp_path / f"rank_{rank}.log" for rank in range(WORLD)]
    ranks = []
    for rank, log in enumerate(logs):
        with open(log, "w") as output:
            ranks.append(subprocess.Popen([sys.executable, str(script)],
                                          env=dict(environment, RANK=str(rank)), stdout=output,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_SECONDS
    # Until all are done, or one failed (its peers would wait for it in vain), or time is up.
    while (any(rank.poll() is None for rank in ranks) and time.monotonic() < deadline
           and all(rank.poll() in (None, 0) for rank in ranks)):
        time.sleep(0.1)
    for rank in ranks:
        if rank.poll() is None:
            rank.kill()
        rank.wait()
    failed = [rank for rank, process in enumerate(ranks) if process.returncode != 0]
    stopped = " (stopped here: a peer failed or time ran out)"
    assert not failed, "\n".join(
        f"--- rank {rank} exited {ranks[rank].returncode}"
        f"{stopped if ranks[rank].returncode == -signal.SIGKILL else ''}\n{logs[rank].read_text()}"
        for rank in failed)
