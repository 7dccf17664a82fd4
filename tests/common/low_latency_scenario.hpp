// One randomized end-to-end check of a buffer's low-latency mode against the reference
// (reference/reference.hpp), shared by the host tests and the GPU tests: three
// rounds on one buffer, every output element compared.
//
//   round 0  routing dispatch; combine (weighted when the case has weights; zero-copy cases
//            write the expert outputs into low_latency_combine_input() and pass the dispatch's
//            own weights view); the round-0 views are read again after round 1's dispatch
//            (they must still hold round 0: the validity rule)
//   round 1  cached dispatch of new rows (bf16 on an fp8 buffer in cached_bf16 cases) and new
//            weights, which must land row for row where round 0's did; unweighted combine
//   round 2  combine_backward of a weighted combine; then a combine of gradient rows with
//            scalars (the shape of a dispatch's backward)
//
// Rows inside an expert are compared after sorting by src_info (their order is decided at run
// time); rows past the counts must hold 0 (weights, aux) and -1 (src_info); combine inputs past
// the counts are NaN, so a transport that read them would fail.
#pragma once

#include <string>
#include <vector>

#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/buffer.hpp"

namespace epx::testing {

struct LowLatencyCase {
  RandomConfig config;       // config.max_tokens is S_ll; fp8, channels, topk dtype as drawn
  bool hook = false;         // every dispatch and combine returns a hook, then waits
  bool zero_copy = false;    // combine inputs in the workspace itself (see above)
  bool cached_bf16 = false;  // fp8 buffers: the cached dispatch sends bf16 rows
  std::string describe() const;
};

// Small sizes (draw_config's), every flag random.
LowLatencyCase draw_low_latency_case(uint64_t seed, int32_t num_ranks);
// `tokens` per rank (S_ll), hidden `hidden`, `experts` experts (8 per rank when they do not
// split over the ranks), top-8; the other fields as drawn.
LowLatencyCase production_low_latency_case(uint64_t seed, int32_t num_ranks, int64_t tokens,
                                           int64_t hidden, bool fp8, int32_t experts = 256);

// The buffer for a case: S_ll = config.max_tokens, the normal regions sized for one token.
BufferConfig low_latency_buffer_config(const LowLatencyCase& c, double timeout_seconds = 60);

// draw_dispatch_inputs with S_ll tokens at most, and without (t, k) entries that would overflow
// an expert's R * S_ll rows (duplicates can): those become -1.
std::vector<reference::RankInputs> draw_low_latency_inputs(const RandomConfig& config);

// Runs the scenario on this rank; "" on success, else what differs (or what was raised) and
// the case.
std::string run_low_latency_scenario(Buffer& buffer, const LowLatencyCase& c, int rank,
                                     const DeviceOps& ops);

}  // namespace epx::testing
