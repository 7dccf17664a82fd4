#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (device time is scarce): build once with CUDA
# and the Python extension, then the steps named in EPX_STEPS (default: all of them):
#   gpu     tools/gpu-check.sh (GPU tests bit-exact vs the reference, sanitizer, demo on GPUs)
#   python  the pytest suite, its NCCL and IPC cases included
#   ll      the low-latency suite (test_gpu_low_latency: thread ranks R = 1-8, one NCCL rank,
#           IPC processes R = 2, 3, errors, graph replays), EPX_GPU_CONFIGS (default 4) random
#           configurations per case
#   bench   the benchmark (bench/bench.py), JSON and plot under $OUT
#   threads bench_gpu with 2 and 4 ranks (EPX_THREAD_RANKS) as threads sharing GPU 0 (128 and
#           4096 tokens; EPX_THREADS_TOKENS), more bench_gpu options in EPX_THREADS_ARGS (e.g.
#           EPX_THREAD_RANKS=8 EPX_THREADS_TOKENS=128 EPX_THREADS_ARGS="--low-latency 2": the
#           low-latency rows of 8 thread ranks alone); each run under EPX_THREADS_TIMEOUT_S
#           (default 120; bench_gpu's own limit for thread ranks is 300 s, past which it reports
#           what failed)
#   stress  the thread-rank suite at R = 8 repeated EPX_STRESS_RUNS times (default 40, 5 s
#           timeout), then memcheck with padding after every allocation (a stray write into a
#           neighbouring allocation is invisible to plain memcheck) on the EPX_STRESS_SEEDS
#           replays, each "base_seed:configs", and on 4 fresh configurations of every R
#   soak    >= 1000 random scenarios in one call (EPX_SOAK_CONFIGS, default 250, scales it):
#           thread ranks R = 2, 3, 4 on GPU 0 (EPX_SOAK_CONFIGS each) and R = 8 (an eighth of
#           it: eight ranks time-slice one GPU), IPC processes R = 2, 3, 4 on GPU 0 and one NCCL
#           rank (3/8 of it each), every fourth configuration at production shapes; base seeds
#           printed for replay
#   pyprof  bench/python_overhead.py: host time of one eager call and of its pieces
#   micro   bench/micro/sync_costs.cu: the synchronisation pieces' costs on their own,
#           bench/micro/copy_paths.cu: register against bulk copies of 14 KB rows, and
#           bench/micro/row_sums.cu: the expert-side sum by register loads and cp.async stages
#           (EPX_MICROS: which of them, default all three)
#   profile bench/profile-kernels.sh: ncu warp states and per-line stalls at 128 tokens
#           (EPX_PROFILE: its argument, e.g. backward; default 128)
#   sums    bench/profile-kernels.sh sums: the same for the expert-side sum against the
#           row_sums micro, and the SASS of both (cuobjdump) into $OUT
#   sanitize the low-latency suite under compute-sanitizer memcheck, racecheck and synccheck
#           (EPX_SANITIZE_TOOLS: which of them; sanitized_low_latency in gpu-env.sh, which
#           gpu-check.sh runs too)
#   ncu     per-kernel durations of bench_gpu at 128 tokens (ncu, clocks left alone)
#   variants bench_gpu of this tree and of variants of it, in the same call (run-to-run spread
#           between calls is a few %, more than many changes gain): each directory under
#           EPX_VARIANTS (default alt/, ignored by git; send it with the device tool's carry)
#           holds files at their repository paths, put over a copy of the tree; every build runs
#           bench_gpu with each of EPX_VARIANT_ARGS, ';'-separated argument lists (default
#           "--tokens 4096;--tokens 128;--tokens 4096 --thread-ranks 4")
#   phase   bench_gpu built with -DEPX_PHASE_CLOCK=ON (build-clk): the phase timeline of one
#           dispatch at 128, 512 and 4096 tokens and of one low-latency round at 1 to 256 tokens
#           (src/cuda/kernels/kernels.hpp)
# EPX_BUILD_TARGETS (e.g. "bench_gpu test_gpu_low_latency") builds only those targets: a call
# whose steps need no more saves the minutes of the full build.
# Logs go to $OUT (the device tool brings them back) and a summary is printed last.
set -uo pipefail
export PYTHONUNBUFFERED=1
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$root/build-gpu/out}
mkdir -p "$out"
steps=${EPX_STEPS:-gpu python bench}
python=$(command -v python3)
source "$root/tools/gpu-env.sh"  # nccl_root, memcheck, no multicast
export EPX_BUILD_DIR=${EPX_BUILD_DIR:-$root/build-gpu}
# The commit under test: pass EPX_COMMIT=$(git rev-parse HEAD) from the machine that sends the
# tree; the device machine's copy of the repository has reported a stale HEAD.
export EPX_COMMIT=${EPX_COMMIT:-$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)}
summary=()
# bench_gpu alone, from source tree $1 into build directory $2 (more cmake options after them).
build_bench_gpu() {
  local src=$1 dir=$2; shift 2
  cmake -S "$src" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" \
    ${nccl_root:+-DEPX_NCCL_ROOT="$nccl_root"} &&
    cmake --build "$dir" -j "$(nproc)" --target bench_gpu
}

