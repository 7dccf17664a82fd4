// The entry and exit barriers of an operation, folded into the kernels that do the work (one
// launch fewer per barrier, docs/protocol.md "barriers inside the kernels").
//
// Epochs: the device counter `topo.epoch` counts the barriers this rank has passed. An operation
// uses two: entry = epoch + 1 (a rank publishes it once it has stopped reading its staging from
// the previous operation) and exit = epoch + 2 (published once its rows are in the peers'
// staging). Their kernels:
//
//   first writing kernel   every block: operation_entry (block 0 publishes entry; each block
//                          waits for every peer's entry itself, so no block waits on another
//                          block of its grid and none needs to be co-resident), the block's
//                          stores into peers, then operation_handoff: the last block to finish
//                          publishes exit and advances the epoch counter.
//   next kernel            every block: operation_exit_wait, then the local epilogue.
//
// Failures keep the rule of the standalone barrier they replace: after a recorded failure no
// barrier publishes or advances. A rank that found a failure before the operation therefore
// publishes nothing for it; one whose entry wait failed (timeout, a peer aborted) has passed the
// entry barrier only, which is what an aborting peer does (abort_kernel), so epochs stay paired.
#pragma once

#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/kernels/kernels.hpp"

namespace epx::cuda {

// Threads [0, R) of the block wait for peer `threadIdx.x` to publish `epoch` into this rank's
// flags, bounded by the timeout; a peer whose buffer failed (its poison mark) ends the wait at
// once. At an operation's `entry`, the peer's record is checked too: an abort mark of that
// epoch, or a fingerprint that is not this rank's (another operation, other options), is an
// error on this rank, as it is on the peer, which sees this rank's. The record is read with
// loads issued together after the flag's acquire (one round trip, as the abort mark alone
// took). False: this thread recorded a failure (other threads return true).
__device__ __forceinline__ bool wait_for_peers(const Topology& topo, uint64_t epoch, int32_t phase,
                                               bool entry) {
  const plan::WorkspaceLayout& layout = topo.layout;
  const int peer = threadIdx.x;
  if (peer >= layout.num_ranks) return true;
  char* local = topo.peers[topo.rank];
  const uint64_t* flag = layout.flag(local, peer);
  const volatile plan::PeerRecord* record = layout.record(local, peer);
  const uint64_t start = global_timer_ns();
  uint64_t seen = load_acquire_system(flag);
  while (seen < epoch) {
    if (record->poisoned != 0) {
      record_error(topo, kDevicePeerFailed, phase, peer);
      return false;
    }
    if (global_timer_ns() - start > topo.timeout_ns) {
      record_error(topo, kDeviceTimeout, phase, peer, 0, epoch, seen);
      return false;
    }
    __nanosleep(32);
    seen = load_acquire_system(flag);
  }
  if (!entry) return true;
  const uint64_t aborted = record->abort_epoch, poisoned = record->poisoned;
  const uint64_t op_epoch = record->op_epoch;
  plan::OpFingerprint theirs;
  theirs.sequence = record->op.sequence;
  theirs.handle_origin = record->op.handle_origin;
  theirs.config_hash = record->op.config_hash;
  theirs.kind = record->op.kind;
  theirs.options = record->op.options;
  theirs.tensors = record->op.tensors;
  theirs.alignment = record->op.alignment;
  if (aborted == epoch) {
    record_error(topo, kDevicePeerAborted, phase, peer);
    return false;
  }
  if (poisoned != 0) {
    record_error(topo, kDevicePeerFailed, phase, peer);
    return false;
  }
  uint64_t mine = 0, other = 0;
  const int32_t field =
      op_epoch != epoch ? -1 : plan::first_difference(topo.op, theirs, mine, other);
  if (op_epoch != epoch || field >= 0) {
    record_error(topo, kDeviceOpMismatch, phase, peer, field, mine, other);
    return false;
  }
  return true;
}

// Whether every thread's wait_for_peers of this block returned true; a block barrier.
// Failures recorded by other blocks need not stop this one: its own waits saw every peer
// arrive (and none abort), so its stores are expected (and re-reading the failure flag would
// add a memory round trip to every kernel's start, docs/performance.md).
__device__ __forceinline__ bool block_all(bool ok) {
  return __syncthreads_and(ok) != 0;
}

// Threads [0, R) publish `epoch` into every peer's flag slot of this rank: a release at system
// scope (publish_max_system), so every earlier store of this thread, of its block (ordered by
// the caller's block barrier) and of the earlier kernels is visible to a peer that acquires the
// flag. The release is cumulative over what the barrier ordered before it, so only the
// publishing threads order anything, as in a cooperative grid barrier (a fence in every thread
// costs ~0.5 us more per kernel: bench/micro/sync_costs.cu, docs/performance.md). The
// release compiles to a system membar and the reduction; an explicit __threadfence_system()
// before it was a second membar on the path to every barrier (docs/performance.md).
__device__ __forceinline__ void publish_to_peers(const Topology& topo, uint64_t epoch) {
  const plan::WorkspaceLayout& layout = topo.layout;
  const int peer = threadIdx.x;
  if (peer < layout.num_ranks) publish_max_system(layout.flag(topo.peers[peer], topo.rank), epoch);
}

// An operation's entry: as publish_to_peers, with this rank's record of the operation (its
// fingerprint, for `epoch`) written into each peer first; the release carries it.
__device__ __forceinline__ void publish_entry(const Topology& topo, uint64_t epoch) {
  const plan::WorkspaceLayout& layout = topo.layout;
  const int peer = threadIdx.x;
  if (peer >= layout.num_ranks) return;
  plan::PeerRecord* record = layout.record(topo.peers[peer], topo.rank);
  record->op = topo.op;
  record->op_epoch = epoch;
  publish_max_system(layout.flag(topo.peers[peer], topo.rank), epoch);
}

__device__ __forceinline__ bool no_failure(const Topology& topo) {
  return *static_cast<volatile int32_t*>(topo.failed) == 0;
}

// No failure recorded, as thread 0 reads it, for the whole block (one block barrier).
__device__ __forceinline__ bool block_sees_no_failure(const Topology& topo) {
  return __syncthreads_or(threadIdx.x == 0 && !no_failure(topo)) == 0;
}

// The entry published early, by one block of a kernel that runs before the first writing
// kernel (the routing plan): when an operation's first kernel starts, this rank has stopped
// reading its staging, so the entry can go out while the plan computes, and the writing kernel
// usually finds every peer's entry there already. Same rule as operation_entry: nothing is
// published after a recorded failure. The writing kernel is then told not to publish again.
__device__ __forceinline__ void publish_entry_early(const Topology& topo) {
  if (!block_sees_no_failure(topo)) return;
  publish_entry(topo, *topo.epoch + 1);
  if (threadIdx.x == 0) topo.sync->entry_published = 1;
}

// Entry barrier at the start of the operation's first writing kernel, run by every block;
// false: the block must skip its work (a failure is recorded) and go on to operation_handoff.
// `published`: publish_entry_early already ran for this operation.
__device__ __forceinline__ bool operation_entry(const Topology& topo, int32_t phase,
                                                bool published = false) {
  // Every block reads the counter before its handoff; only the last block writes it. Loaded
  // together with the failure flag, before the barrier.
  const uint64_t entry = *topo.epoch + 1;
  const bool go = block_sees_no_failure(topo);
  if (blockIdx.x == 0 && go && !published) {
    publish_entry(topo, entry);
    if (threadIdx.x == 0) topo.sync->entry_published = 1;
  }
  return block_all(!go || wait_for_peers(topo, entry, phase, true)) && go;
}

// End of the operation's first writing kernel, run by every block (after operation_entry,
// whatever it returned). The last block to get here publishes the exit barrier (when
// `publish_exit` and nothing failed) and leaves the epoch counter at the barriers passed.
__device__ __forceinline__ void operation_handoff(const Topology& topo, bool publish_exit) {
  __shared__ int last;
  __syncthreads();  // the block's stores are done
  if (threadIdx.x == 0) {
    fence_release_system();  // cumulative: covers the block's stores ordered by the barrier
    last = atomicAdd(&topo.sync->blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __shared__ int publish;
  __shared__ uint64_t entry;
  if (threadIdx.x == 0) {
    // Acquire: every block's fence and count happen before what follows (the blocks share the
    // GPU; the exit's release below carries their stores to the peers).
    fence_acquire_gpu();
    entry = *topo.epoch + 1;
    const bool entered = *static_cast<volatile uint32_t*>(&topo.sync->entry_published) != 0;
    publish = entered && publish_exit && no_failure(topo);
    *topo.epoch = !entered ? entry - 1 : publish ? entry + 1 : entry;
    topo.sync->blocks_done = 0;
    topo.sync->entry_published = 0;
  }
  __syncthreads();
  if (publish) publish_to_peers(topo, entry + 1);
}

// Exit barrier at the start of the kernel after the handoff, run by every block; false: skip.
__device__ __forceinline__ bool operation_exit_wait(const Topology& topo, int32_t phase) {
  const uint64_t exit = *topo.epoch;
  const bool go = block_sees_no_failure(topo);
  return block_all(!go || wait_for_peers(topo, exit, phase, false)) && go;
}

}  // namespace epx::cuda
