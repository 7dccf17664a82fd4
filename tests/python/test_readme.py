"""README.md's Python snippets, run as README shows them, each on 2 ranks: one Python process per
rank with the environment torchrun would give it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
The snippets use gloo, so epx's host transport: they run on any machine."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import epx

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
