#include "cuda/runtime/cuda_low_latency.hpp"

#include <vector>

#include "core/output_batch.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "epx/error.hpp"

namespace epx::detail {
namespace {

// The LL failure a kernel's record stands for.
LowLatencyFailure failure_of(const cuda::DeviceStatus& status) {
  LowLatencyFailure failure{.kind = LowLatencyFailure::kTimeout,
                            .phase = status.phase - cuda::kPhaseLowLatency,
                            .peer = status.peer,
                            .value = status.value,
                            .expected = status.expected,
                            .seen = status.seen};
  switch (status.code) {
    case cuda::kDeviceTimeout:
      failure.kind = LowLatencyFailure::kTimeout;
      break;
    case cuda::kDevicePeerAborted:
      failure.kind = LowLatencyFailure::kPeerDropped;
      break;
    case cuda::kDevicePeerFailed:
      failure.kind = LowLatencyFailure::kPeerBufferFailed;
      break;
    case cuda::kDeviceBadRouting:
      failure.kind = LowLatencyFailure::kBadRouting;
      break;
    case cuda::kDeviceLowLatencyOrder:
      failure.kind = LowLatencyFailure::kOrder;
      break;
    case cuda::kDeviceLowLatencyOverflow:
      failure.kind = LowLatencyFailure::kOverflow;
      break;
    case cuda::kDeviceLowLatencyMismatch:
      failure.kind = LowLatencyFailure::kMismatch;
      break;
    default:
      EPX_FAIL(kInternal,
               "rank " << status.peer << ": unknown low-latency device error " << status.code);
  }
  return failure;
}

// The phase clock's stamps of this rank's blocks (null: not compiled in). Ranks that share a
// process (thread ranks on one GPU) share the stamps, so rank r's blocks stamp from block
// r * num_blocks on, where they fit (the others stamp nothing); the report (bench/phase_clock.hpp)
// reads each rank's blocks there, in one process or in several.
uint64_t* rank_clock(int rank, int num_blocks) {
  uint64_t* stamps = cuda::phase_clock_stamps_on_device();
  if (!stamps || rank == 0) return stamps;
  if ((rank + 1) * num_blocks > cuda::kClockBlocks) return nullptr;
  return stamps + size_t(rank) * num_blocks * cuda::kMarkCount;
}

}  // namespace

CudaLowLatency::CudaLowLatency(const EngineContext& context, const plan::LowLatencyLayout& layout,
                               int device, int num_blocks, EngineLinks links)
    : LowLatencyEngine(layout),
      context_(context),
      device_(device),
      num_blocks_(num_blocks),
      links_(std::move(links)),
      scratch_(1),
      old_counts_(2 * size_t(layout.local_experts())),
      clock_(rank_clock(context.comm.rank(), num_blocks)) {
  EPX_CHECK(layout.num_topk <= cuda::kLowLatencyMaxTopk, kInvalidArgument,
            "the CUDA transport's low-latency mode supports num_topk up to "
                << cuda::kLowLatencyMaxTopk << " (" << layout.num_topk << " requested)");
  EPX_CHECK(cuda::low_latency_smem_bytes(layout) <= 48 * 1024, kInvalidArgument,
            "the CUDA transport's low-latency mode supports up to ~12 000 local experts ("
                << layout.local_experts() << " requested)");
  // Unknown before a half's first round: everything past its counts is cleared then.
  const std::vector<int32_t> unknown(2 * size_t(layout.local_experts()),
                                     static_cast<int32_t>(layout.expert_rows()));
  EPX_CUDA_CHECK(cudaMemcpy(old_counts_.get(), unknown.data(), unknown.size() * sizeof(int32_t),
                            cudaMemcpyHostToDevice));
}

cuda::LowLatencyContext CudaLowLatency::kernel_context(int half, uint32_t tags) const {
  return {.topo = links_.topology(),
          .layout = layout_,
          .regions = plan::low_latency_regions(layout_, half),
          .scratch = scratch_.get(),
          .old_counts = old_counts_.get(),
          .half = half,
          .tags = tags,
          .num_blocks = num_blocks_,
          .clock = clock_};
}

Tensor CudaLowLatency::view(void* data, DType dtype, std::vector<int64_t> shape) const {
  return Tensor{TensorView(data, dtype, std::move(shape), Device::cuda(device_)), nullptr};
}

Tensor CudaLowLatency::combine_input() {
  return view(layout_.combine_rows(links_.local_workspace()), DType::kBFloat16,
              {layout_.local_experts(), layout_.expert_rows(), layout_.hidden});
}

LowLatencyDispatchResult CudaLowLatency::send_dispatch(const DispatchInputs& in,
                                                       const LowLatencyHandle* cached, int half,
                                                       bool wait, void* stream_ptr) {
  DeviceGuard guard(device_);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t num_tokens = in.x.size(0);
  const LowLatencyHandle handle =
      cached ? *cached : new_handle(context_, num_tokens, Device::cuda(device_), stream);
  const uint32_t kind = cached ? plan::kKindCached : plan::kKindDispatch;
  const cuda::LowLatencyDispatchParams params{
      .ll = kernel_context(half, dispatch_tags(in, kind, half)),
      .rows = {.kind = kind,
               .x = in.x.ptr<const char>(),
               .row_bytes = in.x.size(1) * static_cast<int64_t>(element_size(in.x.dtype)),
               .scales = in.x_scales.ptr<const float>(),
               .weights = in.weights.ptr<const float>(),
               .aux = in.aux.ptr<const float>(),
               .topk_idx = in.topk_idx.data,
               .topk_int64 = in.topk_idx.dtype == DType::kInt64,
               .num_tokens = num_tokens,
               .topk32 = handle.topk_idx.ptr<int32_t>(),
               .slots = handle.slots.ptr<int32_t>()},
      .counts = handle.counts.ptr<int32_t>(),
      .wait = wait};
  cuda::launch_low_latency_dispatch(params, stream);
  EPX_CUDA_CHECK(cudaGetLastError());
  if (!wait) {
    pending_dispatch_ = params;
    pending_dispatch_->send = false;
    pending_dispatch_->wait = true;
  }
  return receive_views(links_.local_workspace(), half, in, handle, Device::cuda(device_));
}

LowLatencyCombineResult CudaLowLatency::send_combine(const LowLatencyCombineInputs& in,
                                                     const LowLatencyHandle& handle, int half,
                                                     bool wait, void* stream_ptr) {
  DeviceGuard guard(device_);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = links_.local_workspace();
  const bool weighted = in.weights.defined();
  // Zero-copy: rows written into the combine region, the dispatch's own weights.
  const bool x_in_place = in.x.data == layout_.combine_rows(ws);
  const bool weights_in_recv = weighted && in.weights.data == layout_.recv_weights(ws, half);
  LowLatencyCombineResult result;
  OutputBatch outputs;  // the call's one allocation
  outputs.add(&result.x, DType::kBFloat16, {handle.num_tokens, layout_.hidden});
  if (in.scalars.defined()) {
    outputs.add(&result.scalars, DType::kFloat32, {handle.num_tokens, layout_.num_topk});
  }
  outputs.allocate(*context_.allocator, Device::cuda(device_), stream);
  const cuda::LowLatencyCombineParams params{
      .ll = kernel_context(half, combine_tags(in, half)),
      .wait = wait,
      .x = x_in_place ? nullptr : in.x.ptr<const uint16_t>(),
      .weights = weighted && !weights_in_recv ? in.weights.ptr<const float>() : nullptr,
      .scalars = in.scalars.ptr<const float>(),
      .counts = handle.counts.ptr<const int32_t>(),
      .weighted = weighted,
      .weights_in_recv = weights_in_recv,
      .topk32 = handle.topk_idx.ptr<const int32_t>(),
      .slots = handle.slots.ptr<const int32_t>(),
      .num_tokens = handle.num_tokens,
      .y = result.x.ptr<uint16_t>(),
      .scalars_out = result.scalars.ptr<float>()};
  cuda::launch_low_latency_combine(params, stream);
  EPX_CUDA_CHECK(cudaGetLastError());
  if (!wait) {
    pending_combine_ = params;
    pending_combine_->send = false;
    pending_combine_->wait = true;
  }
  return result;
}

CombineBackwardResult CudaLowLatency::run_combine_backward(const TensorView& grad_y,
                                                           const LowLatencyHandle& handle,
                                                           const TensorView& x,
                                                           const TensorView& weights, int half,
                                                           void* stream_ptr) {
  DeviceGuard guard(device_);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int32_t local_experts = layout_.local_experts();
  const int64_t hidden = layout_.hidden;
  CombineBackwardResult result;
  OutputBatch outputs;  // the call's one allocation
  outputs.add(&result.grad_x, DType::kBFloat16, {local_experts, layout_.expert_rows(), hidden});
  outputs.add(&result.grad_weights, DType::kFloat32, {local_experts, layout_.expert_rows()});
  outputs.allocate(*context_.allocator, Device::cuda(device_), stream);
  DispatchInputs rows_in;
  rows_in.x = grad_y;
  cuda::launch_low_latency_backward(
      {.ll = kernel_context(half, dispatch_tags(rows_in, plan::kKindBackward, half)),
       .rows = {.kind = plan::kKindBackward,
                .x = grad_y.ptr<const char>(),
                .row_bytes = hidden * 2,
                .num_tokens = handle.num_tokens,
                .topk32 = handle.topk_idx.ptr<int32_t>(),
                .slots = handle.slots.ptr<int32_t>()},
       .counts = handle.counts.ptr<const int32_t>(),
       .x = x.ptr<const uint16_t>(),
       .weights = weights.ptr<const float>(),
       .grad_x = result.grad_x.ptr<uint16_t>(),
       .grad_weights = result.grad_weights.ptr<float>()},
      stream);
  EPX_CUDA_CHECK(cudaGetLastError());
  return result;
}

void CudaLowLatency::wait_part(void* stream_ptr) {
  DeviceGuard guard(device_);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (pending_dispatch_) {
    cuda::launch_low_latency_dispatch(*pending_dispatch_, stream);
  } else {
    cuda::launch_low_latency_combine(*pending_combine_, stream);
  }
  pending_dispatch_.reset();
  pending_combine_.reset();
  EPX_CUDA_CHECK(cudaGetLastError());
}

void CudaLowLatency::publish_failed(void* stream) {
  DeviceGuard guard(device_);
  cuda::launch_low_latency_fail(kernel_context(0, 0), static_cast<cudaStream_t>(stream));
}

void CudaLowLatency::raise_device_error(const cuda::DeviceStatus& status) {
  const LowLatencyFailure failure = failure_of(status);
  try {
    raise_low_latency_failure(failure, context_.comm.rank(), layout_,
                              context_.config.timeout_seconds);
  } catch (const Error& error) {
    fail(error.what());
    throw;
  }
}

}  // namespace epx::detail
