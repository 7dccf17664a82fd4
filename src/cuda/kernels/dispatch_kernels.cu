// Dispatch on the device: the send into every destination's staging (also used by cached
// dispatch and combine_backward; it holds the operation's entry barrier and hands off its exit
// barrier), the receive-side counts, and the receive epilogue (which waits for the exit).
// This unit holds the phase clock's stamps (cuda/device/device_records.cuh; defined before any
// include of it).
#define EPX_PHASE_CLOCK_STORAGE
#include <cstdint>
#include <cub/block/block_scan.cuh>
#include <vector>

#include "cuda/device/chained_launch.hpp"
#include "cuda/device/device_primitives.cuh"
#include "cuda/device/device_records.cuh"
#include "cuda/device/operation_sync.cuh"
#include "cuda/device/padding.cuh"
#include "cuda/kernels/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {
namespace {

constexpr int kThreads = kBlockThreads;
// Sources whose header and counts the receive-counts step loads at once (more go in batches).
constexpr int kMaxHeaderRanks = 8;

// One warp per (token, row part): the part goes to every destination in order (this rank's own
// staging only with stage_own_rows); the warp of part 0 also writes the scales. Then a thread
// per (token, k) writes the per-k metadata. Block 0 writes the headers and expert counts of a
// routing dispatch.
__global__ void __launch_bounds__(kThreads) send_kernel(SendParams p) {
  chain_start();
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  const int local_experts = layout.local_experts();
  const int rank = p.topo.rank;
  // The plan (an earlier kernel) is complete: its status is loaded while the entry waits.
  const bool routing_ok = !p.plan_status || p.plan_status[0] == plan::kRoutingOk;
  mark_phase(kMarkSendStart);
  if (!operation_entry(p.topo, p.entry_phase, p.entry_published)) {
    operation_handoff(p.topo, true);
    return;
  }
  mark_phase(kMarkEntered);
  if (p.write_headers && blockIdx.x == 0) {
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
      *layout.header(p.topo.peers[r], rank) =
          plan::SourceHeader{.num_tokens = routing_ok ? p.rank_counts[r] : 0,
                             .status = static_cast<int32_t>(p.plan_status[0]),
                             .channels = p.channels,
                             .bad_value = p.plan_status[1]};
    }
    for (int i = threadIdx.x; i < num_ranks * local_experts; i += blockDim.x) {
      const int r = i / local_experts;
      layout.expert_counts(p.topo.peers[r], rank)[i % local_experts] =
          routing_ok ? p.expert_counts[i] : 0;
    }
  }
  const int lane = lane_id();
  const RowParts parts = row_parts(p.num_tokens, p.row_bytes);
  for (int64_t item = global_warp(); routing_ok && item < p.num_tokens * parts.count;
       item += total_warps()) {
    const int64_t t = item / parts.count, part = item % parts.count;
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t slot = p.send_slot[t * num_ranks + r];
      if (slot < 0) continue;
      char* dst = p.topo.peers[r];
      if (p.stage_own_rows || r != rank) {
        warp_copy_part(layout.row(dst, layout.dispatch_row_index(rank, slot)),
                       p.x + t * p.row_bytes, p.row_bytes, parts, part, lane);
      }
      if (part != 0 || !p.scales) continue;  // the row's first part carries its scales
      float* scales = layout.row_scales(dst, rank, slot);
      for (int64_t i = lane; i < p.scales_per_row; i += kWarpSize) {
        scales[i] = p.scales[t * p.scales_per_row + i];
      }
    }
  }
  // The metadata of every (token, destination), a thread per (token, k) rather than the
  // token's row warp: a token's loads (topk, expert slot, weights, aux, then its send slots)
  // are a chain of round trips, which a warp would run once per token in sequence
  // (docs/performance.md).
  const int64_t threads = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
       routing_ok && p.with_meta && i < p.num_tokens * num_topk; i += threads) {
    const int64_t t = i / num_topk;
    const int k = static_cast<int>(i % num_topk);
    const int32_t e = p.topk32[i];
    const int owner = e >= 0 ? plan::rank_of_expert(e, local_experts) : -1;
    const int32_t local = e >= 0 ? plan::local_index_of_expert(e, local_experts) : -1;
    const int32_t expert_slot = p.expert_slot[i];
    const float weight = p.weights ? p.weights[i] : 0.0f, aux = p.aux ? p.aux[i] : 0.0f;
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t slot = p.send_slot[t * num_ranks + r];
      if (slot < 0) continue;
      const plan::SlotMeta meta{layout.slot_meta(p.topo.peers[r], rank, slot), num_topk};
      if (k == 0) *meta.token() = static_cast<int32_t>(t);
      const bool here = owner == r;
      meta.local_expert()[k] = here ? local : -1;
      meta.expert_slot()[k] = here ? expert_slot : -1;
      meta.weight()[k] = here ? weight : 0.0f;
      meta.aux()[k] = here ? aux : 0.0f;
    }
  }
  mark_phase(kMarkSent);
  // The handoff orders the block's stores into the peers before its count (a block barrier,
  // then one system fence); the last block then publishes the exit barrier with a release.
  operation_handoff(p.topo, true);
  mark_phase(kMarkHandedOff);
}

