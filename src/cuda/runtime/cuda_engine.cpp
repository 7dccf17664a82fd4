// The CUDA transport: the protocol of docs/protocol.md over a symmetric workspace (an NCCL
// window, or a thread group's cudaMalloc'd workspaces: cuda/peer_workspace.hpp; NVLink loads
// and stores into peers' workspaces), one stream-ordered sequence of kernels per
// operation. Host synchronisation happens only where the caller asks for it (sync_counts, or
// Buffer::synchronize), so sync_counts=false operations can be captured in a CUDA graph.
#include <cstring>
#include <sstream>

#include "core/engine.hpp"
#include "core/output_batch.hpp"
#include "cuda/runtime/cuda_check.hpp"
#include "cuda/kernels/kernels.hpp"
#include "cuda/runtime/cuda_comm.hpp"
#include "plan/routing.hpp"

namespace epx::detail {
namespace {

using cuda::Topology;

// Makes `device` current for the scope.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

template <typename T>
T* device_alloc(size_t count) {
  void* memory = nullptr;
  EPX_CUDA_CHECK(cudaMalloc(&memory, count * sizeof(T) > 0 ? count * sizeof(T) : 16));
  EPX_CUDA_CHECK(cudaMemset(memory, 0, count * sizeof(T) > 0 ? count * sizeof(T) : 16));
  return static_cast<T*>(memory);
}

template <typename T>
T* mapped_alloc(size_t count) {
  void* memory = nullptr;
  EPX_CUDA_CHECK(cudaHostAlloc(&memory, count * sizeof(T), cudaHostAllocMapped));
  std::memset(memory, 0, count * sizeof(T));
  return static_cast<T*>(memory);
}

template <typename T>
T* device_view_of_mapped(T* host) {
  void* device = nullptr;
  EPX_CUDA_CHECK(cudaHostGetDevicePointer(&device, host, 0));
  return static_cast<T*>(device);
}

class CudaEngine final : public Engine {
 public:
  explicit CudaEngine(const EngineContext& context)
      : context_(context),
        state_(static_cast<CudaCommState&>(*context.comm.state())),
        layout_(workspace_layout(context.config, context.comm.num_ranks())),
        rank_(state_.rank),
        num_ranks_(state_.num_ranks) {
    DeviceGuard guard(state_.device);
    EPX_CHECK(layout_.num_topk <= 2048, kInvalidArgument,
              "the CUDA transport supports num_topk up to 2048 (" << layout_.num_topk
                                                                  << " requested)");
    // The counts a receive block keeps in shared memory (without an opt-in to more than 48 KB).
    EPX_CHECK(cuda::receive_counts_smem_bytes(layout_) <= 48 * 1024, kInvalidArgument,
              "the CUDA transport supports up to ~12 000 experts (" << layout_.num_experts
                                                                    << " requested)");
    cudaDeviceProp properties{};
    EPX_CUDA_CHECK(cudaGetDeviceProperties(&properties, state_.device));
    num_blocks_ = context.config.num_sms > 0 ? context.config.num_sms
                                             : std::min(24, properties.multiProcessorCount);
    epoch_ = device_alloc<uint64_t>(1);
    sync_ = device_alloc<cuda::OperationSync>(1);
    failed_ = device_alloc<int32_t>(1);
    status_ = mapped_alloc<cuda::DeviceStatus>(1);
    status_device_ = device_view_of_mapped(status_);
    host_counts_ = mapped_alloc<int64_t>(2 + 2 * layout_.local_experts() + 1);
    host_counts_device_ = device_view_of_mapped(host_counts_);
    rank_counts_ = device_alloc<int32_t>(num_ranks_);
    expert_counts_ = device_alloc<int32_t>(layout_.num_experts);
    plan_status_ = device_alloc<int32_t>(2);
    plan_tile_counts_ = device_alloc<int32_t>(
        int64_t(cuda::plan_tiles(layout_.max_tokens, layout_.num_topk)) *
        (layout_.num_experts + num_ranks_));
    plan_first_bad_ = device_alloc<unsigned long long>(1);
    EPX_CUDA_CHECK(cudaMemset(plan_first_bad_, 0xff, sizeof(unsigned long long)));
    cuda::load_kernels();
    EPX_CUDA_CHECK(cudaGetLastError());
    EPX_CUDA_CHECK(cudaDeviceSynchronize());
    // Last: the workspace is collective, and once every rank is past it a peer may start an
    // operation whose kernels wait for this rank; from here on nothing may wait for the whole
    // device (ranks of a thread group may share one).
    try {
      workspace_ = state_.open_workspace(static_cast<size_t>(layout_.total_bytes()));
    } catch (...) {
      free_own_memory();
      throw;
    }
    peers_ = workspace_->device_peers();
  }

