#!/usr/bin/env bash
# Builds epx (with the CUDA transport compiled for sm_90a when nvcc is present) and runs every
# test this machine can run: the GoogleTest suites through ctest (host transport, plan,
# reference; GPU suites skip themselves without GPUs) and the Python package's pytest suite on
# the host transport. Prints a one-line summary of the counts last.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
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
fi

cmake -S "$root" -B "$build" -G Ninja "${python_flags[@]}" ${EPX_CMAKE_ARGS:-}
cmake --build "$build" -j "$(nproc)"

status=0
(cd "$build" && ctest --output-on-failure -j 2 2>&1 | tee "$build/ctest.log") || status=1
ctest_line=$(grep -E "tests passed|tests failed" "$build/ctest.log" | tail -n 1 || true)

pytest_line="pytest: skipped (no python3 with torch found)"
if [ -n "$python" ] && [ -d "$root/tests/python" ]; then
  set +e
  PYTHONPATH="$root/python:$build/python${PYTHONPATH:+:$PYTHONPATH}" \
    "$python" -m pytest -q "$root/tests/python" 2>&1 | tee "$build/pytest.log"
  py_status=${PIPESTATUS[0]}
  set -e
  if [ "$py_status" -ne 0 ] && [ "$py_status" -ne 5 ]; then status=1; fi
  pytest_line="pytest: $(tail -n 1 "$build/pytest.log")"
fi

echo "== epx test summary =="
echo "ctest: $ctest_line"
echo "$pytest_line"
exit $status
