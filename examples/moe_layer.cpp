// epx-moe-layer: one expert-parallel MoE layer, forward and backward, through epx's public API
// (include/epx), over R ranks, one process each. Every rank:
//
//   route     its tokens x [S, H] to K of E experts (moe_layer.hpp: topk_idx, weights [S, K])
//   dispatch  each (token, k) to the rank holding expert topk_idx[t, k], expanded: rows grouped
//             by local expert, each group padded to a multiple of --alignment
//   experts   h_row = x_row * scale_e + bias_e on the rows of local expert e
//   combine   y[t] = sum_k w[t, k] * h[row of (t, k)], back on t's rank
//   backward  given dL/dy: combine_backward (dL/dh rows, dL/dw rows), the experts' backward,
//             then dispatch's backward, a combine (dL/dx, and dL/dw [S, K] for the router)
//
// and then holds y, dL/dx and dL/dw against the same layer computed densely in this example
// (toy::dense_layer), within a bf16 tolerance. This is not the bit-exact test of epx (that is
// epx-moe-check, against the reference implementation).
//
// Transports: the host transport (POSIX shared memory) runs anywhere; when epx was built with
// CUDA and GPUs are visible, the CUDA transport runs one rank per GPU (--transport picks).
#include "moe_layer.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "epx/buffer.hpp"
#include "epx/error.hpp"
#if defined(EPX_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

using moe_layer::Options;
using moe_layer::UsageError;

#if defined(EPX_WITH_CUDA)
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

// How far epx's bf16 results may lie from the dense computation: bf16 keeps 8 significant bits,
// so each rounding is within 2^-8 relative, and a value here passes up to three roundings
// (dL/dx: dL/dh, the experts' backward, the sum), 1.2e-2 in all.
constexpr double kTolerance = 2e-2;

