"""The package itself, in this process: the extension loads without PyTorch, errors map to
epx.EpxError, sizes are reported without allocating."""

import subprocess
import sys

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
