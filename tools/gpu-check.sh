#!/usr/bin/env bash
# GPU machine check: builds epx for sm_90a against PyTorch's NCCL (unless EPX_SKIP_BUILD=1 and
# a build exists), then runs the GPU suites (bit-exact against the reference), the small
# configuration under compute-sanitizer (memcheck, racecheck) and the demo on the GPUs.
# Writes its log to $OUT/gpu-check.log when $OUT is set; prints a summary last.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPX_BUILD_DIR:-$root/build-gpu}
log=${OUT:+$OUT/gpu-check.log}
log=${log:-$build/gpu-check.log}
mkdir -p "$(dirname "$log")" "$build"
exec > >(tee "$log") 2>&1

python=$(command -v python3 || true)
source "$root/tools/gpu-env.sh"  # nccl_root, memcheck, no multicast
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
echo "== epx gpu-check $(date -u +%FT%TZ)"
# $EPX_COMMIT first: the device machine's copy of the repository can report a stale HEAD.
echo "commit: ${EPX_COMMIT:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -n 4
echo "nvcc: $(nvcc --version | tail -n 1)"
nccl_header=${nccl_root:+$nccl_root/include/nccl.h}
[ -f "${nccl_header:-}" ] || nccl_header=/usr/include/nccl.h
nccl_version=$(awk '/^#define NCCL_(MAJOR|MINOR|PATCH) /{v=v (v?".":"") $3} END{print v}' \
  "$nccl_header" 2>/dev/null)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
echo "nccl: ${nccl_version:-unknown} (${nccl_root:-system} $(ls "$nccl_root"/lib 2>/dev/null | grep -m1 libnccl))"

if [ "${EPX_SKIP_BUILD:-0}" != 1 ] || [ ! -x "$build/tests/test_gpu" ]; then
  cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    ${nccl_root:+-DEPX_NCCL_ROOT="$nccl_root"} > "$build/configure.log" 2>&1 || {
    tail -n 40 "$build/configure.log"; exit 1; }
  cmake --build "$build" -j "$(nproc)" 2>&1 | tail -n 5
fi

results=()
failures=0
run() {  # run NAME COMMAND...: records PASS/FAIL with the exit code and the time taken
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@"
  local status=$?
  [ $status = 0 ] || failures=$((failures + 1))
  results+=("$(printf '%-34s %s (exit %d, %ds)' "$name" "$([ $status = 0 ] && echo PASS || echo FAIL)" $status $((SECONDS - start)))")
}

run "gpu tests, NCCL + IPC processes" timeout 540 "$build/tests/test_gpu"
run "fault suite (host, IPC processes)" timeout 300 "$build/tests/test_faults"
run "device plan vs host plan" timeout 300 "$build/tests/test_gpu_plan"
run "device bf16 rounding, every fp32" timeout 120 "$build/tests/test_gpu_numerics"
run "thread ranks (R=2,3,4,8 on one GPU)" timeout 300 "$build/tests/test_gpu_threads"
if command -v compute-sanitizer >/dev/null; then
  small='*SmallScenarios/NcclR1:*SmallScenarios/IpcR2'
  run "compute-sanitizer memcheck" timeout 240 "${memcheck[@]}" "$build/tests/test_gpu" \
    --gtest_filter="$small"
  # Thread ranks R = 2, 3, 4, 8 on one GPU, lined up before each operation (tests/common/cuda_device_ops.hpp).
  run "memcheck, thread ranks (4 configs)" timeout 240 env EPX_TEST_ALIGN_RANKS=1 EPX_GPU_CONFIGS=4 \
    "${memcheck[@]}" "$build/tests/test_gpu_threads" --gtest_filter='*OneGpu*'
  run "compute-sanitizer racecheck" timeout 240 compute-sanitizer --tool racecheck --target-processes all \
    --error-exitcode 9 "$build/tests/test_gpu" --gtest_filter="$small"
  for tool in memcheck racecheck synccheck; do
    run "$tool, low-latency suite" sanitized_low_latency $tool "$build"
  done
fi
# First-look timings (every visible GPU one rank): the headline case, then the small one.
run "bench 4096 x 7168, top-8 of 256, 24 SMs" timeout 150 "$build/bench/bench_gpu"
run "bench 128 x 7168, top-8 of 256, 24 SMs" timeout 90 "$build/bench/bench_gpu" --tokens 128
run "moe check (default: GPUs when present)" timeout 120 "$build/tests/epx-moe-check"
run "moe check, host transport" timeout 120 "$build/tests/epx-moe-check" --transport host
run "moe layer example (GPUs)" timeout 120 "$build/examples/epx-moe-layer"
# The GPU suites (label gpu) and the fault suite ran above, one at a time: several at once would
# share the GPU.
# EPX_SKIP_HOST_TESTS=1: none (a build directory of GPU binaries built elsewhere, without
# CTest's files; CI runs the host tests).
[ "${EPX_SKIP_HOST_TESTS:-0}" = 1 ] ||
  run "host tests (same build)" bash -c "set -o pipefail; cd '$build' && ctest -LE gpu -E Faults -j 8 --output-on-failure | tail -n 3"

echo "== gpu-check summary $(date -u +%FT%TZ): $gpus x ${gpu_name:-no GPU}, driver ${driver:-?}, NCCL ${nccl_version:-?}"
printf '%s\n' "${results[@]}"
echo "$failures step(s) failed"
exit $((failures > 0))
