// bench_gpu's low-latency rows (low_latency_bench.cu): LL dispatch, combine (zero-copy) and
// both, next to the normal path (compact, sync_counts=false), at 1, 8, 32, 128 and 256 tokens
// per rank, as CUDA-graph replays and eager calls, and a plain SM copy of the same bytes with
// the same SMs (the ratio is printed).
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <string>

#include "epx/comm.hpp"

namespace epx::bench {

struct LowLatencyBenchOptions {
  int rank = 0;
  int num_ranks = 1;
  int64_t hidden = 7168;
  int32_t experts = 256;
  int32_t topk = 8;
  int iters = 20;
  bool shares_gpu = false;   // thread ranks on one GPU: each takes its share of the SMs
  int64_t tokens = 0;        // > 0: that token count only (1 to 256), else each of them
  bool normal_rows = true;   // the normal path's rows beside the LL ones
  int timeout_seconds = 60;  // BufferConfig::timeout_seconds
  int sms = 0;               // > 0: at most that many SMs (blocks) for the LL kernels and the copy
  // Called by every rank once its graphs are captured and uploaded, before any is replayed: a
  // barrier of the ranks that share the GPU (none otherwise).
  std::function<void()> graphs_ready;
  // Ranks sharing the GPU: a zeroed word of its memory shared by them, the held samples' start
  // gate (low_latency_bench.cu, hold_kernel); null otherwise.
  unsigned* start_gate = nullptr;
};

// The report of this rank (collective: every rank runs it). Raises epx::Error on failure.
std::string low_latency_report(const LowLatencyBenchOptions& options, const Comm& comm,
                               cudaStream_t stream);

}  // namespace epx::bench