  // Every rank has issued all its work on this buffer before it destroys it, so waiting for the
  // device here waits only for kernels that need nothing more from this rank.
  ~CudaEngine() override {
    DeviceGuard guard(state_.device);
    cudaDeviceSynchronize();
    free_own_memory();
    workspace_.reset();  // collective (NCCL window, or the thread group's rendezvous)
  }

  // The engine's memory besides the workspace (only this rank uses it).
  void free_own_memory() {
    for (void* p : {static_cast<void*>(epoch_), static_cast<void*>(sync_),
                    static_cast<void*>(failed_),
                    static_cast<void*>(rank_counts_), static_cast<void*>(expert_counts_),
                    static_cast<void*>(plan_status_), static_cast<void*>(plan_tile_counts_),
                    static_cast<void*>(plan_first_bad_)}) {
      if (p) cudaFree(p);
    }
    if (status_) cudaFreeHost(status_);
    if (host_counts_) cudaFreeHost(host_counts_);
  }

  Device device() const override { return Device::cuda(state_.device); }
  int num_sms() const override { return num_blocks_; }

  void synchronize(void* stream) override {
    DeviceGuard guard(state_.device);
    EPX_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
    raise_device_error(static_cast<cudaStream_t>(stream));
  }

  void abort(const char*, void* stream) override {
    DeviceGuard guard(state_.device);
    cuda::launch_abort(topology(), static_cast<cudaStream_t>(stream));
  }

  DispatchResult dispatch(const DispatchInputs& in, const DispatchOptions& options,
                          const Handle* cached, void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const int64_t num_tokens = in.x.size(0);
    const int32_t num_topk = layout_.num_topk;
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
      cuda::PlanParams plan{in.topk_idx.data, in.topk_idx.dtype == DType::kInt64, num_tokens,
                            num_topk, layout_.num_experts, num_ranks_,
                            handle.send_slot.ptr<int32_t>(), handle.expert_slot.ptr<int32_t>(),
                            handle.topk_idx.ptr<int32_t>(), rank_counts_, expert_counts_,
                            plan_status_, plan_tile_counts_, plan_first_bad_};
      plan.publish_entry = true;  // the entry goes out while the plan runs
      plan.topo = topology();
      cuda::launch_plan(plan, stream);
    }
    cuda::SendParams send{};
    send.topo = topology();
    send.x = in.x.ptr<const char>();
    send.row_bytes = in.x.size(1) * static_cast<int64_t>(element_size(in.x.dtype));
    send.scales = in.x_scales.ptr<const float>();
    send.scales_per_row = in.x_scales.defined() ? in.x_scales.size(1) : 0;
    send.weights = in.weights.ptr<const float>();
    send.aux = in.aux.ptr<const float>();
    send.num_tokens = num_tokens;
    send.send_slot = handle.send_slot.ptr<int32_t>();
    send.expert_slot = handle.expert_slot.ptr<int32_t>();
    send.topk32 = handle.topk_idx.ptr<int32_t>();
    send.with_meta = true;
    send.write_headers = !cached;
    send.channels = channels;
    send.plan_status = cached ? nullptr : plan_status_;
    send.rank_counts = rank_counts_;
    send.expert_counts = expert_counts_;
    send.entry_phase = cached ? cuda::kPhaseCachedEntry : cuda::kPhaseDispatchEntry;
    send.num_blocks = num_blocks_;
    send.entry_published = !cached;
    // The rows this rank routes to itself stay in x: the receive reads them there (one copy of
    // them instead of two; bench/NOTES.md change 19). Its vector loads need x 16-byte aligned.
    send.stage_own_rows = !own_rows_in_place(in.x);
    cuda::launch_send(send, stream);
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
                        void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    const bool at_source = handle.expand && reduce_at == ReduceAt::kSource;
    // Compact or reduced at the source: the rows of tokens from this rank stay in x for the
    // reduce (as in dispatch). Reduced at the expert, the staged row is a sum: it stays staged.
    const bool own_rows = (!handle.expand || at_source) && own_rows_in_place(in.x);
    cuda::CombineSendParams send{topology(),
                                 handle.expand,
                                 at_source,
                                 handle.device_counts.ptr<int64_t>(),
                                 handle.src_token.ptr<int32_t>(),
                                 handle.expanded_rows.ptr<int32_t>(),
                                 handle.recv_topk_idx.ptr<int32_t>(),
                                 in.x.ptr<uint16_t>(),
                                 in.weights.ptr<float>(),
                                 in.scalars.ptr<float>(),
                                 num_blocks_,
                                 !own_rows};
    cuda::launch_combine_send(send, stream);
    CombineResult result;
    OutputBatch outputs;
    outputs.add(&result.x, DType::kBFloat16, {handle.num_tokens, layout_.hidden});
    if (in.scalars.defined()) {
      outputs.add(&result.scalars, DType::kFloat32, {handle.num_tokens, layout_.num_topk});
    }
    outputs.allocate(*context_.allocator, device(), stream);
    cuda::CombineReduceParams reduce{topology(),
                                     at_source,
                                     in.weights.defined(),
                                     handle.num_tokens,
                                     handle.send_slot.ptr<int32_t>(),
                                     handle.topk_idx.ptr<int32_t>(),
                                     in.bias0.ptr<uint16_t>(),
                                     in.bias1.ptr<uint16_t>(),
                                     result.x.ptr<uint16_t>(),
                                     result.scalars.ptr<float>(),
                                     num_blocks_,
                                     own_rows ? in.x.ptr<uint16_t>() : nullptr,
                                     handle.recv_offsets.ptr<int32_t>(),
                                     handle.expanded_rows.ptr<int32_t>()};
    cuda::launch_combine_reduce(reduce, stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    return result;
  }