// Receive-side counts: headers -> checks -> offsets, computed by one block into its shared
// memory (`smem`, receive_counts_smem_bytes) and, with `to_handle`, also into the handle and
// the host-mapped copy for sync_counts. The offsets are plan::compute_receive_offsets computed
// in parallel (a thread per local expert and a block-wide scan over the padded segment sizes);
// the GPU tests compare them with the reference, like the host transport's sequential ones.
// False when a source's header is invalid (the error is recorded; every rank sees the same
// headers, so every rank fails alike).
struct BlockCounts {
  const int32_t* recv_offsets;           // [R+1]
  const int32_t* expert_source_offsets;  // [E_l, R]
  const int32_t* tokens_per_expert;      // [E_l]
  const int32_t* expert_offsets;         // [E_l+1]
  int64_t num_recv;
};

__device__ bool block_receive_counts(const ReceiveCountsParams& p, int32_t* smem, bool to_handle,
                                     BlockCounts& out) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running;
  __shared__ int ok;
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, local_experts = layout.local_experts();
  int32_t* recv_offsets = smem;
  int32_t* expert_source_offsets = recv_offsets + num_ranks + 1;
  int32_t* tokens_per_expert = expert_source_offsets + local_experts * num_ranks;
  int32_t* expert_offsets = tokens_per_expert + local_experts;
  char* local = p.topo.peers[p.topo.rank];
  // The first kMaxHeaderRanks headers are loaded by as many threads at once (one memory round
  // trip, not R in a row), then thread 0 checks them and sums the counts in source order.
  __shared__ plan::SourceHeader headers[kMaxHeaderRanks];
  if (threadIdx.x < min(num_ranks, kMaxHeaderRanks)) {
    headers[threadIdx.x] = *layout.header(local, threadIdx.x);
  }
  __syncthreads();
  auto header_of = [&](int s) {
    return s < kMaxHeaderRanks ? headers[s] : *layout.header(local, s);
  };
  if (threadIdx.x == 0) {
    ok = 1;
    for (int s = 0; ok && s < num_ranks; ++s) {
      const plan::SourceHeader header = header_of(s);
      int32_t code = kDeviceOk;
      if (header.status != plan::kRoutingOk) {
        code = kDeviceBadRouting;
      } else if (header.channels != p.channels) {
        code = kDeviceChannelMismatch;
      }
      if (code != kDeviceOk) {
        record_error(p.topo, code, kPhaseDispatchExit, s,
                     code == kDeviceBadRouting ? 0 : header.channels,
                     static_cast<uint64_t>(header.bad_value));
        ok = 0;
      }
    }
    int offset = 0;
    for (int s = 0; s < num_ranks; ++s) {
      const int count = ok ? header_of(s).num_tokens : 0;
      recv_offsets[s] = offset;
      if (to_handle) {
        p.recv_counts[s] = count;
        p.recv_offsets[s] = offset;
      }
      offset += count;
    }
    recv_offsets[num_ranks] = offset;
    if (to_handle) p.recv_offsets[num_ranks] = offset;
    running = 0;
  }
  __syncthreads();
  for (int base = 0; base < local_experts; base += kThreads) {
    const int e = base + threadIdx.x;
    int rows = 0;
    if (e < local_experts) {
      // The sources' counts are loaded before any store (the handle's array could alias the
      // workspace as far as the compiler knows, which would put R round trips in a row).
      int counts[kMaxHeaderRanks];
      for (int s0 = 0; s0 < num_ranks; s0 += kMaxHeaderRanks) {
        const int batch = min(kMaxHeaderRanks, num_ranks - s0);
#pragma unroll
        for (int j = 0; j < kMaxHeaderRanks; ++j) {
          if (j < batch) counts[j] = ok ? layout.expert_counts(local, s0 + j)[e] : 0;
        }
#pragma unroll
        for (int j = 0; j < kMaxHeaderRanks; ++j) {
          if (j >= batch) break;
          const int s = s0 + j;
          if (to_handle) p.source_expert_counts[s * local_experts + e] = counts[j];
          expert_source_offsets[e * num_ranks + s] = rows;  // relative for now
          rows += counts[j];
        }
      }
      tokens_per_expert[e] = rows;
      if (to_handle) p.tokens_per_expert[e] = rows;
    }
    const int padded = e < local_experts ? static_cast<int>(plan::align_up(rows, p.alignment)) : 0;
    int start = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(padded, start, total);
    if (e < local_experts) {
      start += running;
      expert_offsets[e] = start;
      if (to_handle) p.expert_offsets[e] = start;
      for (int s = 0; s < num_ranks; ++s) {
        const int i = e * num_ranks + s;
        expert_source_offsets[i] += start;
        if (to_handle) p.expert_source_offsets[i] = expert_source_offsets[i];
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  const int64_t num_recv = recv_offsets[num_ranks];
  const int64_t num_rows = p.expand ? running : num_recv;
  if (threadIdx.x == 0) {
    expert_offsets[local_experts] = running;
    if (to_handle) {
      p.expert_offsets[local_experts] = running;
      p.device_counts[0] = num_recv;
      p.device_counts[1] = num_rows;
    }
  }
  if (to_handle && p.host_counts) {
    volatile int64_t* host = p.host_counts;
    for (int e = threadIdx.x; e <= local_experts; e += kThreads) {
      if (e < local_experts) host[2 + e] = tokens_per_expert[e];
      host[2 + local_experts + e] = e < local_experts ? expert_offsets[e] : running;
    }
    if (threadIdx.x == 0) {
      host[0] = num_recv;
      host[1] = num_rows;
    }
    __threadfence_system();
  }
  __syncthreads();
  out = BlockCounts{.recv_offsets = recv_offsets,
                    .expert_source_offsets = expert_source_offsets,
                    .tokens_per_expert = tokens_per_expert,
                    .expert_offsets = expert_offsets,
                    .num_recv = num_recv};
  return ok != 0;
}

// sync_counts: the exit barrier, then the counts into the handle and the host-mapped copy.
__global__ void __launch_bounds__(kThreads) receive_counts_kernel(ReceiveCountsParams p) {
  chain_start();
  extern __shared__ int32_t counts_smem[];
  if (!operation_exit_wait(p.topo, kPhaseDispatchExit)) return;
  BlockCounts counts;
  block_receive_counts(p, counts_smem, true, counts);
}

// One warp per (received token n, row part): locate its (source, slot) and copy the part of
// the staged row into its compact row or all of its expanded rows (read once, stored to each);
// the warp of part 0 also fills the handle's per-token entries (routing dispatch) and the
// scalar outputs. Then the expanded padding rows.
__global__ void __launch_bounds__(kThreads) receive_kernel(ReceiveParams p) {
  chain_start();
  extern __shared__ int32_t counts_smem[];
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  mark_phase(kMarkReceiveStart);
  // Counts a cached (or synced) receive takes from the handle, written by earlier kernels:
  // loaded while the exit waits (docs/performance.md).
  const int64_t handle_recv = p.compute_counts ? 0 : p.device_counts[0];
  if (p.wait_exit ? !operation_exit_wait(p.topo, p.exit_phase) : !no_failure(p.topo)) {
    if (p.compute_counts && blockIdx.x == 0 && threadIdx.x == 0) {
      p.counts.device_counts[0] = 0;
      p.counts.device_counts[1] = 0;
    }
    return;
  }
  mark_phase(kMarkExited);
  BlockCounts counts{.recv_offsets = p.recv_offsets,
                     .expert_source_offsets = p.expert_source_offsets,
                     .tokens_per_expert = p.tokens_per_expert,
                     .expert_offsets = p.expert_offsets,
                     .num_recv = 0};
  if (p.compute_counts) {
    if (!block_receive_counts(p.counts, counts_smem, blockIdx.x == 0, counts)) return;
    // Handle rows past the real N hold -1 (docs/decisions.md).
    for (int64_t n = counts.num_recv + blockIdx.x * blockDim.x + threadIdx.x; n < p.capacity;
         n += int64_t(gridDim.x) * blockDim.x) {
      p.src_token[n] = -1;
      for (int k = 0; k < num_topk; ++k) {
        p.recv_topk[n * num_topk + k] = -1;
        p.expanded_rows[n * num_topk + k] = -1;
      }
    }
  } else {
    counts.num_recv = handle_recv;
  }
  mark_phase(kMarkCounted);
  char* local = p.topo.peers[p.topo.rank];
  const int lane = lane_id();
  const int64_t num_recv = counts.num_recv;
  const RowParts parts = row_parts(num_recv, p.row_bytes);
  for (int64_t item = global_warp(); item < num_recv * parts.count; item += total_warps()) {
    const int64_t n = item / parts.count, part = item % parts.count;
    const bool first_part = part == 0;  // its warp also does the row's per-token entries
    const int s = plan::source_of_received(counts.recv_offsets, num_ranks, n);
    const int64_t slot = n - counts.recv_offsets[s];
    const plan::SlotMeta meta{layout.slot_meta(local, s, slot), num_topk};
    // A row this rank sent to itself is read from its input when it was not staged.
    const char* row = p.own_x && s == p.topo.rank
                          ? p.own_x + int64_t(*meta.token()) * p.row_bytes
                          : layout.row(local, layout.dispatch_row_index(s, slot));
    const float* scales = p.scales_out ? layout.row_scales(local, s, slot) : nullptr;
    // Expanded row of (n, k), or -1; from the metadata in a routing dispatch (the handle's
    // entry is written by the warp of part 0, possibly after this warp reads it).
    auto expanded_row = [&](int k) -> int64_t {
      if (!p.routing) return p.expanded_rows[n * num_topk + k];
      const int32_t e = meta.local_expert()[k];
      return e >= 0 ? counts.expert_source_offsets[e * num_ranks + s] + meta.expert_slot()[k] : -1;
    };
    if (p.routing && first_part) {
      if (lane == 0) p.src_token[n] = static_cast<int32_t>(s * layout.max_tokens + *meta.token());
      for (int k = lane; k < num_topk; k += kWarpSize) {
        p.recv_topk[n * num_topk + k] = meta.local_expert()[k];
        p.expanded_rows[n * num_topk + k] = static_cast<int32_t>(expanded_row(k));
      }
    }
    if (!p.expand) {
      warp_copy_part(p.x_out + n * p.row_bytes, row, p.row_bytes, parts, part, lane);
      if (!first_part) continue;
      for (int64_t i = lane; scales && i < p.scales_per_row; i += kWarpSize) {
        p.scales_out[n * p.scales_per_row + i] = scales[i];
      }
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const bool here = meta.local_expert()[k] >= 0;
        if (p.weights_out) p.weights_out[n * num_topk + k] = here ? meta.weight()[k] : 0.0f;
        if (p.aux_out) p.aux_out[n * num_topk + k] = here ? meta.aux()[k] : 0.0f;
        p.topk_out[n * num_topk + k] = meta.local_expert()[k];
      }
      continue;
    }
    if (p.row_bytes % 16 == 0) {
      // The part of the staged row is read once (four 16-byte vectors in flight per lane) and
      // stored into each of its expanded rows.
      const int4* src = reinterpret_cast<const int4*>(row);
      const int64_t end = min(p.row_bytes, (part + 1) * parts.bytes) / 16;
      for (int64_t i0 = part * parts.bytes / 16 + lane; i0 < end; i0 += 4 * kWarpSize) {
        int4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (i0 + j * kWarpSize < end) v[j] = src[i0 + j * kWarpSize];
        }
        for (int k = 0; k < num_topk; ++k) {
          const int64_t out_row = expanded_row(k);
          if (out_row < 0) continue;
          int4* dst = reinterpret_cast<int4*>(p.x_out + out_row * p.row_bytes);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (i0 + j * kWarpSize < end) dst[i0 + j * kWarpSize] = v[j];
          }
        }
      }
    } else {
      for (int k = 0; k < num_topk; ++k) {
        const int64_t out_row = expanded_row(k);
        if (out_row >= 0) {
          warp_copy_part(p.x_out + out_row * p.row_bytes, row, p.row_bytes, parts, part, lane);
        }
      }
    }
    if (!first_part) continue;
    for (int k = 0; k < num_topk; ++k) {
      const int64_t out_row = expanded_row(k);
      if (out_row < 0) continue;
      for (int64_t i = lane; scales && i < p.scales_per_row; i += kWarpSize) {
        p.scales_out[out_row * p.scales_per_row + i] = scales[i];
      }
      if (lane == 0) {
        if (p.weights_out) p.weights_out[out_row] = meta.weight()[k];
        if (p.aux_out) p.aux_out[out_row] = meta.aux()[k];
      }
    }
  }
  if (p.expand) {
    write_padding({.tokens_per_expert = counts.tokens_per_expert,
                   .expert_offsets = counts.expert_offsets,
                   .local_experts = layout.local_experts(),
                   .x = p.x_out,
                   .row_bytes = p.row_bytes,
                   .scales = p.scales_out,
                   .scales_per_row = p.scales_per_row,
                   .weights = p.weights_out,
                   .aux = p.aux_out,
                   .zero_x = p.zero_padding});
  }
  mark_phase(kMarkReceived);
}

}  // namespace