echo "== build ($(date -u +%FT%TZ)) commit $EPX_COMMIT nccl_root=$nccl_root"
cmake -S "$root" -B "$EPX_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=${EPX_BUILD_TYPE:-Release} \
  -DEPX_BUILD_PYTHON=ON -DPython_EXECUTABLE="$python" -DPYTHON_EXECUTABLE="$python" \
  ${nccl_root:+-DEPX_NCCL_ROOT="$nccl_root"} > "$out/build.log" 2>&1 &&
  cmake --build "$EPX_BUILD_DIR" -j "$(nproc)" ${EPX_BUILD_TARGETS:+--target $EPX_BUILD_TARGETS} \
    >> "$out/build.log" 2>&1
build_status=$?
tail -n 30 "$out/build.log"
summary+=("build: exit $build_status")

for step in $steps; do
  case $step in
    gpu)
      EPX_SKIP_BUILD=1 bash "$root/tools/gpu-check.sh" 2>&1 | tee "$out/gpu-check.log"
      summary+=("gpu-check: exit ${PIPESTATUS[0]}")
      ;;
    python)
      PYTHONPATH="$root/python:$EPX_BUILD_DIR/python" timeout ${EPX_PYTEST_TIMEOUT:-420} "$python" -m pytest -q ${EPX_PYTEST_ARGS:-} \
        "$root/tests/python" 2>&1 | tee "$out/pytest-gpu.log"
      summary+=("pytest: $(tail -n 1 "$out/pytest-gpu.log")")
      ;;
    ll)
      EPX_GPU_CONFIGS=${EPX_GPU_CONFIGS:-4} timeout 300 "$EPX_BUILD_DIR/tests/test_gpu_low_latency" \
        2>&1 | tee "$out/low-latency.log"
      summary+=("low-latency suite: exit ${PIPESTATUS[0]}, $(grep -c '^\[       OK \]' "$out/low-latency.log") tests passed")
      ;;
    sanitize)
      for tool in ${EPX_SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
        sanitized_low_latency $tool "$EPX_BUILD_DIR" > "$out/sanitize-$tool.log" 2>&1
        status=$?
        grep -E "^\[ +(OK|FAILED|PASSED) |SUMMARY|bit-exact" "$out/sanitize-$tool.log" | tail -n 12
        summary+=("$tool, low-latency suite: exit $status")
      done
      ;;
    bench)
      PYTHONPATH="$root/python:$EPX_BUILD_DIR/python" timeout 480 "$python" "$root/bench/bench.py" \
        --out "$out" ${EPX_BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
      summary+=("bench: exit ${PIPESTATUS[0]}")
      ;;
    threads)
      for r in ${EPX_THREAD_RANKS:-2 4}; do
        for t in ${EPX_THREADS_TOKENS:-128 4096}; do
          timeout ${EPX_THREADS_TIMEOUT_S:-120} "$EPX_BUILD_DIR/bench/bench_gpu" --thread-ranks $r \
            --tokens $t ${EPX_THREADS_ARGS:-} 2>&1
        done
      done | tee "$out/bench-threads.log"
      summary+=("threads: exit ${PIPESTATUS[0]}")
      ;;
    stress)
      runs=${EPX_STRESS_RUNS:-40}
      for i in $(seq 1 "$runs"); do
        EPX_GPU_TIMEOUT_S=5 timeout 60 "$EPX_BUILD_DIR/tests/test_gpu_threads" \
          --gtest_filter='*R8OneGpu*' > "$out/stress-run.log" 2>&1 ||
          { echo "-- run $i failed:"; grep -E "base seed|timed out|config:|FAILED" "$out/stress-run.log" | head -n 20; }
      done 2>&1 | tee "$out/stress.log"
      echo "stress: $(grep -c -- '-- run' "$out/stress.log") of $runs R=8 runs failed" | tee -a "$out/stress.log"
      # Under the sanitizer the ranks issue each operation together (EPX_TEST_ALIGN_RANKS).
      for replay in ${EPX_STRESS_SEEDS:-} any:4; do
        filter='*R8OneGpu*'; seed=${replay%%:*}
        [ "$seed" = any ] && { filter='*OneGpu*'; seed=; }
        EPX_TEST_ALIGN_RANKS=${EPX_TEST_ALIGN_RANKS:-1} EPX_GPU_TIMEOUT_S=20 \
          EPX_GPU_CONFIGS=${replay##*:} timeout 150 env ${seed:+EPX_TEST_SEED=$seed} \
          "${memcheck[@]}" "$EPX_BUILD_DIR/tests/test_gpu_threads" --gtest_filter="$filter" 2>&1 | tail -n 25
        echo "memcheck replay $replay ($filter): exit ${PIPESTATUS[0]}"
      done 2>&1 | tee -a "$out/stress.log"
      summary+=("$(grep -E '^stress:' "$out/stress.log")" "$(grep -E '^memcheck replay' "$out/stress.log" | paste -sd ';')")
      rm -f "$out/stress-run.log"
      ;;
    soak)
      configs=${EPX_SOAK_CONFIGS:-250}
      {
        EPX_GPU_CONFIGS=$configs timeout 300 "$EPX_BUILD_DIR/tests/test_gpu_threads" \
          --gtest_filter='*ThreadsRandom*R2OneGpu*:*ThreadsRandom*R3OneGpu*:*ThreadsRandom*R4OneGpu*'
        EPX_GPU_CONFIGS=$((configs / 8)) timeout 150 "$EPX_BUILD_DIR/tests/test_gpu_threads" \
          --gtest_filter='*ThreadsRandom*R8OneGpu*'
        EPX_GPU_CONFIGS=$((configs * 3 / 8)) timeout 300 "$EPX_BUILD_DIR/tests/test_gpu" \
          --gtest_filter='*GpuRandom*IpcR*:*GpuRandom*NcclR1'
      } 2>&1 | tee "$out/soak.log" | grep -E "base seed|scenarios bit-exact|FAILED|Failure"
      passed=$(grep -oE "[0-9]+ scenarios bit-exact" "$out/soak.log" | awk '{s += $1} END {print s + 0}')
      echo "soak: $passed scenarios bit-exact, $(grep -c '^\[  FAILED  \]' "$out/soak.log") failed tests" | tee -a "$out/soak.log"
      summary+=("$(tail -n 1 "$out/soak.log")")
      ;;
    profile)
      bash "$root/bench/profile-kernels.sh" "${EPX_PROFILE:-128}" 2>&1 | tee "$out/profile.log"
      ;;
    sums)
      bash "$root/bench/profile-kernels.sh" sums 2>&1 | tee "$out/profile-sums.log"
      cuobjdump -sass "$EPX_BUILD_DIR/bench/row_sums" > "$out/sass-row-sums.txt" 2>&1
      cuobjdump -sass "$(find "$EPX_BUILD_DIR" -name 'combine_kernels.cu.o' | head -n 1)" \
        > "$out/sass-combine-kernels.txt" 2>&1
      summary+=("sums: $(wc -l < "$out/sass-row-sums.txt") + $(wc -l < "$out/sass-combine-kernels.txt") SASS lines")
      ;;
    pyprof)
      PYTHONPATH="$root/python:$EPX_BUILD_DIR/python" timeout 120 "$python" \
        "$root/bench/python_overhead.py" 2>&1 | tee "$out/python-overhead.log"
      summary+=("pyprof: exit ${PIPESTATUS[0]}")
      ;;
    micro)
      for micro in ${EPX_MICROS:-sync_costs copy_paths row_sums}; do
        timeout 120 "$EPX_BUILD_DIR/bench/$micro" 2>&1 | tee "$out/${micro//_/-}.log"
        summary+=("micro $micro: exit ${PIPESTATUS[0]}")
      done
      ;;
    variants)
      IFS=';' read -ra variant_args <<< "${EPX_VARIANT_ARGS:---tokens 4096;--tokens 128;--tokens 4096 --thread-ranks 4}"
      run_bench() {  # $1: bench_gpu binary, $2: label
        for args in "${variant_args[@]}"; do
          echo "## $2: bench_gpu $args"
          timeout 120 "$1" $args 2>&1 | grep -E "^rank 0: "
        done
      }
      {
        run_bench "$EPX_BUILD_DIR/bench/bench_gpu" "this tree ($EPX_COMMIT)"
        shopt -s nullglob  # no alt/ directory: no variants, this tree only
        variants=("${EPX_VARIANTS:-$root/alt}"/*/)
        shopt -u nullglob
        for dir in "${variants[@]}"; do  # the builds in parallel, then the runs one by one
          tree=/tmp/epx-variant-$(basename "$dir")
          rm -rf "$tree" && mkdir -p "$tree"
          tar -C "$root" --exclude='./build*' --exclude=./alt -cf - . | tar -C "$tree" -xf -
          cp -r "$dir". "$tree"/
          build_bench_gpu "$tree" "$tree/build" > "$tree/build.log" 2>&1 &
        done
        wait
        for dir in "${variants[@]}"; do
          name=$(basename "$dir") tree=/tmp/epx-variant-$(basename "$dir")
          echo "## variant $name: $(cd "$dir" && find . -type f | sort | paste -sd ' ')"
          if [ -x "$tree/build/bench/bench_gpu" ]; then
            run_bench "$tree/build/bench/bench_gpu" "variant $name"
          else
            tail -n 30 "$tree/build.log"
          fi
        done
        run_bench "$EPX_BUILD_DIR/bench/bench_gpu" "this tree again"
      } 2>&1 | tee "$out/variants.log"
      summary+=("variants: $(grep -c '^## variant [^:]*: \./' "$out/variants.log") built")
      ;;
    phase)
      build_bench_gpu "$root" "$root/build-clk" -DEPX_PHASE_CLOCK=ON > "$out/phase-build.log" 2>&1
      {
        for t in 128 512 4096; do
          timeout 100 "$root/build-clk/bench/bench_gpu" --tokens $t --low-latency 0 2>&1
        done
        timeout 100 "$root/build-clk/bench/bench_gpu" --low-latency 2 --ll-normal 0 2>&1
      } | tee "$out/phase-clock.txt" | grep -E "phase clock|blocks|sync_counts=false"
      summary+=("phase: exit ${PIPESTATUS[0]}")
      ;;
    ncu)
      timeout 300 ncu --clock-control none --target-processes all \
        --metrics gpu__time_duration.sum "$EPX_BUILD_DIR/bench/bench_gpu" --tokens 128 --iters 2 \
        > "$out/ncu-128.txt" 2>&1
      summary+=("ncu: exit $?")
      grep -E "^  [a-z_:<>(), ]+\(|gpu__time_duration" "$out/ncu-128.txt" | paste - - | \
        awk '{print $1, $(NF)}' | sort | uniq -c | head -n 40
      ;;
  esac
done
echo "== device-run summary"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1
printf '%s\n' "${summary[@]}"
# The device tool brings back at most 8 files from $OUT: with more, they travel as one archive.
if [ "$(find "$out" -maxdepth 1 -type f | wc -l)" -gt 8 ]; then
  packed=$(mktemp /tmp/device-run-out.XXXXXX) && tar -C "$out" -czf "$packed" . &&
    rm -rf "${out:?}"/* && mv "$packed" "$out/device-run-out.tgz" &&
    echo "(outputs packed into device-run-out.tgz)"
fi