  CombineBackwardResult combine_backward(const TensorView& grad_y, const Handle& handle,
                                         const TensorView& x, const TensorView& weights,
                                         void* stream_ptr) override {
    DeviceGuard guard(state_.device);
    auto stream = static_cast<cudaStream_t>(stream_ptr);
    cuda::SendParams send{};
    send.topo = topology();
    send.x = grad_y.ptr<const char>();
    send.row_bytes = layout_.hidden * 2;
    send.num_tokens = handle.num_tokens;
    send.send_slot = handle.send_slot.ptr<int32_t>();
    send.expert_slot = handle.expert_slot.ptr<int32_t>();
    send.topk32 = handle.topk_idx.ptr<int32_t>();
    send.entry_phase = cuda::kPhaseBackwardEntry;
    send.num_blocks = num_blocks_;
    const bool own_rows = own_rows_in_place(grad_y);  // as in dispatch
    send.stage_own_rows = !own_rows;
    cuda::launch_send(send, stream);
    CombineBackwardResult result;
    OutputBatch outputs;
    outputs.add(&result.grad_x, DType::kBFloat16, {handle.row_capacity, layout_.hidden});
    outputs.add(&result.grad_weights, DType::kFloat32, {handle.row_capacity});
    outputs.allocate(*context_.allocator, device(), stream);
    cuda::BackwardParams backward{topology(),
                                  handle.tokens_per_expert.ptr<int32_t>(),
                                  handle.expert_offsets.ptr<int32_t>(),
                                  handle.device_counts.ptr<int64_t>(),
                                  handle.recv_offsets.ptr<int32_t>(),
                                  handle.expanded_rows.ptr<int32_t>(),
                                  x.ptr<uint16_t>(),
                                  weights.ptr<float>(),
                                  result.grad_x.ptr<uint16_t>(),
                                  result.grad_weights.ptr<float>(),
                                  num_blocks_,
                                  own_rows ? grad_y.ptr<uint16_t>() : nullptr,
                                  handle.src_token.ptr<int32_t>()};
    cuda::launch_backward(backward, stream);
    EPX_CUDA_CHECK(cudaGetLastError());
    return result;
  }

 private:
  static bool own_rows_in_place(const TensorView& x) { return cuda::aligned16(x.data); }

  Topology topology() const {
    const auto timeout_ns = static_cast<uint64_t>(context_.config.timeout_seconds * 1e9);
    Topology topo{layout_, peers_, rank_, failed_, status_device_, epoch_, sync_, timeout_ns};
    topo.chained = !workspace_->shares_device();  // cuda/device/chained_launch.hpp
    return topo;
  }

