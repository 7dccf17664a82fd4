#!/usr/bin/env bash
# Where the small-batch kernels spend their time: Nsight Compute on bench_gpu (one rank, 128
# tokens by default), one routing dispatch (plan, send, receive) and one compact combine (send,
# reduce), with warp-state and per-source-line stall sampling; clocks and caches left alone.
# Writes $OUT/prof-NAME.{details,stalls,run}.txt (the report stays in the build directory).
# Usage: profile-kernels.sh [tokens]
#        profile-kernels.sh sums   the 8 x 2 row sums of bench_gpu at 4096 tokens (expert side:
#                                  combine_send_kernel, at the source: combine_reduce_kernel)
#                                  against bench/micro/row_sums.cu's register kernels of the
#                                  shapes 2x4 and 8x2 (docs/performance.md)
#        profile-kernels.sh backward   combine_backward's expert-side kernel at 4096 tokens
#                                  (grad_x rows, grad_weights, then the padding rows)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPX_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build/out}
tokens=${1:-128}
mkdir -p "$out"
sections=(--section SpeedOfLight --section WarpStateStats --section SourceCounters
          --section LaunchStats --section Occupancy)
program=("$build/bench/bench_gpu" --tokens "$tokens" --iters 3)
profile() {  # profile NAME NCU-FILTER...  (of "${program[@]}")
  local name=$1; shift
  timeout 240 ncu --clock-control none --cache-control none --target-processes all \
    --import-source yes "${sections[@]}" "$@" -f -o "$out/prof-$name" \
    "${program[@]}" > "$out/prof-$name.run.txt" 2>&1
  echo "profile $name: exit $?"
  ncu -i "$out/prof-$name.ncu-rep" --page details > "$out/prof-$name.details.txt" 2>&1
  ncu -i "$out/prof-$name.ncu-rep" --page source --csv --print-source sass \
    > "$build/prof-$name.source-sass.csv" 2>&1
  python3 "$root/bench/bench.py" ncu-stalls "$build/prof-$name.source-sass.csv" 16 \
    > "$out/prof-$name.stalls.txt" 2>&1
  # The report and the per-instruction table stay on the machine (too many or too large to
  # bring back); the details page and the stall summary come back.
  mv "$out/prof-$name.ncu-rep" "$build/"
  ls -la "$out"/prof-$name.*
}
case $tokens in
  sums | backward)  # one kernel of a 4096-token run each, with its memory traffic
    sections+=(--section MemoryWorkloadAnalysis)
    program=("$build/bench/bench_gpu" --tokens 4096 --iters 3)
    ;;
esac
if [ "$tokens" = sums ]; then
  profile sum-kernel --kernel-name-base demangled \
    -k 'regex:combine_send_kernel<.int.8, .bool.1, .int.8, .int.2>' \
    --launch-skip 2 --launch-count 1
  profile sum-reduce --kernel-name-base demangled \
    -k 'regex:combine_reduce_kernel<.int.8, .int.8, .int.2>' \
    --launch-skip 2 --launch-count 1
  program=("$build/bench/row_sums")
  profile sum-micro-2x4 --kernel-name-base demangled -k 'regex:regs_kernel<.int.2, .int.4>' \
    --launch-skip 2 --launch-count 1
  profile sum-micro-8x2 --kernel-name-base demangled -k 'regex:regs_kernel<.int.8, .int.2>' \
    --launch-skip 2 --launch-count 1
  exit 0
fi
if [ "$tokens" = backward ]; then
  profile backward --kernel-name-base demangled -k 'regex:backward_kernel<.int.8>' \
    --launch-skip 2 --launch-count 1
  exit 0
fi
# After the buffer's peer-pointer kernel, the first dispatch op: 3 warm-up + 3 timed calls of
# plan, send, receive; the third call is profiled.
profile dispatch --launch-skip 7 --launch-count 3
profile combine -k regex:combine --launch-skip 4 --launch-count 2
