// The device side of the low-latency protocol's words (plan/low_latency_layout.hpp): the
// state word a kernel enters by, the handoff from a grid's blocks to the last of them, the
// claimed / sent / ready flags raised to the peers and waited for, the failed flags.
//
// Memory order, as in cuda/device/operation_sync.cuh: a flag is raised with a release at system
// scope (publish_max_system) by threads of a block after a block barrier; a handoff orders every
// block's stores before it (a block barrier, one fence.acq_rel.sys per block, a counter, a GPU
// fence in the last block), and the release is cumulative over them. A waiting thread acquires
// the flag at system scope; a block barrier then orders its block's reads after it. No thread
// waits for this rank's own flag where stream order or its grid's handoff already put the
// flag's stores before it, and no thread raises its own line where no reader reads it.
#pragma once

#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/kernels/low_latency.hpp"

namespace epx::cuda {

// Records an LL error of this rank (the host raises it at the next synchronisation, and the
// mode fails) and sets this rank's line of every peer's failed flags, so that none of them
// waits for this rank's part of a round any more. One thread.
__device__ __forceinline__ void low_latency_error(const LowLatencyContext& c, int32_t code,
                                                  int32_t phase, int32_t peer, int32_t value = 0,
                                                  uint64_t expected = 0, uint64_t seen = 0) {
  record_error(c.topo, code, kPhaseLowLatency + phase, peer, value, expected, seen);
  for (int p = 0; p < c.layout.num_ranks; ++p) {
    *static_cast<volatile uint64_t*>(c.layout.failed_flag(c.topo.peers[p], c.topo.rank)) = 1;
  }
  __threadfence_system();
}

// Whether this part of a call may run: the state word is `step.before`. Every block reads it
// (the previous LL launch wrote it, so all agree) and returns alike; when it is not, block 0
// records the call out of turn: the call is dropped.
__device__ __forceinline__ bool low_latency_enter(const LowLatencyContext& c,
                                                  plan::LowLatencyStep step, int32_t phase) {
  const uint32_t state = *static_cast<volatile uint32_t*>(&c.scratch->state);
  if (state == step.before) return true;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    low_latency_error(c, kDeviceLowLatencyOrder, phase, c.topo.rank, static_cast<int32_t>(state));
  }
  return false;
}

// The handoff from `blocks` blocks to the last of them through `counter` (reset for its next
// use): true in the last block, whose next stores and releases come after every block's stores.
__device__ __forceinline__ bool low_latency_last_block(uint32_t* counter, uint32_t blocks) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    fence_release_system();
    last = atomicAdd(counter, 1u) == blocks - 1;
    if (last) {
      fence_acquire_gpu();
      *counter = 0;
    }
  }
  __syncthreads();
  return last != 0;
}

// Threads [first, first + R) raise this rank's line of peer threadIdx.x - first's `kind` flags to
// (epoch, tags); the caller's block barrier and handoff order what they publish. `skip_own`: not
// this rank's own line, which no reader of this round reads (its reads of its own part are
// ordered by stream or grid), and which would hold its thread at the release's system membar.
__device__ __forceinline__ void low_latency_publish(const LowLatencyContext& c,
                                                    plan::LowLatencyFlag kind, uint64_t epoch,
                                                    uint32_t tags, int first = 0,
                                                    bool skip_own = false) {
  const int peer = static_cast<int>(threadIdx.x) - first;
  if (peer < 0 || peer >= c.layout.num_ranks || (skip_own && peer == c.topo.rank)) return;
  publish_max_system(c.layout.flag(kind, c.topo.peers[peer], c.topo.rank),
                     plan::low_latency_flag(epoch, tags));
}

// Thread p < R of the block waits for peer p's `kind` flag of this round, bounded by
// the timeout; a peer whose LL mode failed (its failed flag, read before the flag once more: a
// flag that arrived is never overruled) or whose buffer failed (its poison mark) ends the
// wait. Then its tags are checked against this rank's (a claimed or sent flag: the dispatch
// direction's tags). Returns the peer's tags (0 for other threads); `ok` false when this thread recorded an
// error. `own_ordered`: what this rank's own flag publishes is ordered before the caller already
// (written by an earlier kernel on the stream, or the caller is its grid's last block), so its
// thread returns `own_tags` (the tags this rank raises) without reading the flag.
__device__ __forceinline__ uint32_t low_latency_wait(const LowLatencyContext& c,
                                                     plan::LowLatencyFlag kind,
                                                     uint64_t epoch, int32_t phase, bool& ok,
                                                     bool own_ordered, uint32_t own_tags) {
  ok = true;
  const int peer = threadIdx.x;
  if (peer >= c.layout.num_ranks) return 0;
  if (own_ordered && peer == c.topo.rank) return own_tags;
  char* local = c.topo.peers[c.topo.rank];
  const bool ready = kind == plan::LowLatencyFlag::kReady;
  const uint64_t* flag = c.layout.flag(kind, local, peer);
  const volatile uint64_t* failed = c.layout.failed_flag(local, peer);
  const volatile plan::PeerRecord* record = c.topo.layout.record(local, peer);
  const uint64_t start = global_timer_ns();
  uint64_t seen = load_acquire_system(flag);
  while (plan::low_latency_epoch(seen) < epoch) {
    if (*failed != 0 || record->poisoned != 0) {
      seen = load_acquire_system(flag);
      if (plan::low_latency_epoch(seen) >= epoch) break;
      record_error(c.topo, *failed != 0 ? kDevicePeerAborted : kDevicePeerFailed,
                   kPhaseLowLatency + phase, peer);
      ok = false;
      return 0;
    }
    if (global_timer_ns() - start > c.topo.timeout_ns) {
      low_latency_error(c, kDeviceTimeout, phase, peer, 0, epoch, plan::low_latency_epoch(seen));
      ok = false;
      return 0;
    }
    __nanosleep(32);
    seen = load_acquire_system(flag);
  }
  const uint32_t theirs = plan::low_latency_tags(seen);
  if (!ready && (theirs & plan::kTagBadRouting)) {
    record_error(c.topo, kDeviceBadRouting, kPhaseLowLatency + phase, peer);
    ok = false;
  } else if (!plan::low_latency_tags_agree(c.tags, theirs, !ready)) {
    low_latency_error(c, kDeviceLowLatencyMismatch, phase, peer, 0, c.tags, theirs);
    ok = false;
  }
  return theirs;
}

}  // namespace epx::cuda
