// The host transport's symmetric buffer: each rank creates one POSIX shared-memory segment of
// WorkspaceLayout::total_bytes() and maps every peer's, so rank r addresses peer p's workspace
// at peer(p). Also the bounded epoch barrier of docs/protocol.md over the workspace flags.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "plan/workspace_layout.hpp"

namespace epx::detail {

class ShmWorkspace {
 public:
  // Collective: returns once every rank has mapped every segment, or throws kTimeout naming
  // the missing peer after `timeout_seconds`.
  ShmWorkspace(const std::string& name, int rank, int num_ranks, const plan::WorkspaceLayout& layout,
               double timeout_seconds);
  ~ShmWorkspace();
  ShmWorkspace(const ShmWorkspace&) = delete;
  ShmWorkspace& operator=(const ShmWorkspace&) = delete;

  char* local() const { return peers_[rank_]; }
  char* peer(int rank) const { return peers_[rank]; }
  const plan::WorkspaceLayout& layout() const { return layout_; }

  // The barrier of docs/protocol.md: publish (release) and wait for every peer (acquire).
  // `phase` names the operation and step in a timeout error, e.g. "dispatch/exit". Throws
  // kInvalidArgument if a peer aborted this operation (abort() below) instead of arriving.
  void barrier(const char* phase);
  // Arrives at the next entry barrier marked as aborted and returns without waiting: the peers,
  // waiting in the same entry barrier, raise instead of exchanging. Used when this rank
  // rejected its own input, so that a bad call on one rank never strands the others.
  void abort(const char* operation);

 private:
  struct Mapping {
    char* address = nullptr;
    size_t bytes = 0;
  };
  void release();  // unmap everything, unlink this rank's segment if still named
  std::string segment_name(int rank) const;
  Mapping create_own_segment();
  Mapping open_peer_segment(int peer, std::chrono::steady_clock::time_point deadline);

  std::string name_;
  int rank_;
  int num_ranks_;
  plan::WorkspaceLayout layout_;
  double timeout_seconds_;
  uint64_t epoch_ = 0;
  bool own_unlinked_ = false;
  std::vector<Mapping> mappings_;
  std::vector<char*> peers_;  // workspace start of each rank (after the segment header)
};

}  // namespace epx::detail
