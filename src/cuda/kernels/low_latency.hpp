// The low-latency mode's kernels (low_latency_kernels.cu; docs/protocol.md, "Low-latency
// mode"): parameter structs and launchers. One launch per call, or two when the call returned a
// hook (its send part, then its wait part); no host synchronisation, so every launch can be
// captured in a CUDA graph. Addresses come from plan/low_latency_layout.hpp, the flags' words
// and the state word from plan/low_latency_layout.hpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels/kernels.hpp"
#include "plan/host_device.hpp"
#include "plan/low_latency_layout.hpp"

namespace epx::cuda {

// This rank's words of the protocol, in device memory of its own (not the workspace): a graph
// replay finds them where the last launch left them.
struct LowLatencyScratch {
  uint64_t round = 0;        // combines finished: round n's flags carry epoch n + 1
  uint32_t state = 0;        // plan::LowLatencyState
  uint32_t blocks_sent = 0;     // blocks past the send part (its handoff)
  uint32_t blocks_claimed = 0;  // a dispatch's sending blocks past their claims
  uint32_t blocks_done = 0;     // blocks past the wait part of a combine or combine_backward
  // The epoch of the last round whose send part found a topk_idx value outside [-1, E): read by
  // the settling block and by the last sending block, each once the claims are done, so never
  // reset (neither could tell when the other had read it).
  uint64_t bad_routing = 0;
};

// What every LL kernel knows.
struct LowLatencyContext {
  Topology topo{};  // peers, rank, error record, timeout (the fingerprint is not used)
  plan::LowLatencyLayout layout{};
  plan::LowLatencyRegions regions{};  // of `layout`, for `half`
  LowLatencyScratch* scratch = nullptr;
  int32_t* old_counts = nullptr;  // [2][E_l]: the counts each half's last round left
  int half = 0;                   // the round's half of the receive regions
  uint32_t tags = 0;              // this rank's flag tags for the call (compared by the peers)
  int num_blocks = 0;
  uint64_t* clock = nullptr;  // the phase clock's stamps (kernels.hpp; null: none taken)
};

// The rows a dispatch, cached dispatch or combine_backward pushes into the owners' regions.
struct LowLatencyRows {
  uint32_t kind = plan::kKindDispatch;  // a plan::LowLatencyKind
  const char* x = nullptr;              // [S, H] rows of row_bytes (fp8 or bf16)
  int64_t row_bytes = 0;
  const float* scales = nullptr;   // [S, H/128], fp8 rows only
  const float* weights = nullptr;  // [S, K] or null
  const float* aux = nullptr;      // [S, K] or null
  const void* topk_idx = nullptr;  // routing dispatch: [S, K] int32 or int64
  bool topk_int64 = false;
  int64_t num_tokens = 0;
  int32_t* topk32 = nullptr;  // the handle's [S, K] (written by a routing dispatch)
  int32_t* slots = nullptr;   // the handle's [S, K] (written by a routing dispatch)
  // > 0: each sending block sends one unit, that many consecutive k of one token (a divisor of
  // K); set by a dispatch's launch where the units fit in its sending blocks (small batches;
  // low_latency_send.cuh, send_unit). 0: each sends whole tokens.
  int32_t unit_topk = 0;
  // Each sending block has one token, whose row (16-byte aligned, at most kBulkRowBytes) goes
  // through shared memory (the launch's dynamic shared memory) to its destinations by the
  // bulk-copy unit, a store per destination (low_latency_send.cuh, send_bulk). Set by the
  // launch.
  bool bulk_rows = false;

  // The low bits of the rows' address and length together: 0 in the low 4 when every row starts
  // 16-byte aligned (the rows' 16-byte vectors, prefetches and bulk stores), in the lowest when
  // every row starts 2-byte aligned.
  EPX_HD uintptr_t alignment_bits() const {
    return reinterpret_cast<uintptr_t>(x) | static_cast<uintptr_t>(row_bytes);
  }
};
// With the dispatch kernel's ~25 KB of static shared memory, within the 48 KB a launch gets
// without opting in to more.
constexpr int64_t kBulkRowBytes = 16384;

struct LowLatencyDispatchParams {
  LowLatencyContext ll{};
  LowLatencyRows rows{};
  int32_t* counts = nullptr;  // the handle's [E_l]: written (routing) or read (cached)
  bool send = true;           // the parts this launch runs
  bool wait = true;
};
// The send part on up to ll.num_blocks blocks (at least 2: as many as there are tokens, or units
// of a small batch's (t, k), to send, plus one): block 0 counts the others' claims and settles
// the round's counts while they store the rows (the wait part, in a launch with both); the wait
// part alone on one block.
void launch_low_latency_dispatch(const LowLatencyDispatchParams& params, cudaStream_t stream);

struct LowLatencyCombineParams {
  LowLatencyContext ll{};
  bool send = true;  // the parts this launch runs
  bool wait = true;
  // The expert side's inputs to copy into the combine region (rows [0, counts[e]) of each
  // expert); null: already there (x written into it, no scalars) or read elsewhere (weights:
  // the dispatch's own view, weights_in_recv).
  const uint16_t* x = nullptr;
  const float* weights = nullptr;
  const float* scalars = nullptr;
  const int32_t* counts = nullptr;  // the handle's [E_l]
  bool weighted = false;
  bool weights_in_recv = false;
  // The source side.
  const int32_t* topk32 = nullptr;
  const int32_t* slots = nullptr;
  int64_t num_tokens = 0;
  uint16_t* y = nullptr;
  float* scalars_out = nullptr;  // or null
};
void launch_low_latency_combine(const LowLatencyCombineParams& params, cudaStream_t stream);

struct LowLatencyBackwardParams {
  LowLatencyContext ll{};
  LowLatencyRows rows{};  // grad_y [S, H] bf16 to the handle's slots
  const int32_t* counts = nullptr;
  const uint16_t* x = nullptr;  // the forward's expert-side rows [E_l, R*S_ll, H]
  const float* weights = nullptr;
  uint16_t* grad_x = nullptr;  // [E_l, R*S_ll, H], 0 past the counts
  float* grad_weights = nullptr;
};
void launch_low_latency_backward(const LowLatencyBackwardParams& params, cudaStream_t stream);

// This rank's line of every peer's failed flags (a rejected input, an error on the host).
void launch_low_latency_fail(const LowLatencyContext& context, cudaStream_t stream);

// Shared memory the kernels need beyond their fixed arrays; the transport supports configurations
// whose figure fits 48 KB (thousands of local experts).
size_t low_latency_smem_bytes(const plan::LowLatencyLayout& layout);
// The send part claims a token's K slots with a thread each, in blocks of 512 threads: the
// transport supports num_topk up to that.
constexpr int kLowLatencyMaxTopk = 512;

}  // namespace epx::cuda
