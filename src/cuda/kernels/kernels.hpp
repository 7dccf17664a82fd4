// The CUDA transport's kernels: typed parameter structs and launchers (bodies in *.cu).
// Every kernel follows docs/protocol.md; positions come from plan/routing.hpp, numerics from
// plan/numerics.hpp, addresses from plan/workspace_layout.hpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "plan/low_latency_layout.hpp"
#include "plan/op_record.hpp"
#include "plan/workspace_layout.hpp"

// Opt-in timestamps of a dispatch's phases on the device, to see where a small batch's time
// goes (docs/performance.md). Configure with -DEPX_PHASE_CLOCK=ON: thread 0 of every block
// of the dispatch kernels and of the low-latency kernels stamps the global timer at each mark
// (cuda/device/device_records.cuh), and bench_gpu prints the marks of one dispatch and of one
// low-latency round. Off (the default) the marks compile to nothing and read_phase_clock returns
// false.
namespace epx::cuda {

enum PhaseMark : int {
  kMarkSendStart,     // send kernel past its wait for the kernel before it
  kMarkEntered,       // entry barrier passed
  kMarkSent,          // the block's stores into the peers done
  kMarkHandedOff,     // past the handoff (the last block: exit published)
  kMarkReceiveStart,  // receive kernel past its wait for the kernel before it
  kMarkExited,        // exit barrier passed
  kMarkCounted,       // receive counts computed
  kMarkReceived,      // the block's receive done
  // The low-latency kernels (low_latency_kernels.cu): a dispatch ...
  kMarkLlStart,       // the kernel's start
  kMarkLlEntered,     // past the state word
  kMarkLlClaimed,     // the first batch's claims done (the block's barrier after them)
  kMarkLlSent,        // the block's rows stored
  kMarkLlHandedOff,   // past the handoff (the blocks that are not last leave; R > 1)
  kMarkLlPublishing,  // the last block: past its barrier before raising the sent flags
  kMarkLlCounted,     // block 0: every sending block's claims counted
  kMarkLlSettled,     // block 0's thread 0: its experts' counts stored, rows cleared
  // ... and a combine.
  kMarkLlCombineStart,
  kMarkLlCombineEntered,
  kMarkLlCombineWaited,    // every owner's ready flag seen
  kMarkLlCombineSummed,    // the block's sums stored
  kMarkLlCombineFinished,  // past the count of finished blocks
  kMarkCount
};
constexpr int kClockBlocks = 256;  // blocks that stamp (the rest do not)

const char* phase_mark_name(int mark);
// Zeroes the stamps (false: not compiled in).
bool reset_phase_clock();
// Where the stamps live on the device, for the kernels of other translation units (their
// parameters carry it; null: not compiled in).
uint64_t* phase_clock_stamps_on_device();
// The stamps [kClockBlocks][kMarkCount] in ns of the global timer, 0 where none was made since
// the reset (false: not compiled in).
bool read_phase_clock(std::vector<uint64_t>& stamps);

}  // namespace epx::cuda

