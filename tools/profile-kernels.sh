#!/usr/bin/env bash
# Where the small-batch kernels spend their time: Nsight Compute on bench_gpu (one rank, 128
# tokens by default), one routing dispatch (plan, send, receive) and one compact combine (send,
# reduce), with warp-state and per-source-line stall sampling; clocks and caches left alone.
# Writes $OUT/prof-NAME.{details,stalls,run}.txt (the report stays in the build directory).
# Usage: profile-kernels.sh [tokens]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${EPX_BUILD_DIR:-$root/build-gpu}
out=${OUT:-$build/out}
tokens=${1:-128}
mkdir -p "$out"
sections=(--section SpeedOfLight --section WarpStateStats --section SourceCounters
          --section LaunchStats --section Occupancy)
profile() {  # profile NAME NCU-FILTER...
  local name=$1; shift
  timeout 240 ncu --clock-control none --cache-control none --target-processes all \
    --import-source yes "${sections[@]}" "$@" -f -o "$out/prof-$name" \
    "$build/tests/bench_gpu" --tokens "$tokens" --iters 3 > "$out/prof-$name.run.txt" 2>&1
  echo "profile $name: exit $?"
  ncu -i "$out/prof-$name.ncu-rep" --page details > "$out/prof-$name.details.txt" 2>&1
  ncu -i "$out/prof-$name.ncu-rep" --page source --csv --print-source sass \
    > "$build/prof-$name.source-sass.csv" 2>&1
  python3 "$root/tools/ncu_stalls.py" "$build/prof-$name.source-sass.csv" 16 \
    > "$out/prof-$name.stalls.txt" 2>&1
  # The report and the per-instruction table stay on the machine (too many or too large to
  # bring back); the details page and the stall summary come back.
  mv "$out/prof-$name.ncu-rep" "$build/"
  ls -la "$out"/prof-$name.*
}
# After the buffer's peer-pointer kernel, the first dispatch op: 3 warm-up + 3 timed calls of
# plan, send, receive; the third call is profiled.
profile dispatch --launch-skip 7 --launch-count 3
profile combine -k regex:combine --launch-skip 4 --launch-count 2
