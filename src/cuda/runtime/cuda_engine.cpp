// The CUDA transport: the protocol of docs/protocol.md over a symmetric workspace (an NCCL
// window, or a thread group's cudaMalloc'd workspaces: cuda/runtime/cuda_comm.hpp; NVLink loads
// and stores into peers' workspaces), one stream-ordered sequence of kernels per
// operation. Host synchronisation happens only where the caller asks for it (sync_counts, or
// Buffer::synchronize), so sync_counts=false operations can be captured in a CUDA graph.
#include <cstring>
#include <sstream>

#include "core/engine.hpp"
#include "core/op_fingerprint.hpp"
#include "core/output_batch.hpp"
#include "cuda/kernels/kernels.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "cuda/runtime/cuda_comm.hpp"
#include "cuda/runtime/cuda_low_latency.hpp"
#include "cuda/runtime/device_memory.hpp"
#include "plan/routing.hpp"

namespace epx::detail {
namespace {

using cuda::Topology;

class CudaEngine final : public Engine {
 public:
  explicit CudaEngine(const EngineContext& context)
      : context_(context),
        state_(static_cast<CudaCommState&>(*context.comm.state())),
        layout_(workspace_layout(context.config, context.comm.num_ranks())),
        rank_(state_.rank),
        num_ranks_(state_.num_ranks) {
    DeviceGuard guard(state_.device);
    EPX_CHECK(
        layout_.num_topk <= 2048, kInvalidArgument,
        "the CUDA transport supports num_topk up to 2048 (" << layout_.num_topk << " requested)");
    // The counts a receive block keeps in shared memory (without an opt-in to more than 48 KB).
    EPX_CHECK(cuda::receive_counts_smem_bytes(layout_) <= 48 * 1024, kInvalidArgument,
              "the CUDA transport supports up to ~12 000 experts (" << layout_.num_experts
                                                                    << " requested)");
    cudaDeviceProp properties{};
    EPX_CUDA_CHECK(cudaGetDeviceProperties(&properties, state_.device));
    num_blocks_ = context.config.num_sms > 0 ? context.config.num_sms
                                             : std::min(24, properties.multiProcessorCount);
    scratch_.epoch = DeviceArray<uint64_t>(1);
    scratch_.sync = DeviceArray<cuda::OperationSync>(1);
    scratch_.failed = DeviceArray<int32_t>(1);
    scratch_.status = MappedArray<cuda::DeviceStatus>(1);
    scratch_.host_counts = MappedArray<int64_t>(2 + 2 * layout_.local_experts() + 1);
    scratch_.rank_counts = DeviceArray<int32_t>(num_ranks_);
    scratch_.expert_counts = DeviceArray<int32_t>(layout_.num_experts);
    scratch_.plan_status = DeviceArray<int64_t>(2);
    scratch_.plan_tile_counts =
        DeviceArray<int32_t>(int64_t(cuda::plan_tiles(layout_.max_tokens, layout_.num_topk)) *
                             (layout_.num_experts + num_ranks_));
    scratch_.plan_first_bad = DeviceArray<unsigned long long>(1);
    EPX_CUDA_CHECK(cudaMemset(scratch_.plan_first_bad.get(), 0xff, sizeof(unsigned long long)));
    if (context.config.low_latency_max_tokens > 0) {
      // Every SM unless num_sms says otherwise: the LL kernels are latency-bound.
      low_latency_ = std::make_unique<CudaLowLatency>(
          context_, low_latency_layout(context.config, num_ranks_, layout_), state_.device,
          context.config.num_sms > 0 ? context.config.num_sms : properties.multiProcessorCount,
          CudaLowLatency::EngineLinks{[this] { return topology(); },
                                      [this] { return workspace_->local(); }});
    }
    cuda::load_kernels();
    EPX_CUDA_CHECK(cudaGetLastError());
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    // Last: the workspace is collective, and once every rank is past it a peer may start an
    // operation whose kernels wait for this rank; from here on nothing may wait for the whole
    // device (ranks of a thread group may share one).
    workspace_ = state_.open_workspace(static_cast<size_t>(layout_.total_bytes()), context.setup,
                                       context.config.timeout_seconds);
    peers_ = workspace_->device_peers();
  }

