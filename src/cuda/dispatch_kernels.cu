// Dispatch on the device: the send into every destination's staging (also used by cached
// dispatch and combine_backward), the receive-side counts, and the receive epilogue.
#include <cub/block/block_scan.cuh>

#include "cuda/device_errors.cuh"
#include "cuda/device_primitives.cuh"
#include "cuda/kernels.hpp"
#include "plan/routing.hpp"

namespace epx::cuda {
namespace {

constexpr int kThreads = kBlockThreads;


// One warp per token: its row goes to every destination in order; lanes k < K write the
// per-k metadata. Block 0 writes the headers and expert counts of a routing dispatch.
__global__ void __launch_bounds__(kThreads) send_kernel(SendParams p) {
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  const int local_experts = layout.local_experts();
  const int rank = p.topo.rank;
  if (*p.topo.failed) return;
  const bool routing_ok = !p.plan_status || p.plan_status[0] == plan::kRoutingOk;
  if (p.write_headers && blockIdx.x == 0) {
    for (int r = threadIdx.x; r < num_ranks; r += blockDim.x) {
      *layout.header(p.topo.peers[r], rank) =
          plan::SourceHeader{routing_ok ? p.rank_counts[r] : 0, p.plan_status[0], p.channels,
                             p.plan_status[1]};
    }
    for (int i = threadIdx.x; i < num_ranks * local_experts; i += blockDim.x) {
      const int r = i / local_experts;
      layout.expert_counts(p.topo.peers[r], rank)[i % local_experts] =
          routing_ok ? p.expert_counts[i] : 0;
    }
  }
  const int lane = lane_id();
  for (int64_t t = global_warp(); routing_ok && t < p.num_tokens; t += total_warps()) {
    for (int r = 0; r < num_ranks; ++r) {
      const int32_t slot = p.send_slot[t * num_ranks + r];
      if (slot < 0) continue;
      char* dst = p.topo.peers[r];
      warp_copy(layout.row(dst, layout.dispatch_row_index(rank, slot)), p.x + t * p.row_bytes,
                p.row_bytes, lane);
      if (p.scales) {
        float* scales = layout.row_scales(dst, rank, slot);
        for (int64_t i = lane; i < p.scales_per_row; i += kWarpSize) {
          scales[i] = p.scales[t * p.scales_per_row + i];
        }
      }
      if (!p.with_meta) continue;
      plan::SlotMeta meta{layout.slot_meta(dst, rank, slot), num_topk};
      if (lane == 0) *meta.token() = static_cast<int32_t>(t);
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const int64_t i = t * num_topk + k;
        const int32_t e = p.topk32[i];
        const bool here = e >= 0 && plan::rank_of_expert(e, local_experts) == r;
        meta.local_expert()[k] = here ? plan::local_index_of_expert(e, local_experts) : -1;
        meta.expert_slot()[k] = here ? p.expert_slot[i] : -1;
        meta.weight()[k] = here && p.weights ? p.weights[i] : 0.0f;
        meta.aux()[k] = here && p.aux ? p.aux[i] : 0.0f;
      }
    }
  }
  // Every writer makes its own stores into the peers visible at system scope before the
  // kernel ends; the exit barrier (the next kernel on the stream) then publishes them with its
  // release. Stream order alone covers them in the memory model too; the per-writer fence is
  // the pattern known to hold for NVLink stores.
  __threadfence_system();
}

// One block: headers -> checks -> offsets -> device counts and a host-mapped copy for
// sync_counts. The offsets are plan::compute_receive_offsets computed in parallel (a thread
// per local expert and a block-wide scan over the padded segment sizes); the GPU tests compare
// them with the reference, like the host transport's sequential ones.
constexpr int kCountThreads = 256;

__global__ void __launch_bounds__(kCountThreads) receive_counts_kernel(ReceiveCountsParams p) {
  using Scan = cub::BlockScan<int, kCountThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running;
  __shared__ bool ok;
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, local_experts = layout.local_experts();
  char* local = p.topo.peers[p.topo.rank];
  if (threadIdx.x == 0) {
    ok = *p.topo.failed == 0;
    for (int s = 0; ok && s < num_ranks; ++s) {
      const plan::SourceHeader header = *layout.header(local, s);
      int32_t code = kDeviceOk;
      if (header.status != plan::kRoutingOk) {
        code = kDeviceBadRouting;
      } else if (header.channels != p.channels) {
        code = kDeviceChannelMismatch;
      }
      if (code != kDeviceOk) {
        record_error(p.topo, code, kPhaseDispatchExit, s,
                     code == kDeviceBadRouting ? header.bad_value : header.channels);
        ok = false;
      }
    }
    int offset = 0;
    for (int s = 0; s < num_ranks; ++s) {
      const int count = ok ? layout.header(local, s)->num_tokens : 0;
      p.recv_counts[s] = count;
      p.recv_offsets[s] = offset;
      offset += count;
    }
    p.recv_offsets[num_ranks] = offset;
    running = 0;
  }
  __syncthreads();
  for (int base = 0; base < local_experts; base += kCountThreads) {
    const int e = base + threadIdx.x;
    int rows = 0;
    if (e < local_experts) {
      for (int s = 0; s < num_ranks; ++s) {
        const int count = ok ? layout.expert_counts(local, s)[e] : 0;
        p.source_expert_counts[s * local_experts + e] = count;
        p.expert_source_offsets[e * num_ranks + s] = rows;  // relative for now
        rows += count;
      }
      p.tokens_per_expert[e] = rows;
    }
    const int padded = e < local_experts ? static_cast<int>(plan::align_up(rows, p.alignment)) : 0;
    int start = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(padded, start, total);
    if (e < local_experts) {
      start += running;
      p.expert_offsets[e] = start;
      for (int s = 0; s < num_ranks; ++s) p.expert_source_offsets[e * num_ranks + s] += start;
    }
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  const int64_t num_recv = p.recv_offsets[num_ranks];
  const int64_t num_rows = p.expand ? running : num_recv;
  if (threadIdx.x == 0) {
    p.expert_offsets[local_experts] = running;
    p.device_counts[0] = num_recv;
    p.device_counts[1] = num_rows;
  }
  if (p.host_counts) {
    volatile int64_t* host = p.host_counts;
    for (int e = threadIdx.x; e <= local_experts; e += kCountThreads) {
      if (e < local_experts) host[2 + e] = p.tokens_per_expert[e];
      host[2 + local_experts + e] = e < local_experts ? p.expert_offsets[e] : running;
    }
    if (threadIdx.x == 0) {
      host[0] = num_recv;
      host[1] = num_rows;
    }
    __threadfence_system();
  }
}

// One warp per received token n: locate its (source, slot), fill the handle's per-token
// entries (routing dispatch), and copy the staged row into its compact row or all of its
// expanded rows (the row is read once and stored to each).
__global__ void __launch_bounds__(kThreads) receive_kernel(ReceiveParams p) {
  const plan::WorkspaceLayout& layout = p.topo.layout;
  const int num_ranks = layout.num_ranks, num_topk = layout.num_topk;
  if (*p.topo.failed) return;
  char* local = p.topo.peers[p.topo.rank];
  const int lane = lane_id();
  const int64_t num_recv = p.device_counts[0];
  for (int64_t n = global_warp(); n < num_recv; n += total_warps()) {
    const int s = plan::source_of_received(p.recv_offsets, num_ranks, n);
    const int64_t slot = n - p.recv_offsets[s];
    const plan::SlotMeta meta{layout.slot_meta(local, s, slot), num_topk};
    const char* row = layout.row(local, layout.dispatch_row_index(s, slot));
    const float* scales = p.scales_out ? layout.row_scales(local, s, slot) : nullptr;
    if (p.routing) {
      if (lane == 0) p.src_token[n] = static_cast<int32_t>(s * layout.max_tokens + *meta.token());
      for (int k = lane; k < num_topk; k += kWarpSize) {
        const int32_t e = meta.local_expert()[k];
        p.recv_topk[n * num_topk + k] = e;
        p.expanded_rows[n * num_topk + k] =
            e >= 0 ? p.expert_source_offsets[e * num_ranks + s] + meta.expert_slot()[k] : -1;
      }
      __syncwarp();
    }
    if (!p.expand) {
      warp_copy(p.x_out + n * p.row_bytes, row, p.row_bytes, lane);
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
    const int32_t* out_rows = p.expanded_rows + n * num_topk;
    if (p.row_bytes % 16 == 0) {
      // The staged row is read once (four 16-byte vectors in flight per lane) and stored into
      // each of its expanded rows.
      const int4* src = reinterpret_cast<const int4*>(row);
      const int64_t vectors = p.row_bytes / 16;
      for (int64_t i0 = lane; i0 < vectors; i0 += 4 * kWarpSize) {
        int4 v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (i0 + j * kWarpSize < vectors) v[j] = src[i0 + j * kWarpSize];
        }
        for (int k = 0; k < num_topk; ++k) {
          const int32_t out_row = out_rows[k];
          if (out_row < 0) continue;
          int4* dst = reinterpret_cast<int4*>(p.x_out + out_row * p.row_bytes);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (i0 + j * kWarpSize < vectors) dst[i0 + j * kWarpSize] = v[j];
          }
        }
      }
    }
    for (int k = 0; k < num_topk; ++k) {
      const int32_t out_row = out_rows[k];
      if (out_row < 0) continue;
      if (p.row_bytes % 16 != 0) {
        warp_copy(p.x_out + out_row * p.row_bytes, row, p.row_bytes, lane);
      }
      for (int64_t i = lane; scales && i < p.scales_per_row; i += kWarpSize) {
        p.scales_out[out_row * p.scales_per_row + i] = scales[i];
      }
      if (lane == 0) {
        if (p.weights_out) p.weights_out[out_row] = meta.weight()[k];
        if (p.aux_out) p.aux_out[out_row] = meta.aux()[k];
      }
    }
  }
}

// Blocks over experts, warps over each expert's padding rows.
__global__ void __launch_bounds__(kThreads) padding_kernel(PaddingParams p) {
  const int lane = lane_id();
  const int warp = warp_in_block();
  for (int e = blockIdx.x; e < p.local_experts; e += gridDim.x) {
    const int64_t first = p.expert_offsets[e] + p.tokens_per_expert[e];
    const int64_t end = p.expert_offsets[e + 1];
    for (int64_t row = first + warp; row < end; row += warps_per_block()) {
      if (lane == 0) {
        if (p.weights) p.weights[row] = 0.0f;
        if (p.aux) p.aux[row] = 0.0f;
      }
      if (!p.zero_x) continue;
      warp_zero(p.x + row * p.row_bytes, p.row_bytes, lane);
      for (int64_t i = lane; p.scales && i < p.scales_per_row; i += kWarpSize) {
        p.scales[row * p.scales_per_row + i] = 0.0f;
      }
    }
  }
}

}  // namespace

void launch_send(const SendParams& params, cudaStream_t stream) {
  send_kernel<<<params.num_blocks, kThreads, 0, stream>>>(params);
}

void launch_receive_counts(const ReceiveCountsParams& params, cudaStream_t stream) {
  receive_counts_kernel<<<1, kCountThreads, 0, stream>>>(params);
}

void launch_receive(const ReceiveParams& params, cudaStream_t stream) {
  receive_kernel<<<params.num_blocks, kThreads, 0, stream>>>(params);
}

void launch_padding(const PaddingParams& params, cudaStream_t stream) {
  padding_kernel<<<params.num_blocks, kThreads, 0, stream>>>(params);
}

}  // namespace epx::cuda