size_t receive_counts_smem_bytes(const plan::WorkspaceLayout& layout) {
  const int64_t ranks = layout.num_ranks, local_experts = layout.local_experts();
  return static_cast<size_t>(ranks + 1 + local_experts * ranks + 2 * local_experts + 1) *
         sizeof(int32_t);
}

const char* phase_mark_name(int mark) {
  static const char* const names[kMarkCount] = {
      "send start",      "entered",          "sent",
      "handed off",      "receive start",    "exited",
      "counted",         "received",         "ll start",
      "ll entered",      "ll claimed",       "ll sent",
      "ll handed off",   "ll publishing",    "ll counted",
      "ll settled",
      "ll comb. start",  "ll comb. entered", "ll comb. waited",
      "ll comb. summed", "ll comb. finished"};
  return mark >= 0 && mark < kMarkCount ? names[mark] : "unknown";
}

#ifdef EPX_PHASE_CLOCK
bool reset_phase_clock() {
  const std::vector<uint64_t> zeros(kClockBlocks * kMarkCount, 0);
  return cudaMemcpyToSymbol(phase_clock_stamps, zeros.data(), zeros.size() * sizeof(uint64_t)) ==
         cudaSuccess;
}

bool read_phase_clock(std::vector<uint64_t>& stamps) {
  stamps.assign(kClockBlocks * kMarkCount, 0);
  return cudaMemcpyFromSymbol(stamps.data(), phase_clock_stamps,
                              stamps.size() * sizeof(uint64_t)) == cudaSuccess;
}