  // Every rank has issued all its work on this buffer before it destroys it, so waiting for the
  // device here waits only for kernels that need nothing more from this rank. The workspace
  // goes first (collective: an NCCL window, or the thread group's rendezvous), then the
  // scratch (its owners free it on its device).
  // A failed buffer (a timeout) on NCCL skips the collective teardown, whose deregistration would
  // wait without bound for a rank that may be dead: its workspace is left allocated. The other
  // transports' teardowns are bounded (and leave memory allocated when a peer never comes).
  ~CudaEngine() override {
    DeviceGuard guard(state_.device);
    cudaDeviceSynchronize();
    if (poisoned_ && state_.transport() == Transport::kNccl) {
      (void)workspace_.release();
      return;
    }
    workspace_.reset();
  }

  Device device() const override { return Device::cuda(state_.device); }
  int num_sms() const override { return num_blocks_; }
  LowLatencyEngine& low_latency() override {
    return low_latency_ ? *low_latency_ : Engine::low_latency();
  }

  void synchronize(void* stream) override {
    DeviceGuard guard(state_.device);
    EPX_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
    raise_device_error(static_cast<cudaStream_t>(stream));
  }

  void raise_recorded_error(void* stream) override {
    if (scratch_.status.host()->code == cuda::kDeviceOk) return;
    DeviceGuard guard(state_.device);
    raise_device_error(static_cast<cudaStream_t>(stream));
  }

  void abort(const plan::OpFingerprint& op, void* stream) override {
    DeviceGuard guard(state_.device);
    cuda::launch_abort(topology(op), static_cast<cudaStream_t>(stream));
  }

  void poison(void* stream) override {
    DeviceGuard guard(state_.device);
    poisoned_ = true;
    cuda::launch_poison(topology(), static_cast<cudaStream_t>(stream));
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  }

  DispatchResult dispatch(const DispatchInputs& in, const DispatchOptions& options,
                          const Handle* cached, const plan::OpFingerprint& op,
                          void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const int64_t num_tokens = in.x.size(0);
    const int32_t channels = (in.weights.defined() ? plan::kChannelWeights : 0) |
                             (in.aux.defined() ? plan::kChannelAux : 0);
    // The outputs are asked of the allocator in one call with the handle's arrays (one call
    // instead of up to six: with the Python package each is a callback into PyTorch). With
    // sync_counts their sizes wait for the counts (sync_receive_counts).
    Handle handle;
    DispatchResult result;
    OutputBatch outputs;
    if (cached) {
      handle = *cached;
      add_dispatch_outputs(outputs, result, handle, in, layout_.hidden, layout_.num_topk);
      outputs.allocate(*context_.allocator, device(), stream);
    } else {
      handle = new_routing_handle(options, num_tokens);
      pack_routing_arrays(outputs, handle, /*received=*/!options.sync_counts);
      if (!options.sync_counts) {
        add_dispatch_outputs(outputs, result, handle, in, layout_.hidden, layout_.num_topk);
      }
      outputs.allocate(*context_.allocator, device(), stream);
      cuda::launch_plan({.topk_idx = in.topk_idx.data,
                         .topk_int64 = in.topk_idx.dtype == DType::kInt64,
                         .num_tokens = num_tokens,
                         .num_topk = layout_.num_topk,
                         .num_experts = layout_.num_experts,
                         .num_ranks = num_ranks_,
                         .send_slot = handle.send_slot.ptr<int32_t>(),
                         .expert_slot = handle.expert_slot.ptr<int32_t>(),
                         .topk32 = handle.topk_idx.ptr<int32_t>(),
                         .rank_counts = scratch_.rank_counts.get(),
                         .expert_counts = scratch_.expert_counts.get(),
                         .plan_status = scratch_.plan_status.get(),
                         .tile_counts = scratch_.plan_tile_counts.get(),
                         .first_bad = scratch_.plan_first_bad.get(),
                         .publish_entry = true,  // the entry goes out while the plan runs
                         .topo = topology(op)},
                        stream);
    }
    cuda::launch_send({.topo = topology(op),
                       .x = in.x.ptr<const char>(),
                       .row_bytes = row_bytes_of(in.x),
                       .scales = in.x_scales.ptr<const float>(),
                       .scales_per_row = in.x_scales.defined() ? in.x_scales.size(1) : 0,
                       .weights = in.weights.ptr<const float>(),
                       .aux = in.aux.ptr<const float>(),
                       .num_tokens = num_tokens,
                       .send_slot = handle.send_slot.ptr<int32_t>(),
                       .expert_slot = handle.expert_slot.ptr<int32_t>(),
                       .topk32 = handle.topk_idx.ptr<int32_t>(),
                       .with_meta = true,
                       .write_headers = !cached,
                       .channels = channels,
                       .plan_status = cached ? nullptr : scratch_.plan_status.get(),
                       .rank_counts = scratch_.rank_counts.get(),
                       .expert_counts = scratch_.expert_counts.get(),
                       .entry_phase = cached ? cuda::kPhaseCachedEntry : cuda::kPhaseDispatchEntry,
                       .num_blocks = num_blocks_,
                       .entry_published = !cached,
                       // The rows this rank routes to itself stay in x: the receive reads them
                       // there (one copy of them instead of two). Its vector loads need x
                       // 16-byte aligned.
                       .stage_own_rows = !own_rows_in_place(in.x)},
                      stream);
    if (cached) return receive(handle, in, ReceiveMode::kCached, {}, std::move(result), stream);
    const cuda::ReceiveCountsParams counts = counts_params(handle, options, channels);
    if (!options.sync_counts) {
      return receive(handle, in, ReceiveMode::kCountsInKernel, counts, std::move(result), stream);
    }
    sync_receive_counts(handle, counts, stream);
    pack_received_arrays(outputs, handle);
    add_dispatch_outputs(outputs, result, handle, in, layout_.hidden, layout_.num_topk);
    outputs.allocate(*context_.allocator, device(), stream);
    return receive(handle, in, ReceiveMode::kCountsSynced, counts, std::move(result), stream);
  }

