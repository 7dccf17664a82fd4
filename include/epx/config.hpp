// What a Buffer is sized for. Every rank must pass the same BufferConfig.
#pragma once

#include <cstddef>
#include <cstdint>

namespace epx {

struct BufferConfig {
  int64_t max_tokens_per_rank = 0;     // S_max: every rank's S must be <= this
  int64_t hidden = 0;                  // H (a multiple of 128 when fp8_dispatch)
  int64_t num_experts = 0;             // E, a multiple of the rank count
  int64_t num_topk = 0;                // K
  bool fp8_dispatch = false;           // size staging for fp8 rows (data + fp32 scales per 128)
  double timeout_seconds = 100.0;      // every wait for a peer gives up after this long
  int num_sms = 0;                     // CUDA transport: blocks per kernel (0 = library default)
  int64_t low_latency_max_tokens = 0;  // S_ll of the low-latency mode (0: the mode is off)
};

// Bytes of the symmetric buffer each rank allocates for `config` with `num_ranks` ranks,
// without allocating anything.
size_t workspace_bytes(const BufferConfig& config, int num_ranks);

}  // namespace epx
