// Opt-in timestamps of a dispatch's phases on the device, to see where a small batch's time
// goes (docs/performance.md). Configure with -DEPX_PHASE_CLOCK=ON: thread 0 of every block
// of the dispatch kernels stamps the global timer at each mark (cuda/device/phase_clock.cuh), and
// bench_gpu prints the marks of one dispatch. Off (the default) the marks compile to nothing and
// read_phase_clock returns false.
#pragma once

#include <cstdint>
#include <vector>

namespace epx::cuda {

enum PhaseMark : int {
  kMarkSendStart,     // send kernel past its wait for the kernel before it
  kMarkEntered,       // entry barrier passed
  kMarkSent,          // the block's stores into the peers done
  kMarkHandedOff,     // past the handoff (the last block: exit published)
  kMarkReceiveStart,  // receive kernel past its wait for the kernel before it
  kMarkExited,        // exit barrier passed
  kMarkCounted,       // receive counts computed
  kMarkReceived,      // the block's receive done
  kMarkCount
};
constexpr int kClockBlocks = 128;  // blocks that stamp (the rest do not)

const char* phase_mark_name(int mark);
// Zeroes the stamps (false: not compiled in).
bool reset_phase_clock();
// The stamps [kClockBlocks][kMarkCount] in ns of the global timer, 0 where none was made since
// the reset (false: not compiled in).
bool read_phase_clock(std::vector<uint64_t>& stamps);

}  // namespace epx::cuda
