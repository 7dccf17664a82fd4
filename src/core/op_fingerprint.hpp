// Operation fingerprints (plan/op_record.hpp) on the host: made by the Buffer for every call
// from its inputs and options, and turned into a sentence when two ranks' fingerprints differ.
#pragma once

#include <cstdint>
#include <string>

#include "core/setup_record.hpp"
#include "epx/buffer.hpp"
#include "plan/op_record.hpp"

namespace epx::detail {

// A stable hash of a buffer's configuration (FNV-1a over its SetupRecord's fields).
uint64_t config_hash(const SetupRecord& record);

// The fingerprint of each operation, `sequence` being its number in the buffer's sequence.
plan::OpFingerprint dispatch_fingerprint(const DispatchInputs& in, const DispatchOptions& options,
                                         uint64_t sequence, uint64_t config);
plan::OpFingerprint cached_dispatch_fingerprint(const DispatchInputs& in, const Handle& handle,
                                                uint64_t sequence, uint64_t config);
plan::OpFingerprint combine_fingerprint(const CombineInputs& in, const Handle& handle,
                                        ReduceAt reduce_at, uint64_t sequence, uint64_t config);
plan::OpFingerprint combine_backward_fingerprint(const Handle& handle, uint64_t sequence,
                                                 uint64_t config);
// The low-latency calls' (`cached` null: a routing dispatch). They carry no options or alignment:
// the buffer's configuration fixes the LL layout.
plan::OpFingerprint low_latency_dispatch_fingerprint(const DispatchInputs& in,
                                                     const LowLatencyHandle* cached,
                                                     uint64_t sequence, uint64_t config);
plan::OpFingerprint low_latency_combine_fingerprint(const LowLatencyCombineInputs& in,
                                                    const LowLatencyHandle& handle,
                                                    uint64_t sequence, uint64_t config);
plan::OpFingerprint low_latency_combine_backward_fingerprint(const LowLatencyHandle& handle,
                                                             uint64_t sequence, uint64_t config);

const char* op_kind_name(uint32_t kind);

// "" when `theirs` (rank `peer`'s) equals `mine` (rank `rank`'s), else what differs, naming both
// ranks. `theirs` null: the peer's record is of another barrier (it is at another operation).
std::string describe_op_mismatch(const plan::OpFingerprint& mine, int rank,
                                 const plan::OpFingerprint* theirs, int peer);
// The same from the one differing field a kernel recorded (DeviceStatus: field, mine, theirs).
std::string describe_op_field(int32_t field, uint64_t mine, uint64_t theirs, int rank, int peer);

}  // namespace epx::detail