  CombineResult combine(const CombineInputs& in, const Handle& handle, ReduceAt reduce_at,
                        const plan::OpFingerprint& op, void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const bool at_source = handle.expand && reduce_at == ReduceAt::kSource;
    // Compact or reduced at the source: the rows of tokens from this rank stay in x for the
    // reduce (as in dispatch). Reduced at the expert, the staged row is a sum: it stays staged.
    const bool own_rows = (!handle.expand || at_source) && own_rows_in_place(in.x);
    cuda::launch_combine_send({.topo = topology(op),
                               .expand = handle.expand,
                               .at_source = at_source,
                               .device_counts = handle.device_counts.ptr<int64_t>(),
                               .src_token = handle.src_token.ptr<int32_t>(),
                               .expanded_rows = handle.expanded_rows.ptr<int32_t>(),
                               .recv_topk = handle.recv_topk_idx.ptr<int32_t>(),
                               .x = in.x.ptr<uint16_t>(),
                               .weights = in.weights.ptr<float>(),
                               .scalars = in.scalars.ptr<float>(),
                               .num_blocks = num_blocks_,
                               .stage_own_rows = !own_rows},
                              stream);
    CombineResult result;
    OutputBatch outputs;
    outputs.add(&result.x, DType::kBFloat16, {handle.num_tokens, layout_.hidden});
    if (in.scalars.defined()) {
      outputs.add(&result.scalars, DType::kFloat32, {handle.num_tokens, layout_.num_topk});
    }
    outputs.allocate(*context_.allocator, device(), stream);
    cuda::launch_combine_reduce({.topo = topology(),
                                 .at_source = at_source,
                                 .weighted = in.weights.defined(),
                                 .num_tokens = handle.num_tokens,
                                 .send_slot = handle.send_slot.ptr<int32_t>(),
                                 .topk32 = handle.topk_idx.ptr<int32_t>(),
                                 .bias0 = in.bias0.ptr<uint16_t>(),
                                 .bias1 = in.bias1.ptr<uint16_t>(),
                                 .y = result.x.ptr<uint16_t>(),
                                 .scalars_out = result.scalars.ptr<float>(),
                                 .num_blocks = num_blocks_,
                                 .own_x = own_rows ? in.x.ptr<uint16_t>() : nullptr,
                                 .recv_offsets = handle.recv_offsets.ptr<int32_t>(),
                                 .expanded_rows = handle.expanded_rows.ptr<int32_t>()},
                                stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    return result;
  }

  CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                         const TensorView& x, const TensorView& weights,
                                         const plan::OpFingerprint& op, void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const bool own_rows = own_rows_in_place(grad_y);  // as in dispatch
    cuda::launch_send({.topo = topology(op),
                       .x = grad_y.ptr<const char>(),
                       .row_bytes = layout_.hidden * 2,
                       .num_tokens = handle.num_tokens,
                       .send_slot = handle.send_slot.ptr<int32_t>(),
                       .expert_slot = handle.expert_slot.ptr<int32_t>(),
                       .topk32 = handle.topk_idx.ptr<int32_t>(),
                       .entry_phase = cuda::kPhaseBackwardEntry,
                       .num_blocks = num_blocks_,
                       .stage_own_rows = !own_rows},
                      stream);
    CombineBackwardResult result;
    OutputBatch outputs;
    outputs.add(&result.grad_x, DType::kBFloat16, {handle.row_capacity, layout_.hidden});
    outputs.add(&result.grad_weights, DType::kFloat32, {handle.row_capacity});
    outputs.allocate(*context_.allocator, device(), stream);
    cuda::launch_backward({.topo = topology(),
                           .tokens_per_expert = handle.tokens_per_expert.ptr<int32_t>(),
                           .expert_offsets = handle.expert_offsets.ptr<int32_t>(),
                           .device_counts = handle.device_counts.ptr<int64_t>(),
                           .recv_offsets = handle.recv_offsets.ptr<int32_t>(),
                           .expanded_rows = handle.expanded_rows.ptr<int32_t>(),
                           .x = x.ptr<uint16_t>(),
                           .weights = weights.ptr<float>(),
                           .grad_x = result.grad_x.ptr<uint16_t>(),
                           .grad_weights = result.grad_weights.ptr<float>(),
                           .num_blocks = num_blocks_,
                           .own_grad_y = own_rows ? grad_y.ptr<uint16_t>() : nullptr,
                           .src_token = handle.src_token.ptr<int32_t>()},
                          stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    return result;
  }

 private:
  static bool own_rows_in_place(const TensorView& x) { return cuda::aligned16(x.data); }
  static int64_t row_bytes_of(const TensorView& x) {
    return x.size(1) * static_cast<int64_t>(element_size(x.dtype));
  }

  // What the kernels of an operation know; `op` is the fingerprint its entry carries.
  Topology topology(const plan::OpFingerprint& op = {}) const {
    const auto timeout_ns = static_cast<uint64_t>(context_.config.timeout_seconds * 1e9);
    return Topology{.layout = layout_,
                    .peers = peers_,
                    .rank = rank_,
                    .failed = scratch_.failed.get(),
                    .status = scratch_.status.device(),
                    .epoch = scratch_.epoch.get(),
                    .sync = scratch_.sync.get(),
                    .timeout_ns = timeout_ns,
                    .chained = !workspace_->shares_device(),  // cuda/device/chained_launch.hpp
                    .op = op};
  }

  // Raises (and clears) an error a kernel recorded.
  // Stream-ordered: the flag is cleared before this rank's next kernels, without waiting for
  // the whole device (ranks of a thread group sharing it may be spinning for this rank).
  void raise_device_error(cudaStream_t stream) {
    cuda::DeviceStatus status;
    std::memcpy(&status, const_cast<const cuda::DeviceStatus*>(scratch_.status.host()),
                sizeof(status));
    if (status.code == cuda::kDeviceOk) return;
    std::memset(scratch_.status.host(), 0, sizeof(cuda::DeviceStatus));
    EPX_CUDA_CHECK(cudaMemsetAsync(scratch_.failed.get(), 0, sizeof(int32_t), stream));
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
    if (status.phase >= cuda::kPhaseLowLatency && low_latency_) {
      low_latency_->raise_device_error(status);
    }
    const char* phase = cuda::phase_name(status.phase);
    switch (status.code) {
      case cuda::kDeviceTimeout:
        EPX_FAIL(kTimeout, "rank " << rank_ << ": phase " << phase << " timed out after "
                                   << context_.config.timeout_seconds << " s waiting for rank "
                                   << status.peer << " (expected epoch " << status.expected
                                   << ", saw " << status.seen << ")");
      case cuda::kDeviceBadRouting:
        EPX_FAIL(kInvalidRouting, "rank " << rank_ << ": dispatch aborted: rank " << status.peer
                                          << " passed topk_idx value "
                                          << static_cast<int64_t>(status.expected)
                                          << " outside [-1, " << layout_.num_experts << ")");
      case cuda::kDeviceChannelMismatch:
        EPX_FAIL(kInvalidArgument, "rank " << rank_ << ": rank " << status.peer
                                           << " dispatched other channels (weights/aux bits "
                                           << status.value
                                           << "): every rank must pass the same channels");
      case cuda::kDevicePeerAborted:
        EPX_FAIL(kInvalidArgument, "rank " << rank_ << ": phase " << phase << " aborted: rank "
                                           << status.peer
                                           << " rejected its input to this operation (see that "
                                              "rank's error)");
      case cuda::kDeviceOpMismatch:
        EPX_FAIL(
            kInvalidArgument,
            "rank " << rank_ << ": phase " << phase << ": "
                    << (status.value < 0 ? describe_op_mismatch({}, rank_, nullptr, status.peer)
                                         : describe_op_field(status.value, status.expected,
                                                             status.seen, rank_, status.peer)));
      case cuda::kDevicePeerFailed:
        EPX_FAIL(kUnusable, "rank " << rank_ << ": phase " << phase << ": rank " << status.peer
                                    << "'s buffer failed earlier (see that rank's error); build "
                                       "a new Buffer on every rank");
      default:
        EPX_FAIL(kInternal, "rank " << rank_ << ": unknown device error " << status.code);
    }
  }

  // A routing dispatch's handle, its arrays not allocated yet; without sync_counts the
  // per-received-token arrays and outputs have their worst-case size.
  Handle new_routing_handle(const DispatchOptions& options, int64_t num_tokens) {
    Handle handle = new_handle(context_, options, num_tokens);
    if (!options.sync_counts) {
      handle.recv_token_capacity = plan::worst_case_compact_rows(num_ranks_, layout_.max_tokens);
      handle.row_capacity = options.expand ? plan::worst_case_expanded_rows(
                                                 num_ranks_, layout_.max_tokens, layout_.num_topk,
                                                 layout_.local_experts(), options.expert_alignment)
                                           : handle.recv_token_capacity;
    }
    return handle;
  }

  // The handle's arrays in one block: the source side (filled by the plan), the receive-side
  // counts and, with `received`, the per-received-token arrays (pack_received_arrays).
  void pack_routing_arrays(OutputBatch& batch, Handle& handle, bool received) {
    const int64_t num_tokens = handle.num_tokens;
    const int32_t local_experts = layout_.local_experts(), num_topk = layout_.num_topk;
    batch.pack(&handle.send_slot, DType::kInt32, {num_tokens, num_ranks_});
    batch.pack(&handle.expert_slot, DType::kInt32, {num_tokens, num_topk});
    batch.pack(&handle.topk_idx, DType::kInt32, {num_tokens, num_topk});
    batch.pack(&handle.device_counts, DType::kInt64, {2});
    batch.pack(&handle.recv_counts, DType::kInt32, {num_ranks_});
    batch.pack(&handle.recv_offsets, DType::kInt32, {num_ranks_ + 1});
    batch.pack(&handle.source_expert_counts, DType::kInt32, {num_ranks_, local_experts});
    batch.pack(&handle.tokens_per_expert, DType::kInt32, {local_experts});
    batch.pack(&handle.expert_offsets, DType::kInt32, {local_experts + 1});
    batch.pack(&handle.expert_source_offsets, DType::kInt32, {local_experts, num_ranks_});
    if (received) pack_received_arrays(batch, handle);
  }

  // The per-received-token arrays of a routing handle, at its recv_token_capacity.
  void pack_received_arrays(OutputBatch& batch, Handle& handle) {
    const int64_t capacity = handle.recv_token_capacity;
    batch.pack(&handle.src_token, DType::kInt32, {capacity});
    batch.pack(&handle.expanded_rows, DType::kInt32, {capacity, layout_.num_topk});
    batch.pack(&handle.recv_topk_idx, DType::kInt32, {capacity, layout_.num_topk});
  }

  cuda::ReceiveCountsParams counts_params(Handle& handle, const DispatchOptions& options,
                                          int32_t channels) {
    return {.topo = topology(),
            .channels = channels,
            .alignment = options.expert_alignment,
            .expand = options.expand,
            .recv_counts = handle.recv_counts.ptr<int32_t>(),
            .recv_offsets = handle.recv_offsets.ptr<int32_t>(),
            .source_expert_counts = handle.source_expert_counts.ptr<int32_t>(),
            .tokens_per_expert = handle.tokens_per_expert.ptr<int32_t>(),
            .expert_offsets = handle.expert_offsets.ptr<int32_t>(),
            .expert_source_offsets = handle.expert_source_offsets.ptr<int32_t>(),
            .device_counts = handle.device_counts.ptr<int64_t>(),
            .host_counts = options.sync_counts ? scratch_.host_counts.device() : nullptr};
  }

  // sync_counts: the exit barrier and the counts, a wait for them on the host; the caller then
  // allocates the per-received-token arrays and the outputs at their real size.
  void sync_receive_counts(Handle& handle, const cuda::ReceiveCountsParams& params,
                           cudaStream_t stream) {
    const int32_t local_experts = layout_.local_experts();
    cuda::launch_receive_counts(params, stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
    raise_device_error(stream);
    const volatile int64_t* host = scratch_.host_counts.host();
    handle.num_recv_tokens = host[0];
    handle.num_rows = host[1];
    handle.recv_token_capacity = handle.num_recv_tokens;
    handle.row_capacity = handle.num_rows;
    handle.host_tokens_per_expert.assign(local_experts, 0);
    handle.host_expert_offsets.assign(local_experts + 1, 0);
    for (int32_t e = 0; e < local_experts; ++e) handle.host_tokens_per_expert[e] = host[2 + e];
    for (int32_t e = 0; e <= local_experts; ++e) {
      handle.host_expert_offsets[e] = host[2 + local_experts + e];
    }
  }

  enum class ReceiveMode {
    kCountsSynced,    // routing, sync_counts: counts already in the handle, exit passed
    kCountsInKernel,  // routing, sync_counts=false: the kernel waits and counts (one launch)
    kCached,          // cached: the kernel waits; offsets from the handle
  };

  // The receive epilogue into `result`, whose outputs add_dispatch_outputs allocated.
  DispatchResult receive(const Handle& handle, const DispatchInputs& in, ReceiveMode mode,
                         const cuda::ReceiveCountsParams& counts, DispatchResult result,
                         cudaStream_t stream) {
    cuda::launch_receive({.topo = topology(),
                          .exit_phase = mode == ReceiveMode::kCached ? cuda::kPhaseCachedExit
                                                                     : cuda::kPhaseDispatchExit,
                          .wait_exit = mode != ReceiveMode::kCountsSynced,
                          .compute_counts = mode == ReceiveMode::kCountsInKernel,
                          .counts = counts,
                          .capacity = handle.recv_token_capacity,
                          .routing = mode != ReceiveMode::kCached,
                          .expand = handle.expand,
                          .device_counts = handle.device_counts.ptr<int64_t>(),
                          .recv_offsets = handle.recv_offsets.ptr<int32_t>(),
                          .expert_source_offsets = handle.expert_source_offsets.ptr<int32_t>(),
                          .src_token = handle.src_token.ptr<int32_t>(),
                          .recv_topk = handle.recv_topk_idx.ptr<int32_t>(),
                          .expanded_rows = handle.expanded_rows.ptr<int32_t>(),
                          .x_out = result.x.ptr<char>(),
                          .row_bytes = row_bytes_of(in.x),
                          .scales_out = result.x_scales.ptr<float>(),
                          .scales_per_row = in.x_scales.defined() ? in.x_scales.size(1) : 0,
                          .weights_out = result.weights.ptr<float>(),
                          .aux_out = result.aux.ptr<float>(),
                          .topk_out = result.topk_idx.ptr<int32_t>(),
                          .tokens_per_expert = handle.tokens_per_expert.ptr<int32_t>(),
                          .expert_offsets = handle.expert_offsets.ptr<int32_t>(),
                          .zero_padding = handle.zero_padding,
                          .num_blocks = num_blocks_,
                          .own_x = own_rows_in_place(in.x) ? in.x.ptr<const char>() : nullptr},
                         stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    result.handle = handle;
    return result;
  }

  EngineContext context_;
  CudaCommState& state_;
  plan::WorkspaceLayout layout_;
  int32_t rank_;
  int32_t num_ranks_;
  int num_blocks_ = 24;
  std::unique_ptr<PeerWorkspace> workspace_;
  bool poisoned_ = false;  // the buffer failed (poison())
  char* const* peers_ = nullptr;
  std::unique_ptr<CudaLowLatency> low_latency_;  // cuda_low_latency.cpp; null when the mode is off
  // The engine's own memory (only this rank uses it).
  struct Scratch {
    DeviceArray<uint64_t> epoch;  // barriers passed (cuda/device/operation_sync.cuh)
    DeviceArray<cuda::OperationSync> sync;
    DeviceArray<int32_t> failed;             // a kernel recorded an error: later ones skip
    MappedArray<cuda::DeviceStatus> status;  // the error record the host raises
    MappedArray<int64_t> host_counts;        // sync_counts: N, M, tokens per expert, offsets
    DeviceArray<int32_t> rank_counts;        // the routing plan's counts and scratch
    DeviceArray<int32_t> expert_counts;
    DeviceArray<int64_t> plan_status;
    DeviceArray<int32_t> plan_tile_counts;
    DeviceArray<unsigned long long> plan_first_bad;
  } scratch_;
};

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const EngineContext& context) {
  return std::make_unique<CudaEngine>(context);
}

}  // namespace epx::detail