namespace epx::cuda {

// Whether a caller's tensor starts on a 16-byte boundary: the kernels move rows in 16-byte
// vectors (a caller's tensor may be a view at any element offset). It decides both whether a
// rank's own rows are read in place rather than staged (cuda_engine.cpp) and whether the
// reductions take the 8-element path (combine_kernels.cu).
inline bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Error record in host-mapped memory, written by a kernel that hits a problem; the host raises
// it at the next synchronisation. `failed` (device memory) makes later kernels skip their work.
enum DeviceErrorCode : int32_t {
  kDeviceOk = 0,
  kDeviceTimeout = 1,
  kDeviceBadRouting = 2,
  kDeviceChannelMismatch = 3,
  kDevicePeerAborted = 4,
  kDeviceOpMismatch = 5,  // a peer entered another operation: value = the differing field
  kDevicePeerFailed = 6,  // a peer's buffer failed earlier (its poison mark)
  // The low-latency mode (cuda/kernels/low_latency.hpp).
  kDeviceLowLatencyOrder = 7,     // a call out of turn was dropped: value = the state word seen
  kDeviceLowLatencyOverflow = 8,  // value = the local expert, seen = the rows it received
  kDeviceLowLatencyMismatch = 9,  // a peer's call differs: expected/seen = my tags, theirs
};

struct DeviceStatus {
  int32_t code;
  int32_t phase;  // a Phase
  int32_t peer;
  int32_t value;      // bad topk value, channels seen, or the differing fingerprint field
  uint64_t expected;  // an epoch; or this rank's value of the differing field
  uint64_t seen;      // an epoch; or the peer's value
};

enum Phase : int32_t {
  kPhaseDispatchEntry,
  kPhaseDispatchExit,
  kPhaseCachedEntry,
  kPhaseCachedExit,
  kPhaseCombineEntry,
  kPhaseCombineExit,
  kPhaseBackwardEntry,
  kPhaseBackwardExit,
  kPhaseLowLatency,  // kPhaseLowLatency + a plan::LowLatencyPhase: the low-latency calls'
};
const char* phase_name(int32_t phase);

// Device words of the barriers folded into kernels (cuda/device/operation_sync.cuh).
struct OperationSync {
  uint32_t blocks_done;      // blocks of the current writing kernel that reached its handoff
  uint32_t entry_published;  // block 0 published the entry barrier of the current operation
};

// What every kernel knows about the workspace and the ranks.
struct Topology {
  plan::WorkspaceLayout layout{};
  char* const* peers = nullptr;  // [R] device array: workspace base of every rank (LSA pointers)
  int32_t rank = 0;
  int32_t* failed = nullptr;       // device flag: a previous step failed, skip work
  DeviceStatus* status = nullptr;  // host-mapped
  uint64_t* epoch = nullptr;       // device: barriers passed (graph replays stay in step)
  OperationSync* sync = nullptr;   // device
  uint64_t timeout_ns = 0;         // bound of every wait for a peer
  bool chained = false;            // kernels are launched chained (cuda/device/chained_launch.hpp)
  plan::OpFingerprint op{};        // of the operation the kernel belongs to (its entry carries it)
};

// This rank rejected its input to an operation: its entry barrier with the abort mark, so the
// peers raise kDevicePeerAborted instead of timing out; nothing else of the operation runs.
void launch_abort(const Topology& topo, cudaStream_t stream);
// This rank's buffer failed: its poison mark into every peer's record of it, so that their
// waits for this rank raise kDevicePeerFailed instead of timing out.
void launch_poison(const Topology& topo, cudaStream_t stream);

// Source plan on the device: exactly plan::plan_source (src/plan/source_plan.cpp), tile by
// tile (cuda/kernels/plan_kernels.cu).
struct PlanParams {
  const void* topk_idx = nullptr;  // [S, K] int32 or int64
  bool topk_int64 = false;
  int64_t num_tokens = 0;
  int32_t num_topk = 0;
  int32_t num_experts = 0;
  int32_t num_ranks = 0;
  int32_t* send_slot = nullptr;             // [S, R]
  int32_t* expert_slot = nullptr;           // [S, K]
  int32_t* topk32 = nullptr;                // [S, K] int32 copy of the routing
  int32_t* rank_counts = nullptr;           // [R]
  int32_t* expert_counts = nullptr;         // [E]
  int64_t* plan_status = nullptr;           // [2]: RoutingStatus, bad value
  int32_t* tile_counts = nullptr;           // scratch [plan_tiles][E + R]
  unsigned long long* first_bad = nullptr;  // scratch: first invalid entry; ~0 between plans
  // With publish_entry: block 0 of the first plan kernel publishes the operation's entry
  // (publish_entry_early); the send kernel is then launched with entry_published.
  bool publish_entry = false;
  Topology topo{};
};
void launch_plan(const PlanParams& params, cudaStream_t stream);
// Tokens per plan tile (a tile holds up to 2048 routing entries, at most 256 tokens), and the
// tiles a plan of `num_tokens` uses (at least one). The plan needs num_topk <= 2048.
__host__ __device__ inline int plan_tile_tokens(int32_t num_topk) {
  return num_topk >= 2048 ? 1 : (2048 / num_topk < 256 ? 2048 / num_topk : 256);
}
int plan_tiles(int64_t num_tokens, int32_t num_topk);

// Source side of dispatch, cached dispatch and combine_backward: rows (+ scales, + metadata)
// into every destination's staging, and (routing dispatch) the headers and expert counts.
struct SendParams {
  Topology topo{};
  const char* x = nullptr;
  int64_t row_bytes = 0;
  const float* scales = nullptr;  // fp8 only
  int64_t scales_per_row = 0;
  const float* weights = nullptr;  // [S, K] or null
  const float* aux = nullptr;      // [S, K] or null
  int64_t num_tokens = 0;
  const int32_t* send_slot = nullptr;
  const int32_t* expert_slot = nullptr;
  const int32_t* topk32 = nullptr;
  bool with_meta = false;
  bool write_headers = false;
  int32_t channels = 0;
  const int64_t* plan_status = nullptr;
  const int32_t* rank_counts = nullptr;
  const int32_t* expert_counts = nullptr;
  int32_t entry_phase = 0;  // the operation's entry barrier is part of this kernel
  int num_blocks = 0;
  bool entry_published = false;  // the plan published the entry (PlanParams::publish_entry)
  // False: the rows this rank sends to itself are not copied into its own staging (their
  // scales and metadata are); the receive reads them from `x` (ReceiveParams::own_x).
  bool stage_own_rows = true;
};
void launch_send(const SendParams& params, cudaStream_t stream);

// Receive-side counts of a routing dispatch: reads headers, checks them, computes offsets.
// launch_receive_counts waits for the exit barrier and writes them for the host (sync_counts);
// without sync_counts the receive kernel computes them itself (ReceiveParams::counts).
struct ReceiveCountsParams {
  Topology topo{};
  int32_t channels = 0;
  int32_t alignment = 0;
  bool expand = false;
  int32_t* recv_counts = nullptr;            // [R]
  int32_t* recv_offsets = nullptr;           // [R+1]
  int32_t* source_expert_counts = nullptr;   // [R, E_l]
  int32_t* tokens_per_expert = nullptr;      // [E_l]
  int32_t* expert_offsets = nullptr;         // [E_l+1]
  int32_t* expert_source_offsets = nullptr;  // [E_l, R]
  int64_t* device_counts = nullptr;          // [2]: N, M
  int64_t* host_counts = nullptr;  // host-mapped copy of [N, M, tokens_per_expert..., offsets...]
};
void launch_receive_counts(const ReceiveCountsParams& params, cudaStream_t stream);
// Shared memory a block needs to hold the counts (ReceiveParams::compute_counts).
size_t receive_counts_smem_bytes(const plan::WorkspaceLayout& layout);

// Receive epilogue of dispatch (routing or cached): staged rows into compact/expanded outputs,
// then (expanded) the padding rows.
struct ReceiveParams {
  Topology topo{};
  int32_t exit_phase = 0;
  bool wait_exit = false;  // the exit barrier is part of this kernel (not of receive_counts)
  bool compute_counts =
      false;  // every block computes the counts itself from `counts` (block 0 also
              // writes them to the handle): sync_counts=false routing dispatch
  ReceiveCountsParams counts{};
  int64_t capacity = 0;  // compute_counts: handle rows [N, capacity) get -1
  bool routing = false;  // fill src_token / recv_topk / expanded_rows from the metadata
  bool expand = false;
  const int64_t* device_counts = nullptr;
  const int32_t* recv_offsets = nullptr;
  const int32_t* expert_source_offsets = nullptr;
  int32_t* src_token = nullptr;
  int32_t* recv_topk = nullptr;
  int32_t* expanded_rows = nullptr;
  char* x_out = nullptr;
  int64_t row_bytes = 0;
  float* scales_out = nullptr;
  int64_t scales_per_row = 0;
  float* weights_out = nullptr;
  float* aux_out = nullptr;
  int32_t* topk_out = nullptr;                 // compact only
  const int32_t* tokens_per_expert = nullptr;  // expanded: the padding rows (unless compute_counts)
  const int32_t* expert_offsets = nullptr;
  bool zero_padding = false;
  int num_blocks = 0;
  // The dispatch's input rows of this rank (row t at own_x + t * row_bytes) when the send kernel
  // left them unstaged (SendParams::stage_own_rows = false); null: every row is staged.
  const char* own_x = nullptr;
};
void launch_receive(const ReceiveParams& params, cudaStream_t stream);

// Expert side of combine: reduce (or forward) each received token's rows to its source.
struct CombineSendParams {
  Topology topo{};
  bool expand = false;
  bool at_source = false;
  const int64_t* device_counts = nullptr;
  const int32_t* src_token = nullptr;
  const int32_t* expanded_rows = nullptr;
  const int32_t* recv_topk = nullptr;
  const uint16_t* x = nullptr;
  const float* weights = nullptr;
  const float* scalars = nullptr;
  int num_blocks = 0;
  // Compact, or expanded reduced at the source: false leaves the rows of tokens from this rank
  // unstaged (their weights and scalars are staged); the reduce reads them from x
  // (CombineReduceParams::own_x), as dispatch does (SendParams::stage_own_rows).
  bool stage_own_rows = true;
};
// With the combine's entry barrier and the handoff of its exit barrier.
void launch_combine_send(const CombineSendParams& params, cudaStream_t stream);

// Source side of combine: waits for the exit barrier, sums the staged rows of each token, adds
// biases, rounds.
struct CombineReduceParams {
  Topology topo{};
  bool at_source = false;
  bool weighted = false;  // at_source: apply the staged row weights
  int64_t num_tokens = 0;
  const int32_t* send_slot = nullptr;
  const int32_t* topk32 = nullptr;
  const uint16_t* bias0 = nullptr;
  const uint16_t* bias1 = nullptr;
  uint16_t* y = nullptr;
  float* scalars_out = nullptr;  // or null
  int num_blocks = 0;
  // The combine input x of this rank when its own rows were left unstaged: token t was this
  // rank's received token n = recv_offsets[rank] + send_slot[t][rank], its row n in the compact
  // layout, its rows expanded_rows[n][k] (>= 0) at the source.
  const uint16_t* own_x = nullptr;
  const int32_t* recv_offsets = nullptr;
  const int32_t* expanded_rows = nullptr;
};
void launch_combine_reduce(const CombineReduceParams& params, cudaStream_t stream);

// Expert side of combine_backward: waits for the exit barrier, then grad_x rows and
// grad_weights from the staged grad_y, then zeroes the padding rows of both.
struct BackwardParams {
  Topology topo{};
  const int32_t* tokens_per_expert = nullptr;
  const int32_t* expert_offsets = nullptr;
  const int64_t* device_counts = nullptr;
  const int32_t* recv_offsets = nullptr;
  const int32_t* expanded_rows = nullptr;
  const uint16_t* x = nullptr;
  const float* weights = nullptr;
  uint16_t* grad_x = nullptr;
  float* grad_weights = nullptr;
  int num_blocks = 0;
  // This rank's grad_y when the send kernel left its rows to itself unstaged (as
  // ReceiveParams::own_x); src_token locates them.
  const uint16_t* own_grad_y = nullptr;
  const int32_t* src_token = nullptr;
};
void launch_backward(const BackwardParams& params, cudaStream_t stream);

// Loads every kernel of the transport into the current context. With CUDA's lazy module
// loading (the default) a kernel's first launch loads it, and loading waits for the whole
// device: ranks of a thread group sharing a GPU would wait for each other's spinning kernels
// (seen on the GPU machine: a rank's first dispatch or combine timed out at the entry barrier
// while its peer's host thread sat in that first launch). The engine calls this before its
// workspace rendezvous, when no peer kernel can be waiting for this rank yet.
void load_kernels();
void load_functions(std::initializer_list<const void*> kernels);  // cudaFuncGetAttributes each

// The entry of a table of kernel instantiations whose conditions `matches`: the launchers pick
// from the tables the load functions load, so no kernel is launched unloaded. Every
// combination a launcher asks for has an entry.
template <typename Variant, size_t N, typename Matches>
const Variant& pick_variant(const Variant (&variants)[N], Matches&& matches) {
  for (const Variant& variant : variants) {
    if (matches(variant)) return variant;
  }
  return variants[N - 1];  // unreachable: the tables cover every combination
}
void load_dispatch_kernels();
void load_combine_kernels();
void load_plan_kernels();
void load_low_latency_kernels();  // cuda/kernels/low_latency_kernels.cu

// Writes every rank's workspace base pointer (ncclGetLsaPointer) into peers[R].
void fetch_peer_pointers(void* window, int num_ranks, char** peers, cudaStream_t stream);

}  // namespace epx::cuda
