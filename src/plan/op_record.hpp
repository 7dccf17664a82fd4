// What a rank says about the operation it enters, and where its peers find it. Shared by the
// host transport's barrier and the CUDA kernels' entry barrier.
//
// Each rank has, in every peer's workspace (and in every peer's shared-memory header on the host
// transport), two 128-byte lines only it writes: its barrier flag, and its PeerRecord. At an
// operation's entry it writes the operation's fingerprint and epoch into its record, then
// raises its flag with a release; a peer that acquires the flag reads the record and compares
// it with its own fingerprint. Ranks that disagree about the operation (its kind, its order in
// the buffer's sequence, its options, which optional tensors it has, which dispatch made its
// handle) all see the difference, and all raise before any row moves.
#pragma once

#include <cstdint>

#include "plan/host_device.hpp"

namespace epx::plan {

enum OpKind : uint32_t {
  kOpNone = 0,
  kOpDispatch = 1,
  kOpCachedDispatch = 2,
  kOpCombine = 3,
  kOpCombineBackward = 4,
  kOpLowLatencyDispatch = 5,
  kOpLowLatencyCachedDispatch = 6,
  kOpLowLatencyCombine = 7,
  kOpLowLatencyCombineBackward = 8,
};

// OpFingerprint::options bits.
enum OpOptionBits : uint32_t {
  kOptExpand = 1,
  kOptZeroPadding = 2,
  kOptSyncCounts = 4,
  kOptReduceAtSource = 8,
};
// OpFingerprint::tensors bits: the optional tensors the call has.
enum OpTensorBits : uint32_t {
  kTensorWeights = 1,
  kTensorAux = 2,
  kTensorScalars = 4,
  kTensorBias0 = 8,
  kTensorBias1 = 16,
  kTensorFp8 = 32,  // fp8 x with scales
};

struct OpFingerprint {
  uint64_t sequence = 0;       // this buffer's operations so far (1 for the first)
  uint64_t handle_origin = 0;  // sequence of the dispatch that made the handle; 0: no handle
  uint64_t config_hash = 0;    // of the buffer's configuration (its SetupRecord)
  uint32_t kind = kOpNone;
  uint32_t options = 0;
  uint32_t tensors = 0;
  int32_t alignment = 0;
};

// The fields of an OpFingerprint in the order first_difference numbers them.
enum OpField : int32_t {
  kFieldKind = 0,
  kFieldSequence,
  kFieldConfig,
  kFieldOptions,
  kFieldAlignment,
  kFieldTensors,
  kFieldHandle,
  kFieldCount
};

// The first field in which `a` and `b` differ, or -1; `value_a`/`value_b` get its values.
EPX_HD int32_t first_difference(const OpFingerprint& a, const OpFingerprint& b, uint64_t& value_a,
                                uint64_t& value_b) {
  const uint64_t fields_a[kFieldCount] = {
      a.kind,    a.sequence,     a.config_hash, a.options, uint32_t(a.alignment),
      a.tensors, a.handle_origin};
  const uint64_t fields_b[kFieldCount] = {
      b.kind,    b.sequence,     b.config_hash, b.options, uint32_t(b.alignment),
      b.tensors, b.handle_origin};
  for (int32_t f = 0; f < kFieldCount; ++f) {
    if (fields_a[f] != fields_b[f]) {
      value_a = fields_a[f];
      value_b = fields_b[f];
      return f;
    }
  }
  return -1;
}

// One rank's line in a peer's workspace (64 of its 128 bytes used).
struct PeerRecord {
  uint64_t abort_epoch;  // the epoch at which this rank aborted an operation; only abort writes
                         // it, so it survives the rank's next entries
  uint64_t poisoned;     // non-zero: this rank's buffer failed (a timeout); nothing will work
  uint64_t op_epoch;     // the entry epoch `op` was published for
  OpFingerprint op;
};

constexpr int64_t kPeerLineBytes = 128;  // one writer per line (see WorkspaceLayout::flag)

// The flags [R] and records [R] lines, at `base` (the start of a workspace, or the barrier area
// of a shared-memory header): 2 * R lines.
EPX_HD int64_t peer_lines_bytes(int32_t num_ranks) {
  return 2 * kPeerLineBytes * num_ranks;
}
EPX_HD uint64_t* peer_flag(char* base, int peer) {
  return reinterpret_cast<uint64_t*>(base + peer * kPeerLineBytes);
}
EPX_HD PeerRecord* peer_record(char* base, int32_t num_ranks, int peer) {
  return reinterpret_cast<PeerRecord*>(base + (num_ranks + peer) * kPeerLineBytes);
}

}  // namespace epx::plan