uint64_t* phase_clock_stamps_on_device() {
  void* stamps = nullptr;
  return cudaGetSymbolAddress(&stamps, phase_clock_stamps) == cudaSuccess
             ? static_cast<uint64_t*>(stamps)
             : nullptr;
}
#else
bool reset_phase_clock() {
  return false;
}
bool read_phase_clock(std::vector<uint64_t>&) {
  return false;
}
uint64_t* phase_clock_stamps_on_device() {
  return nullptr;
}
#endif

void load_dispatch_kernels() {
  load_functions({reinterpret_cast<const void*>(send_kernel),
                  reinterpret_cast<const void*>(receive_counts_kernel),
                  reinterpret_cast<const void*>(receive_kernel)});
}

void launch_send(const SendParams& params, cudaStream_t stream) {
  launch_chained(send_kernel, params.num_blocks, kThreads, 0, stream, params.topo.chained, params);
}

void launch_receive_counts(const ReceiveCountsParams& params, cudaStream_t stream) {
  launch_chained(receive_counts_kernel, 1, kThreads, receive_counts_smem_bytes(params.topo.layout),
                 stream, params.topo.chained, params);
}

void launch_receive(const ReceiveParams& params, cudaStream_t stream) {
  const size_t smem = params.compute_counts ? receive_counts_smem_bytes(params.topo.layout) : 0;
  launch_chained(receive_kernel, params.num_blocks, kThreads, smem, stream, params.topo.chained,
                 params);
}

}  // namespace epx::cuda
