#!/usr/bin/env bash
# Builds epx (with the CUDA transport compiled for sm_90a when nvcc is present) and runs every
# test this machine can run: the GoogleTest suites through ctest (host transport, plan,
# reference, the installed CMake package; GPU suites skip themselves without GPUs) and the
# Python package's pytest suite on the host transport. Prints a one-line summary of the counts
# last.
#
#   tools/test.sh                  everything, for the first python3 that imports torch
#   tools/test.sh --python-only    the Python extension and the pytest suite alone, e.g. for a
#                                  second interpreter: EPX_PYTHON=venv/bin/python
#                                  EPX_BUILD_DIR=build-venv tools/test.sh --python-only
# EPX_BUILD_DIR (default build/), EPX_PYTHON, EPX_CMAKE_ARGS (extra CMake options) and
# EPX_PYTEST_ARGS (extra pytest options) apply to both.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python_only=0
case "${1:-}" in
  --python-only) python_only=1 ;;
  "") ;;
  *) echo "usage: tools/test.sh [--python-only]" >&2; exit 2 ;;
esac
build=${EPX_BUILD_DIR:-$root/build}
python=${EPX_PYTHON:-}
if [ -z "$python" ]; then
  # Debian's python3-torch lives under /usr/bin/python3; prefer it over other pythons on PATH.
  for candidate in /usr/bin/python3 python3; do
    if "$candidate" -c "import torch" >/dev/null 2>&1; then python=$candidate; break; fi
  done
fi
python_flags=()
if [ -n "$python" ]; then
  python=$(command -v "$python")
  python_flags=(-DEPX_BUILD_PYTHON=ON -DPython_EXECUTABLE="$python" -DPYTHON_EXECUTABLE="$python")
elif [ "$python_only" = 1 ]; then
  echo "tools/test.sh --python-only: no python with torch (set EPX_PYTHON)" >&2
  exit 1
fi
if [ "$python_only" = 1 ]; then
  python_flags+=(-DEPX_BUILD_TESTS=OFF -DEPX_BUILD_EXAMPLES=OFF -DEPX_BUILD_BENCH=OFF)
fi

cmake -S "$root" -B "$build" -G Ninja "${python_flags[@]}" ${EPX_CMAKE_ARGS:-}
status=0
if [ "$python_only" = 1 ]; then
  cmake --build "$build" -j "$(nproc)" --target epx_python_module
  ctest_line="skipped (--python-only)"
else
  cmake --build "$build" -j "$(nproc)"
  (cd "$build" && ctest --output-on-failure -j 2 2>&1 | tee "$build/ctest.log") || status=1
  ctest_line=$(grep -E "tests passed|tests failed" "$build/ctest.log" | tail -n 1 || true)
  # The fault suite's counts (cases, hangs, silent wrong results, leaks), which ctest keeps in
  # its log of passing tests.
  faults_line=$(grep -h "\[epx-faults\].*cases" "$build/Testing/Temporary/LastTest.log" 2>/dev/null || true)
fi

pytest_line="pytest: skipped (no python3 with torch found)"
if [ -n "$python" ] && [ -d "$root/tests/python" ]; then
  torch_version=$("$python" -c "import torch; print(torch.__version__)")
  set +e
  PYTHONPATH="$root/python:$build/python${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -m pytest -q ${EPX_PYTEST_ARGS:-} "$root/tests/python" 2>&1 | tee "$build/pytest.log"
  py_status=${PIPESTATUS[0]}
  set -e
  if [ "$py_status" -ne 0 ] && [ "$py_status" -ne 5 ]; then status=1; fi
  pytest_line="pytest ($python, torch $torch_version): $(tail -n 1 "$build/pytest.log")"
fi

echo "== epx test summary =="
echo "ctest: $ctest_line"
[ -z "${faults_line:-}" ] || echo "fault suite: ${faults_line#\[epx-faults\] }"
echo "$pytest_line"
exit $status
