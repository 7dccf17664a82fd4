// The CUDA-graph scenario of the GPU tests, shared by the NCCL ranks (test_gpu) and the thread
// ranks (test_gpu_threads): sync_counts=false expanded dispatch + weighted combine, captured once
// on the rank's stream, then replayed three times with new values written into the captured
// inputs; every replay's combined output must equal the reference.
#pragma once

#include <string>

#include "common/scenario.hpp"
#include "epx/buffer.hpp"

namespace epx::testing {

// The configuration the graph scenario runs (a random one made capturable).
RandomConfig graph_config(uint64_t seed, int num_ranks);

// Runs the scenario on this rank; `buffer` must allocate its outputs from fixed memory (e.g. an
// ArenaAllocator: a graph replay writes the captured addresses again). "" when it matches.
std::string graph_replay_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                                  void* stream, const DeviceOps& ops);

}  // namespace epx::testing