// GPUs visible, counted in a child process: a process that has initialised CUDA cannot hand it
// on to the processes it forks, and the ranks are forked from this one.
int visible_gpus() {
#if defined(EPX_WITH_CUDA)
  const pid_t pid = fork();
  if (pid < 0) return 0;
  if (pid == 0) {
    int count = 0;
    _exit(cudaGetDeviceCount(&count) == cudaSuccess ? std::min(count, 64) : 0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 0;
#else
  return 0;
#endif
}

// Picks the transport and the rank count, and makes the experts split evenly over the ranks;
// says what it changed and why.
void settle(Options& o) {
  const int gpus = o.transport == "host" ? 0 : visible_gpus();
  if (o.transport == "cuda") {
    if (gpus == 0) {
      throw UsageError(kBuiltWithCuda ? "--transport cuda: no GPU visible"
                                      : "--transport cuda: epx was built without CUDA");
    }
    if (o.ranks > gpus) {
      throw UsageError("--transport cuda runs one rank per GPU: --ranks " +
                       std::to_string(o.ranks) + " needs " + std::to_string(o.ranks) + " GPUs, " +
                       std::to_string(gpus) + " visible");
    }
  }
  o.cuda = gpus > 0 && (o.ranks == 0 || o.ranks <= gpus);
  if (gpus > 0 && !o.cuda) {
    std::printf("note: %d ranks but %d GPU%s visible: the host transport runs them\n", o.ranks,
                gpus, gpus == 1 ? "" : "s");
  }
  if (o.ranks == 0) o.ranks = o.cuda ? gpus : 4;
  if (o.experts % o.ranks != 0) {
    const int32_t experts = (o.experts + o.ranks - 1) / o.ranks * o.ranks;
    std::printf("note: --experts %d -> %d: experts must split evenly over the %d ranks\n",
                o.experts, experts, o.ranks);
    o.experts = experts;
  }
}

// Where a rank's tensors live: host memory on the host transport, the rank's GPU on the CUDA
// transport. epx reads the caller's memory through TensorViews and returns epx::Tensors it
// allocated itself (epx::default_allocator()); this moves the example's vectors in and out.
class RankMemory {
 public:
  explicit RankMemory(epx::Device device) : device_(device) {}

  // A view of a copy of `values` on the device, alive as long as this RankMemory.
  template <typename T>
  epx::TensorView upload(const std::vector<T>& values, epx::DType dtype,
                         std::vector<int64_t> shape) {
    const size_t bytes = values.size() * sizeof(T);
    void* data = allocate(bytes);
    copy(data, values.data(), bytes);
    return epx::TensorView(data, dtype, std::move(shape), device_);
  }

  template <typename T>
  std::vector<T> download(const epx::Tensor& tensor) const {
    std::vector<T> values(size_t(tensor.view.numel()));
    copy(values.data(), tensor.view.data, values.size() * sizeof(T));
    return values;
  }

 private:
#if defined(EPX_WITH_CUDA)
  static void check(cudaError_t status, const char* what) {
    if (status != cudaSuccess) {
      throw std::runtime_error(what + std::string(": ") + cudaGetErrorString(status));
    }
  }
#endif

  void* allocate(size_t bytes) {
#if defined(EPX_WITH_CUDA)
    if (device_.kind == epx::DeviceKind::kCuda) {
      void* data = nullptr;
      check(cudaSetDevice(device_.index), "cudaSetDevice");
      check(cudaMalloc(&data, bytes), "cudaMalloc");
      owned_.emplace_back(data, [](void* p) { cudaFree(p); });
      return data;
    }
#endif
    owned_.emplace_back(::operator new(bytes), [](void* p) { ::operator delete(p); });
    return owned_.back().get();
  }

  void copy(void* dst, const void* src, size_t bytes) const {
    if (bytes == 0) return;  // an empty tensor may have no memory at all
#if defined(EPX_WITH_CUDA)
    // On the legacy default stream, which is the one the example gives epx: the copy waits for
    // epx's work on it.
    if (device_.kind == epx::DeviceKind::kCuda) {
      check(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault), "cudaMemcpy");
      return;
    }
#endif
    std::memcpy(dst, src, bytes);
  }

  epx::Device device_;
  std::vector<std::shared_ptr<void>> owned_;
};

enum class Pass { kForward, kBackward };

// This rank's experts on the expanded rows [M, H]: local expert e (global expert
// rank * E_l + e) owns rows [expert_offsets[e], expert_offsets[e + 1]), of which the first
// tokens_per_expert[e] hold tokens and the rest pad the segment to the alignment. Padding rows
// come out zero. Here on the host; on the CUDA transport the rows make a round trip to the
// host, which only an example can afford: a real layer runs a grouped GEMM on the GPU over
// recv.x, one segment per expert.
std::vector<uint16_t> run_experts(const std::vector<uint16_t>& rows, const epx::Handle& handle,
                                  int64_t hidden, Pass pass) {
  std::vector<uint16_t> out(rows.size(), 0);
  for (int32_t e = 0; e < handle.local_experts(); ++e) {
    const toy::Expert expert = toy::expert(handle.rank * handle.local_experts() + e);
    const int64_t first = handle.host_expert_offsets[e];
    const int64_t end = first + handle.host_tokens_per_expert[e];
    for (int64_t i = first * hidden; i < end * hidden; ++i) {
      const float value = toy::from_bf16(rows[i]);
      out[i] = toy::to_bf16(pass == Pass::kForward ? value * expert.scale + expert.bias
                                                   : value * expert.scale);
    }
  }
  return out;
}

// What a rank process sends back to the parent through a pipe (plain bytes).
struct RankReport {
  int64_t tokens = 0, rows = 0;  // S sent, M expanded rows received (padding included)
  double error_y = 0, error_dx = 0, error_dw = 0;
  char failure[512] = {};  // what went wrong, when something threw
};

RankReport run_rank(epx::Comm comm, const Options& o) {
  // Every rank passes the same configuration; a peer that never arrives raises kTimeout.
  const epx::BufferConfig config{.max_tokens_per_rank = o.tokens,
                                 .hidden = o.hidden,
                                 .num_experts = o.experts,
                                 .num_topk = o.topk,
                                 .timeout_seconds = 30};
  epx::Buffer buffer(std::move(comm), config);
  RankMemory memory(buffer.device());
  // The cudaStream_t epx orders its work on. nullptr, the legacy default stream, keeps
  // RankMemory's cudaMemcpy calls in order with it; the host transport has no streams.
  void* const stream = nullptr;
  using epx::DType;
  const int rank = buffer.rank();
  const toy::Shape shape{o.hidden, o.experts, o.topk};
  // Ranks need not hold as many tokens as each other (any S up to max_tokens_per_rank).
  const int64_t S = std::max<int64_t>(0, o.tokens - rank), H = o.hidden, K = o.topk;

  // Forward. The router is replicated: each rank routes its own tokens.
  const std::vector<uint16_t> x = toy::rows(toy::kTokens, rank, S, H);
  const toy::Routing routing = toy::route(x, S, shape);
  const epx::DispatchInputs inputs{
      .x = memory.upload(x, DType::kBFloat16, {S, H}),
      .topk_idx = memory.upload(routing.topk_idx, DType::kInt32, {S, K}),
      .weights = memory.upload(routing.weights, DType::kFloat32, {S, K})};
  // A named DispatchOptions selects the routing dispatch: a braced {.expand = true} in its place
  // would match the cached dispatch's Handle parameter as well.
  const epx::DispatchOptions options{.expand = true, .expert_alignment = o.alignment};
  const epx::DispatchResult recv = buffer.dispatch(inputs, options, stream);
  const epx::Handle& handle = recv.handle;  // counts synced: M and the segments on the host
  const int64_t M = handle.num_rows;

  const std::vector<uint16_t> h =
      run_experts(memory.download<uint16_t>(recv.x), handle, H, Pass::kForward);
  // recv.weights [M]: each row's router weight, dispatched with it.
  const epx::CombineInputs combine_inputs{.x = memory.upload(h, DType::kBFloat16, {M, H}),
                                          .weights = recv.weights.view};
  const epx::CombineResult y = buffer.combine(combine_inputs, handle, {}, stream);

  // Backward from dL/dy (made up here), by the rules of python/epx/functional.py. A weighted
  // expanded combine's backward is combine_backward: per row, dL/dh = w_row * dL/dy[t] and
  // dL/dw_row = dot(dL/dy[t], h_row), on the rank that holds the row. (An unweighted combine's
  // backward would be a cached dispatch of dL/dy instead: buffer.dispatch({.x = dy}, handle).)
  const std::vector<uint16_t> dy = toy::rows(toy::kOutputGrads, rank, S, H);
  const epx::CombineBackwardResult back =
      buffer.combine_backward(memory.upload(dy, DType::kBFloat16, {S, H}), handle, combine_inputs.x,
                              combine_inputs.weights, stream);
  const std::vector<uint16_t> d_rows =
      run_experts(memory.download<uint16_t>(back.grad_x), handle, H, Pass::kBackward);
  // Dispatch's backward is a combine without weights: dL/dx[t] sums its rows' gradients, and the
  // scalars channel carries each row's dL/dw home as dL/dw[t, k] [S, K] for the router.
  const epx::CombineResult grad = buffer.combine(
      {.x = memory.upload(d_rows, DType::kBFloat16, {M, H}), .scalars = back.grad_weights.view},
      handle, {}, stream);
  // Raises what a device-side check found (nothing else would report it).
  buffer.synchronize(stream);

  const toy::DenseLayer dense = toy::dense_layer(x, routing, dy, S, shape);
  RankReport report;
  report.tokens = S;
  report.rows = M;
  report.error_y = toy::max_error(toy::from_bf16(memory.download<uint16_t>(y.x)), dense.y);
  report.error_dx = toy::max_error(toy::from_bf16(memory.download<uint16_t>(grad.x)), dense.dx);
  report.error_dw = toy::max_error(memory.download<float>(grad.scalars), dense.dw);
  return report;
}

// One process per rank; each sends its RankReport through a pipe. Returns whether all passed.
bool run_ranks(const Options& o) {
  // CUDA ranks meet through an NCCL unique id. It is made here, once, and every child gets a
  // copy with fork; NCCL's bootstrap root then runs in this process, which outlives the ranks.
  // (Making the id does not initialise CUDA, so the children can still use it.)
  const epx::UniqueId id = o.cuda ? epx::Comm::nccl_unique_id() : epx::UniqueId{};
  // Host ranks meet in shared memory named after this process.
  const std::string name = "epx-moe-layer-" + std::to_string(getpid());
  std::fflush(stdout);  // or each child would print what is still buffered again
  std::vector<int> pipes(o.ranks, -1);
  std::vector<pid_t> pids(o.ranks, -1);
  for (int rank = 0; rank < o.ranks; ++rank) {
    int fds[2];
    if (pipe(fds) != 0) throw std::runtime_error("pipe failed");
    pids[rank] = fork();
    if (pids[rank] < 0) throw std::runtime_error("fork failed");
    if (pids[rank] == 0) {
      close(fds[0]);
      RankReport report;
      try {
        // The CUDA transport: rank r on GPU r.
        report = run_rank(o.cuda ? epx::Comm::nccl(rank, o.ranks, id, /*cuda_device=*/rank)
                                 : epx::Comm::host(rank, o.ranks, name),
                          o);
      } catch (const epx::Error& error) {
        std::snprintf(report.failure, sizeof(report.failure), "epx::Error %s: %s",
                      epx::to_string(error.code()), error.what());
      } catch (const std::exception& error) {
        std::snprintf(report.failure, sizeof(report.failure), "%s", error.what());
      }
      const bool sent = write(fds[1], &report, sizeof(report)) == ssize_t(sizeof(report));
      _exit(sent && !report.failure[0] ? 0 : 1);  // _exit: the parent's atexit work is not ours
    }
    close(fds[1]);
    pipes[rank] = fds[0];
  }

  bool all_passed = true;
  std::printf("%-4s %7s %12s %10s %10s %10s  %s\n", "rank", "tokens", "expert rows", "err y",
              "err dx", "err dw", "result");
  for (int rank = 0; rank < o.ranks; ++rank) {
    RankReport report;
    const bool got = read(pipes[rank], &report, sizeof(report)) == ssize_t(sizeof(report));
    close(pipes[rank]);
    int status = 0;
    waitpid(pids[rank], &status, 0);
    if (!got) {
      std::snprintf(report.failure, sizeof(report.failure), "rank died (status %d)", status);
    }
    const bool passed = !report.failure[0] && report.error_y <= kTolerance &&
                        report.error_dx <= kTolerance && report.error_dw <= kTolerance;
    all_passed = all_passed && passed;
    std::printf("%-4d %7lld %12lld %10.2e %10.2e %10.2e  %s %s\n", rank, (long long)report.tokens,
                (long long)report.rows, report.error_y, report.error_dx, report.error_dw,
                passed ? "PASS" : "FAIL", report.failure);
  }
  return all_passed;
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = moe_layer::parse(argc, argv);
    if (options.help) {
      std::fputs(moe_layer::kUsage, stdout);
      return 0;
    }
    settle(options);
  } catch (const UsageError& error) {
    std::fprintf(stderr, "epx-moe-layer: %s\n%s", error.what(), moe_layer::kUsage);
    return 2;
  }
  std::printf(
      "epx-moe-layer: MoE layer forward + backward on %d rank%s (%s transport): up to "
      "%lld tokens per rank, hidden %lld, top-%d of %d experts (%d per rank), "
      "alignment %d\n",
      options.ranks, options.ranks == 1 ? "" : "s", options.cuda ? "cuda" : "host",
      (long long)options.tokens, (long long)options.hidden, options.topk, options.experts,
      options.experts / options.ranks, options.alignment);
  bool passed = false;
  try {
    passed = run_ranks(options);
  } catch (const std::exception& error) {
    std::fprintf(stderr, "epx-moe-layer: %s\n", error.what());
  }
  std::printf(
      "epx-moe-layer: %s (y, dL/dx and the router's dL/dw against a dense computation "
      "of the layer, errors relative to each value's magnitude, at most %.0e: a bf16 "
      "tolerance; epx-moe-check is the bit-exact test)\n",
      passed ? "PASS" : "FAIL", kTolerance);
  return passed ? 0 : 1;
}
