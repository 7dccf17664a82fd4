#include "core/op_fingerprint.hpp"

#include <cstring>
#include <sstream>

namespace epx::detail {
namespace {

using namespace plan;

uint32_t tensor_bits(std::initializer_list<std::pair<const TensorView*, uint32_t>> tensors) {
  uint32_t bits = 0;
  for (const auto& [tensor, bit] : tensors) {
    if (tensor->defined()) bits |= bit;
  }
  return bits;
}

uint32_t fp8_bit(const DispatchInputs& in) {
  return in.x.defined() && in.x.dtype == DType::kFloat8E4M3 ? uint32_t(kTensorFp8) : 0u;
}

uint32_t layout_bits(const Handle& handle) {
  return (handle.expand ? uint32_t(kOptExpand) : 0u) |
         (handle.zero_padding ? uint32_t(kOptZeroPadding) : 0u) |
         (handle.counts_synced ? uint32_t(kOptSyncCounts) : 0u);
}

std::string options_text(uint32_t options) {
  std::string text = options & kOptExpand ? "expanded" : "compact";
  if (options & kOptExpand)
    text += options & kOptZeroPadding ? ", zero padding" : ", no zero padding";
  text += options & kOptSyncCounts ? ", counts synced" : ", counts on the device";
  if (options & kOptReduceAtSource) text += ", reduced at the source";
  return text;
}

std::string tensors_text(uint32_t mine, uint32_t theirs, int rank, int peer) {
  static const std::pair<uint32_t, const char*> names[] = {
      {kTensorWeights, "weights"},     {kTensorAux, "aux"},
      {kTensorScalars, "scalars"},     {kTensorBias0, "bias"},
      {kTensorBias1, "a second bias"}, {kTensorFp8, "fp8 x"}};
  std::ostringstream out;
  for (const auto& [bit, name] : names) {
    if ((mine & bit) == (theirs & bit)) continue;
    if (out.tellp() > 0) out << "; ";
    out << name << " given on rank " << ((mine & bit) ? rank : peer) << ", not on rank "
        << ((mine & bit) ? peer : rank);
  }
  return out.str();
}

}  // namespace

uint64_t config_hash(const SetupRecord& record) {
  const int64_t fields[] = {record.num_ranks,
                            record.max_tokens_per_rank,
                            record.hidden,
                            record.num_experts,
                            record.num_topk,
                            record.fp8_dispatch,
                            record.low_latency_max_tokens};
  uint64_t hash = 0xcbf29ce484222325ull;
  for (int64_t field : fields) {
    unsigned char bytes[sizeof(field)];
    std::memcpy(bytes, &field, sizeof(field));
    for (unsigned char byte : bytes) hash = (hash ^ byte) * 0x100000001b3ull;
  }
  return hash;
}

OpFingerprint dispatch_fingerprint(const DispatchInputs& in, const DispatchOptions& options,
                                   uint64_t sequence, uint64_t config) {
  return {
      .sequence = sequence,
      .config_hash = config,
      .kind = kOpDispatch,
      .options = (options.expand ? uint32_t(kOptExpand) : 0u) |
                 (options.expand && options.zero_padding ? uint32_t(kOptZeroPadding) : 0u) |
                 (options.sync_counts ? uint32_t(kOptSyncCounts) : 0u),
      .tensors = tensor_bits({{&in.weights, kTensorWeights}, {&in.aux, kTensorAux}}) | fp8_bit(in),
      .alignment = options.expand ? options.expert_alignment : 1};
}

OpFingerprint cached_dispatch_fingerprint(const DispatchInputs& in, const Handle& handle,
                                          uint64_t sequence, uint64_t config) {
  return {
      .sequence = sequence,
      .handle_origin = handle.origin,
      .config_hash = config,
      .kind = kOpCachedDispatch,
      .options = layout_bits(handle),
      .tensors = tensor_bits({{&in.weights, kTensorWeights}, {&in.aux, kTensorAux}}) | fp8_bit(in),
      .alignment = handle.expert_alignment};
}

OpFingerprint combine_fingerprint(const CombineInputs& in, const Handle& handle, ReduceAt reduce_at,
                                  uint64_t sequence, uint64_t config) {
  const bool at_source = handle.expand && reduce_at == ReduceAt::kSource;
  return {.sequence = sequence,
          .handle_origin = handle.origin,
          .config_hash = config,
          .kind = kOpCombine,
          .options = layout_bits(handle) | (at_source ? uint32_t(kOptReduceAtSource) : 0u),
          .tensors = tensor_bits({{&in.weights, kTensorWeights},
                                  {&in.scalars, kTensorScalars},
                                  {&in.bias0, kTensorBias0},
                                  {&in.bias1, kTensorBias1}}),
          .alignment = handle.expert_alignment};
}

OpFingerprint combine_backward_fingerprint(const Handle& handle, uint64_t sequence,
                                           uint64_t config) {
  return {.sequence = sequence,
          .handle_origin = handle.origin,
          .config_hash = config,
          .kind = kOpCombineBackward,
          .options = layout_bits(handle),
          .alignment = handle.expert_alignment};
}

OpFingerprint low_latency_dispatch_fingerprint(const DispatchInputs& in,
                                               const LowLatencyHandle* cached, uint64_t sequence,
                                               uint64_t config) {
  return {
      .sequence = sequence,
      .handle_origin = cached ? cached->origin : 0,
      .config_hash = config,
      .kind = cached ? kOpLowLatencyCachedDispatch : kOpLowLatencyDispatch,
      .tensors = tensor_bits({{&in.weights, kTensorWeights}, {&in.aux, kTensorAux}}) | fp8_bit(in)};
}

OpFingerprint low_latency_combine_fingerprint(const LowLatencyCombineInputs& in,
                                              const LowLatencyHandle& handle, uint64_t sequence,
                                              uint64_t config) {
  return {.sequence = sequence,
          .handle_origin = handle.origin,
          .config_hash = config,
          .kind = kOpLowLatencyCombine,
          .tensors = tensor_bits({{&in.weights, kTensorWeights}, {&in.scalars, kTensorScalars}})};
}

OpFingerprint low_latency_combine_backward_fingerprint(const LowLatencyHandle& handle,
                                                       uint64_t sequence, uint64_t config) {
  return {.sequence = sequence,
          .handle_origin = handle.origin,
          .config_hash = config,
          .kind = kOpLowLatencyCombineBackward};
}

const char* op_kind_name(uint32_t kind) {
  switch (kind) {
    case kOpDispatch:
      return "dispatch";
    case kOpCachedDispatch:
      return "cached dispatch";
    case kOpCombine:
      return "combine";
    case kOpCombineBackward:
      return "combine_backward";
    case kOpLowLatencyDispatch:
      return "low_latency_dispatch";
    case kOpLowLatencyCachedDispatch:
      return "cached low_latency_dispatch";
    case kOpLowLatencyCombine:
      return "low_latency_combine";
    case kOpLowLatencyCombineBackward:
      return "low_latency_combine_backward";
    default:
      return "no operation";
  }
}

std::string describe_op_field(int32_t field, uint64_t mine, uint64_t theirs, int rank, int peer) {
  std::ostringstream out;
  out << "ranks " << rank << " and " << peer << " disagree about the operation: ";
  switch (field) {
    case kFieldKind:
      out << "rank " << peer << " calls " << op_kind_name(uint32_t(theirs)) << ", rank " << rank
          << " calls " << op_kind_name(uint32_t(mine));
      break;
    case kFieldSequence:
      out << "it is operation #" << theirs << " of this buffer on rank " << peer << ", #" << mine
          << " on rank " << rank << " (a rank skipped or repeated an operation)";
      break;
    case kFieldConfig:
      out << "their buffers were built with different configurations";
      break;
    case kFieldOptions:
      out << "rank " << peer << ": " << options_text(uint32_t(theirs)) << "; rank " << rank << ": "
          << options_text(uint32_t(mine));
      break;
    case kFieldAlignment:
      out << "expert_alignment " << theirs << " on rank " << peer << ", " << mine << " on rank "
          << rank;
      break;
    case kFieldTensors:
      out << tensors_text(uint32_t(mine), uint32_t(theirs), rank, peer);
      break;
    case kFieldHandle:
      out << "the handle was made by operation #" << theirs << " on rank " << peer << ", by #"
          << mine << " on rank " << rank << " (handles of different dispatches)";
      break;
    default:
      out << "field " << field << " differs";
  }
  out << "; nothing was exchanged";
  return out.str();
}

std::string describe_op_mismatch(const OpFingerprint& mine, int rank, const OpFingerprint* theirs,
                                 int peer) {
  if (!theirs) {
    std::ostringstream out;
    out << "rank " << peer << " passed this barrier without entering this operation (it is at "
        << "another one, or its buffer failed); nothing was exchanged";
    return out.str();
  }
  uint64_t a = 0, b = 0;
  const int32_t field = first_difference(mine, *theirs, a, b);
  return field < 0 ? "" : describe_op_field(field, a, b, rank, peer);
}

}  // namespace epx::detail
