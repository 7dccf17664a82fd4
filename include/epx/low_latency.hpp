// The low-latency (LL) mode for decode steps (docs/semantics.md, "Low-latency mode"): a
// buffer built with BufferConfig::low_latency_max_tokens = S_ll > 0 exchanges up to S_ll tokens
// per rank through fixed per-expert regions of its workspace. One kernel per direction, no host
// synchronisation, no count exchange before rows move, one allocator call per operation; every
// call can be captured in a CUDA graph, and a graph may be replayed with new routing.
//
// Rank r receives, for each of its E_l local experts, up to R * S_ll rows: the rows of expert e
// are the first counts[e] of its region, in an order decided at run time; combine's result does
// not depend on it (it is bit-identical run to run).
//
// Rules (every rank):
//   - LL dispatches and LL combines alternate: dispatch (routing or cached) or
//     combine_backward, then combine, then again. A call out of turn is dropped on the device
//     and raises at the next synchronisation.
//   - The dispatch's outputs are views into the buffer's workspace, not copies: they stay valid
//     until this rank's LL combine of the next round (the rounds alternate between two halves of
//     the workspace; a CUDA graph replays the halves its capture used).
//   - After any LL error the buffer's LL mode raises kUnusable (the ranks' LL exchanges are out
//     of step); its normal operations keep working, and a timeout fails the whole buffer as
//     usual.
// The CUDA transport runs the LL kernels on BufferConfig::num_sms blocks when it is > 0, else on
// every SM of the device; ranks sharing a GPU must set their share (their blocks wait for each
// other).
#pragma once

#include <cstdint>

#include "epx/tensor.hpp"

namespace epx {

struct LowLatencyOptions {
  // Issue the sends and return at once; Buffer::low_latency_wait then launches the wait for the
  // peers (and, for a combine, the reduction). Outputs are valid after the wait. Both parts can
  // be captured in a CUDA graph. No other LL call may come between the two.
  bool return_hook = false;
};

// What an LL dispatch returns to its combine, combine_backward and cached dispatches. Made by a
// dispatch only (no default constructor, so that `{}` in a call always means the options).
struct LowLatencyHandle {
  LowLatencyHandle(uint64_t buffer_id, int32_t rank, int32_t num_ranks, int64_t num_tokens)
      : buffer_id(buffer_id), rank(rank), num_ranks(num_ranks), num_tokens(num_tokens) {}

  uint64_t buffer_id;
  uint64_t origin = 0;  // the number of the dispatch that made it in its buffer's sequence
  int32_t rank;
  int32_t num_ranks;
  int64_t num_tokens;  // S of this rank

  // One allocation per dispatch holds all three (they are views of it).
  Tensor topk_idx;  // [S, K] int32: the routing (global expert, or -1)
  Tensor slots;     // [S, K] int32: the row (t, k) took in its expert's region on the owner, -1
                    // where topk_idx is -1
  Tensor counts;    // [E_l] int32: rows this rank received per local expert
};

struct LowLatencyDispatchResult {
  // Views into the workspace (see the rules above); E_l local experts, R*S_ll rows each.
  Tensor x{};         // [E_l, R*S_ll, H], the dtype of the input (fp8 or bf16)
  Tensor x_scales{};  // [E_l, R*S_ll, H/128] fp32, with fp8 x
  Tensor weights{};   // [E_l, R*S_ll] fp32 when weights were given; 0 beyond counts
  Tensor aux{};       // [E_l, R*S_ll] fp32 when aux was given; 0 beyond counts
  Tensor src_info{};  // [E_l, R*S_ll] int32: (source rank * S_ll + t) * K + k; -1 beyond counts
  Tensor counts{};    // [E_l] int32: rows of each local expert
  LowLatencyHandle handle;
};

struct LowLatencyCombineInputs {
  // [E_l, R*S_ll, H] bf16: the expert outputs, row for row as the dispatch delivered them. When
  // it is Buffer::low_latency_combine_input() itself nothing is copied.
  TensorView x{};
  // [E_l, R*S_ll] fp32, optional: y[t] = sum over k of w_row * x_row. The dispatch's own
  // weights view is read where it is; any other tensor is copied first.
  TensorView weights{};
  TensorView scalars{};  // [E_l, R*S_ll] fp32, optional side channel, returned per (t, k)
};

struct LowLatencyCombineResult {
  Tensor x{};        // [S, H] bf16
  Tensor scalars{};  // [S, K] fp32 when scalars were given: the scalar of (t, k)'s row, 0 where
                     // topk_idx[t, k] == -1
};

}  // namespace epx
