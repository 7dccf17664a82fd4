// What every rank states about a buffer when it sets it up: the configuration it was built
// with. Each transport exchanges the records during setup (in its rendezvous, before any
// workspace is mapped or sized) and every rank compares every peer's record with its own, so a
// rank built with another hidden size or expert count makes every rank raise an error naming
// both ranks and the field, instead of a size mismatch, a hang or a silently wrong exchange.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

#include "epx/config.hpp"

namespace epx::detail {

// Plain data (it travels through shared memory, files and NCCL as bytes).
struct SetupRecord {
  static constexpr uint64_t kMagic = 0x6570782d73657431ull;  // "epx-set1": the record's format
  uint64_t magic = kMagic;
  int64_t num_ranks = 0;
  int64_t max_tokens_per_rank = 0;
  int64_t hidden = 0;
  int64_t num_experts = 0;
  int64_t num_topk = 0;
  int64_t fp8_dispatch = 0;
  int64_t low_latency_max_tokens = 0;
  double timeout_seconds = 0;
  uint64_t buffer_index = 0;  // buffers of one communicator, in the order they were created
};

inline SetupRecord setup_record(const BufferConfig& config, int num_ranks, uint64_t buffer_index) {
  SetupRecord record;
  record.num_ranks = num_ranks;
  record.max_tokens_per_rank = config.max_tokens_per_rank;
  record.hidden = config.hidden;
  record.num_experts = config.num_experts;
  record.num_topk = config.num_topk;
  record.fp8_dispatch = config.fp8_dispatch;
  record.low_latency_max_tokens = config.low_latency_max_tokens;
  record.timeout_seconds = config.timeout_seconds;
  record.buffer_index = buffer_index;
  return record;
}

// "" when `theirs` (rank `peer`'s) agrees with `mine` (rank `rank`'s); else a sentence naming
// both ranks and every field that differs.
inline std::string setup_mismatch(const SetupRecord& mine, int rank, const SetupRecord& theirs,
                                  int peer) {
  std::ostringstream out;
  auto field = [&](const char* name, auto here, auto there) {
    if (here == there) return;
    out << (out.tellp() > 0 ? ", " : "") << name << " " << there << " on rank " << peer << ", "
        << here << " on rank " << rank;
  };
  if (theirs.magic != mine.magic) {
    out << "rank " << peer << " runs another epx version (setup record format " << std::hex
        << theirs.magic << ", this rank " << mine.magic << ")";
    return out.str();
  }
  field("num_ranks", mine.num_ranks, theirs.num_ranks);
  field("max_tokens_per_rank", mine.max_tokens_per_rank, theirs.max_tokens_per_rank);
  field("hidden", mine.hidden, theirs.hidden);
  field("num_experts", mine.num_experts, theirs.num_experts);
  field("num_topk", mine.num_topk, theirs.num_topk);
  field("fp8_dispatch", mine.fp8_dispatch, theirs.fp8_dispatch);
  field("low_latency_max_tokens", mine.low_latency_max_tokens, theirs.low_latency_max_tokens);
  field("timeout_seconds", mine.timeout_seconds, theirs.timeout_seconds);
  field("buffer number", mine.buffer_index, theirs.buffer_index);
  if (out.tellp() == 0) return "";
  return "every rank must build its Buffer with the same configuration, in the same order: " +
         out.str();
}

}  // namespace epx::detail