  // Raises (and clears) an error a kernel recorded.
  // Stream-ordered: the flag is cleared before this rank's next kernels, without waiting for
  // the whole device (ranks of a thread group sharing it may be spinning for this rank).
  void raise_device_error(cudaStream_t stream) {
    cuda::DeviceStatus status;
    std::memcpy(&status, const_cast<const cuda::DeviceStatus*>(status_), sizeof(status));
    if (status.code == cuda::kDeviceOk) return;
    std::memset(status_, 0, sizeof(*status_));
    EPX_CUDA_CHECK(cudaMemsetAsync(failed_, 0, sizeof(int32_t), stream));
    EPX_CUDA_CHECK(cudaStreamSynchronize(stream));
    const char* phase = cuda::phase_name(status.phase);
    switch (status.code) {
      case cuda::kDeviceTimeout:
        EPX_FAIL(kTimeout, "rank " << rank_ << ": phase " << phase << " timed out after "
                                   << context_.config.timeout_seconds << " s waiting for rank "
                                   << status.peer << " (expected epoch " << status.expected
                                   << ", saw " << status.seen << ")");
      case cuda::kDeviceBadRouting:
        EPX_FAIL(kInvalidRouting, "rank " << rank_ << ": dispatch aborted: rank " << status.peer
                                          << " passed topk_idx value " << status.value
                                          << " outside [-1, " << layout_.num_experts << ")");
      case cuda::kDeviceChannelMismatch:
        EPX_FAIL(kInvalidArgument, "rank " << rank_ << ": rank " << status.peer
                                           << " dispatched other channels (weights/aux bits "
                                           << status.value
                                           << "): every rank must pass the same channels");
      case cuda::kDevicePeerAborted:
        EPX_FAIL(kInvalidArgument, "rank " << rank_ << ": phase " << phase
                                           << " aborted: rank " << status.peer
                                           << " rejected its input to this operation (see that "
                                              "rank's error)");
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
    return cuda::ReceiveCountsParams{topology(),
                                     channels,
                                     options.expert_alignment,
                                     options.expand,
                                     handle.recv_counts.ptr<int32_t>(),
                                     handle.recv_offsets.ptr<int32_t>(),
                                     handle.source_expert_counts.ptr<int32_t>(),
                                     handle.tokens_per_expert.ptr<int32_t>(),
                                     handle.expert_offsets.ptr<int32_t>(),
                                     handle.expert_source_offsets.ptr<int32_t>(),
                                     handle.device_counts.ptr<int64_t>(),
                                     options.sync_counts ? host_counts_device_ : nullptr};
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
    const volatile int64_t* host = host_counts_;
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
    const int64_t row_bytes = in.x.size(1) * static_cast<int64_t>(element_size(in.x.dtype));
    const int64_t scales_per_row = in.x_scales.defined() ? in.x_scales.size(1) : 0;
    cuda::ReceiveParams params{topology(),
                               mode == ReceiveMode::kCached ? cuda::kPhaseCachedExit
                                                            : cuda::kPhaseDispatchExit,
                               mode != ReceiveMode::kCountsSynced,
                               mode == ReceiveMode::kCountsInKernel,
                               counts,
                               handle.recv_token_capacity,
                               mode != ReceiveMode::kCached,
                               handle.expand,
                               handle.device_counts.ptr<int64_t>(),
                               handle.recv_offsets.ptr<int32_t>(),
                               handle.expert_source_offsets.ptr<int32_t>(),
                               handle.src_token.ptr<int32_t>(),
                               handle.recv_topk_idx.ptr<int32_t>(),
                               handle.expanded_rows.ptr<int32_t>(),
                               result.x.ptr<char>(),
                               row_bytes,
                               result.x_scales.ptr<float>(),
                               scales_per_row,
                               result.weights.ptr<float>(),
                               result.aux.ptr<float>(),
                               result.topk_idx.ptr<int32_t>(),
                               handle.tokens_per_expert.ptr<int32_t>(),
                               handle.expert_offsets.ptr<int32_t>(),
                               handle.zero_padding,
                               num_blocks_,
                               own_rows_in_place(in.x) ? in.x.ptr<const char>() : nullptr};
    cuda::launch_receive(params, stream);
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
  char* const* peers_ = nullptr;
  uint64_t* epoch_ = nullptr;
  cuda::OperationSync* sync_ = nullptr;
  int32_t* failed_ = nullptr;
  cuda::DeviceStatus* status_ = nullptr;  // host-mapped
  cuda::DeviceStatus* status_device_ = nullptr;
  int64_t* host_counts_ = nullptr;  // host-mapped
  int64_t* host_counts_device_ = nullptr;
  int32_t* rank_counts_ = nullptr;
  int32_t* expert_counts_ = nullptr;
  int32_t* plan_status_ = nullptr;
  int32_t* plan_tile_counts_ = nullptr;
  unsigned long long* plan_first_bad_ = nullptr;
};

}  // namespace

std::unique_ptr<Engine> make_cuda_engine(const EngineContext& context) {
  return std::make_unique<CudaEngine>(context);
}

}  // namespace epx::detail
