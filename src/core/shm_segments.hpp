// Named POSIX shared-memory segments, one per rank, every one mapped by every rank of one host:
// the host transport's symmetric workspace, and the IPC transport's rendezvous (where its ranks
// leave their CUDA IPC handles). Setup and every barrier are bounded by a timeout that names
// the missing rank and the phase.
//
// A segment is a header (the setup record, the creator's pid, the barrier's flags and peer
// records: plan/op_record.hpp) followed by `payload_bytes` for the user. Setup is collective:
//   1. each rank creates its segment (replacing one a dead process left under the same name)
//      and states its SetupRecord there;
//   2. each rank reads every peer's record and marks that it has read them all; once every
//      rank has, each compares the records, so a configuration mismatch raises on every rank
//      (naming both ranks and the fields) rather than some timing out;
//   3. each rank maps every payload and passes a first barrier; every name is then unlinked (by
//      every rank), so a process killed later leaves nothing in /dev/shm. A setup that fails
//      unlinks every rank's segment too: it failed for all of them, and a peer killed during it
//      cannot clean up after itself.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "core/setup_record.hpp"
#include "plan/op_record.hpp"

namespace epx::detail {

// The checks of a communicator whose ranks meet through ShmSegments (Comm::host, Comm::ipc):
// 1 to 64 ranks, `rank` among them, a name of 1 to 128 letters, digits, '-' or '_'.
void check_segment_ranks_and_name(const char* transport, int rank, int num_ranks,
                                  const std::string& name);

class ShmSegments {
 public:
  ShmSegments(const std::string& name, int rank, int num_ranks, size_t payload_bytes,
              const SetupRecord& record, double timeout_seconds);
  ~ShmSegments();
  ShmSegments(const ShmSegments&) = delete;
  ShmSegments& operator=(const ShmSegments&) = delete;

  char* payload(int rank) const { return payloads_[rank]; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }

  // The barrier of docs/protocol.md: publish this rank's epoch (release), then wait for every
  // peer's (acquire), bounded by the timeout (kTimeout naming `phase`, the rank, the epochs).
  // With `op`, it is an operation's entry: this rank's fingerprint goes out with the flag and
  // every peer's is compared with it (kInvalidArgument naming both ranks and what differs).
  // A peer that aborted this barrier (abort()) or whose buffer failed (poison()) makes it raise
  // at once.
  void barrier(const char* phase, const plan::OpFingerprint* op = nullptr);
  // Arrives at the next barrier marked as aborted and returns without waiting: the peers waiting
  // in it raise instead of exchanging. Used when this rank rejected its own input.
  void abort();
  // Marks this rank's buffer as failed in every peer's records: their next barrier (or the one
  // they wait in) raises instead of waiting for this rank.
  void poison();

 private:
  struct Mapping {
    char* address = nullptr;
    size_t bytes = 0;
  };
  std::string segment_name(int rank) const;
  void create_own_segment(const SetupRecord& record);
  Mapping open_header(int peer, std::chrono::steady_clock::time_point deadline);
  void check_records(const SetupRecord& mine, std::chrono::steady_clock::time_point deadline);
  void map_payloads();
  void unlink_peers();
  void release();
  char* lines(int rank) const;  // the barrier area of rank's header

  std::string name_;
  int rank_;
  int num_ranks_;
  size_t payload_bytes_;
  size_t header_bytes_;
  double timeout_seconds_;
  uint64_t epoch_ = 0;
  bool own_unlinked_ = false;
  std::vector<Mapping> mappings_;
  std::vector<char*> payloads_;
};

}  // namespace epx::detail
