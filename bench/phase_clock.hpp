// The phase clock's report (src/cuda/kernels/kernels.hpp), shared by bench_gpu's dispatch rows
// and its low-latency rows: with a build configured -DEPX_PHASE_CLOCK=ON, `run` is called
// `warmups` times, then once more on zeroed stamps, and each mark of the listed spans is given
// as the blocks that stamped it and the earliest and latest stamp, in us from the earliest stamp
// of its span's origin marks. "" when the clock is not compiled in.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "cuda/kernels/kernels.hpp"

namespace epx::bench {

// Marks [first, end), timed from the earliest stamp of any of `origins`.
struct PhaseSpan {
  int first, end;
  std::initializer_list<int> origins;
};

// Ranks sharing one process (thread ranks on one GPU) share the stamps: `blocks` says which are
// this rank's, and `barrier` (a barrier of those ranks) keeps one rank's reset off the others'
// stamps; the origin is then the earliest stamp of any rank's, so their lines share a timeline.
struct PhaseBlocks {
  int first = 0, count = epx::cuda::kClockBlocks;
  std::function<void()> barrier;  // empty: a rank alone in its process
};

inline std::string phase_clock_report(const std::string& title, int rank, int warmups,
                                      const std::function<void()>& run,
                                      const std::function<void()>& synchronize,
                                      std::initializer_list<PhaseSpan> spans,
                                      const PhaseBlocks& blocks = {}) {
  using namespace epx::cuda;
  auto barrier = [&] {
    if (blocks.barrier) blocks.barrier();
  };
  if (!reset_phase_clock()) return "";  // not compiled in
  for (int i = 0; i < warmups; ++i) run();
  synchronize();
  barrier();
  if (!blocks.barrier || rank == 0) reset_phase_clock();
  barrier();
  run();
  synchronize();
  barrier();
  std::vector<uint64_t> stamps;
  const bool read = read_phase_clock(stamps);
  barrier();
  if (!read) return "";
  const int end = std::min(kClockBlocks, blocks.first + blocks.count);
  auto at = [&](int block, int mark) { return stamps[size_t(block) * kMarkCount + mark]; };
  std::string out = "rank " + std::to_string(rank) + ": " + title + "\n";
  char line[160];
  for (const PhaseSpan& span : spans) {
    uint64_t origin = UINT64_MAX;
    for (int b = 0; b < kClockBlocks; ++b) {
      for (int m : span.origins) {
        if (at(b, m)) origin = std::min(origin, at(b, m));
      }
    }
    for (int m = span.first; m < span.end; ++m) {
      uint64_t first = UINT64_MAX, last = 0;
      int stamped = 0;
      for (int b = blocks.first; b < end; ++b) {
        if (!at(b, m)) continue;
        ++stamped;
        first = std::min(first, at(b, m));
        last = std::max(last, at(b, m));
      }
      if (stamped == 0) continue;
      std::snprintf(line, sizeof(line), "rank %d:   %-18s %3d blocks  first %7.2f  last %7.2f\n",
                    rank, phase_mark_name(m), stamped, (first - origin) / 1e3,
                    (last - origin) / 1e3);
      out += line;
    }
  }
  return out;
}

}  // namespace epx::bench
