// bench_gpu's low-latency rows (low_latency_bench.hpp). For each token count S (S_ll = 256):
//
//   graph   each part captured in a graph of its own (dispatch; combine), the two graphs replayed
//           alternately (the calls must alternate), a pair of events around each replay: the
//           median per part; and a graph of dispatch + combine replayed N times between two
//           events: the mean per round. Each sample is queued behind a hold kernel (a spin of
//           ~0.2 ms), so that its launches reach the GPU before it gets to them: the events
//           then time the GPU's work (ranks sharing the GPU start the spin together, through
//           a gate, so that no rank's figure carries its wait for a peer's late start). Without
//           it a GPU left idle by the previous sample's synchronisation starts the first replay
//           only when its launch arrives, and the first part's figure carries the launch
//           latency (the "from idle" row: what a lone replay costs when nothing is queued);
//   eager   the same calls made directly, events around each, from idle: the median per part;
//   normal  the normal path's compact dispatch (sync_counts=false) and combine, graphs as above;
//   copy    a plain SM copy of the bytes a dispatch writes (S * K rows), on the LL kernels' SMs,
//           replayed in a graph: the LL figures are given as multiples of it;
//   clock   with -DEPX_PHASE_CLOCK=ON, the phase marks of one round and of one fp8 round,
//           every rank's on one timeline.
//
// Combines are zero-copy: the expert outputs are taken to be in low_latency_combine_input() and
// the weights are the dispatch's own view (what an expert GEMM writing in place gives).
// Routing: top-K distinct experts per token, uniform; bytes are those of bf16 rows (fp8 rows
// and scales for the fp8 dispatch).
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <iterator>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_device_ops.hpp"
#include "cuda/device/device_primitives.cuh"
#include "epx/buffer.hpp"
#include "epx/error.hpp"
#include "low_latency_bench.hpp"
#include "phase_clock.hpp"

namespace epx::bench {
namespace {

using testing::check_cuda;

constexpr int64_t kTokenCounts[] = {1, 8, 32, 128, 256};
constexpr int64_t kMaxTokens = 256;
constexpr int kCopyThreads = 512;

// The plain copy the LL figures are set against: 16-byte vectors, four loads in flight per
// thread (as the LL send's fan-out has). With one load per thread and iteration, eight ranks'
// copies on 16 SMs each moved 2.9 TB/s, less than the LL kernels' own data phases (3.5-3.8).
constexpr int kCopyLoads = 4;
__global__ void copy_kernel(const int4* src, int4* dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kCopyLoads - 1) * stride < n; i += kCopyLoads * stride) {
    int4 v[kCopyLoads];
#pragma unroll
    for (int j = 0; j < kCopyLoads; ++j) v[j] = src[i + j * stride];
#pragma unroll
    for (int j = 0; j < kCopyLoads; ++j) dst[i + j * stride] = v[j];
  }
  for (; i < n; i += stride) dst[i] = src[i];
}

// Top-K distinct experts per token, uniform; a pure function of (rank, tokens).
std::vector<int64_t> uniform_routing(int rank, int64_t tokens, int32_t experts, int32_t topk) {
  std::mt19937_64 rng(0x11a7e5c7ull + uint64_t(rank) * 7919 + uint64_t(tokens));
  std::vector<int64_t> routing(size_t(tokens * topk));
  std::vector<int32_t> pool(static_cast<size_t>(experts));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t e = 0; e < experts; ++e) pool[size_t(e)] = e;
    for (int32_t k = 0; k < topk; ++k) {
      std::uniform_int_distribution<int32_t> pick(k, experts - 1);
      std::swap(pool[size_t(k)], pool[size_t(pick(rng))]);
      routing[size_t(t * topk + k)] = pool[size_t(k)];
    }
  }
  return routing;
}

class Graph {
 public:
  Graph(cudaStream_t stream, const std::function<void()>& record) : stream_(stream) {
    check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "capture");
    record();
    cudaGraph_t graph;
    check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
    check_cuda(cudaGraphInstantiate(&exec_, graph, 0), "instantiate");
    cudaGraphDestroy(graph);
    check_cuda(cudaGraphUpload(exec_, stream), "upload");
  }
  ~Graph() { cudaGraphExecDestroy(exec_); }
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void launch() const { check_cuda(cudaGraphLaunch(exec_, stream_), "graph launch"); }

 private:
  cudaStream_t stream_;
  cudaGraphExec_t exec_{};
};

// Spins for `ns` nanoseconds: what the stream runs while the host queues a sample behind it.
// With a gate (ranks sharing the GPU), the spin starts once every rank's hold has arrived
// (`target` arrivals in all), so their samples start together: without it each rank's sample
// started when its own host thread's hold ran out, and a rank's part figure carried its wait for
// the last rank to start. A gate not reached in a second opens anyway (a rank that failed): the
// sample's own waits then time out and say which rank.
__global__ void hold_kernel(uint64_t ns, unsigned* gate, unsigned target) {
  if (gate) {
    atomicAdd(gate, 1u);
    const uint64_t arrived = cuda::global_timer_ns();
    while (*static_cast<volatile unsigned*>(gate) < target &&
           cuda::global_timer_ns() - arrived < 1'000'000'000) {
    }
  }
  const uint64_t start = cuda::global_timer_ns();
  while (cuda::global_timer_ns() - start < ns) {
  }
}

class Timer {
 public:
  // `gate`: device memory shared by the `ranks` that share the GPU, zero before the first hold
  // (null: one rank per GPU, no gate).
  Timer(cudaStream_t stream, unsigned* gate, int ranks)
      : stream_(stream), gate_(gate), ranks_(ranks) {
    for (cudaEvent_t& event : events_) check_cuda(cudaEventCreate(&event), "event");
  }
  ~Timer() {
    for (cudaEvent_t event : events_) cudaEventDestroy(event);
  }
  // Medians of the two parts of `first(); second();` repeated `iters` times, events around each;
  // `held`: each repetition queued behind a hold kernel (the GPU's time, not the launch's).
  std::pair<double, double> alternating_us(int iters, const std::function<void()>& first,
                                           const std::function<void()>& second, bool held) {
    std::vector<double> a, b;
    for (int i = 0; i < iters + 3; ++i) {  // three warm-ups
      if (held) hold(kHoldNs);
      check_cuda(cudaEventRecord(events_[0], stream_), "record");
      first();
      check_cuda(cudaEventRecord(events_[1], stream_), "record");
      second();
      check_cuda(cudaEventRecord(events_[2], stream_), "record");
      check_cuda(cudaEventSynchronize(events_[2]), "sync");
      if (i < 3) continue;
      a.push_back(elapsed_us(events_[0], events_[1]));
      b.push_back(elapsed_us(events_[1], events_[2]));
    }
    return {median(a), median(b)};
  }
  // A hold kernel on the stream (through the gate): what a sample is queued behind.
  void hold() { hold(kHoldNs); }
  // Mean of `iters` calls of `op` between two events, after three warm-ups, all queued behind a
  // hold kernel long enough for the host to issue them.
  double mean_us(int iters, const std::function<void()>& op) {
    for (int i = 0; i < 3; ++i) op();
    hold(kHoldNs + uint64_t(iters) * 20'000);
    check_cuda(cudaEventRecord(events_[0], stream_), "record");
    for (int i = 0; i < iters; ++i) op();
    check_cuda(cudaEventRecord(events_[1], stream_), "record");
    check_cuda(cudaEventSynchronize(events_[1]), "sync");
    return elapsed_us(events_[0], events_[1]) / iters;
  }

 private:
  static constexpr uint64_t kHoldNs = 200'000;
  void hold(uint64_t ns) {
    ++holds_;
    hold_kernel<<<1, 1, 0, stream_>>>(ns, gate_, holds_ * unsigned(ranks_));
    check_cuda(cudaGetLastError(), "hold kernel");
  }
  static double elapsed_us(cudaEvent_t from, cudaEvent_t to) {
    float ms = 0;
    check_cuda(cudaEventElapsedTime(&ms, from, to), "elapsed");
    return 1000.0 * ms;
  }
  static double median(std::vector<double> samples) {
    std::sort(samples.begin(), samples.end());
    return samples[samples.size() / 2];
  }
  cudaStream_t stream_;
  unsigned* gate_;
  int ranks_;
  unsigned holds_ = 0;  // every rank holds as often as the others: the gate's count
  cudaEvent_t events_[3]{};
};

}  // namespace

std::string low_latency_report(const LowLatencyBenchOptions& o, const Comm& comm,
                               cudaStream_t stream) {
  if (o.tokens < 0 || o.tokens > kMaxTokens) {  // before the buffers take their GBs
    throw Error(ErrorCode::kInvalidArgument,
                "--ll-tokens takes 1 to " + std::to_string(kMaxTokens));
  }
  // Progress on stderr from rank 0 (the report comes whole at the end; eight ranks sharing a GPU
  // take minutes): each step's end, seconds since the start.
  const auto start = std::chrono::steady_clock::now();
  auto progress = [&](int64_t tokens, const char* step) {
    if (o.rank != 0) return;
    const std::chrono::duration<double> since = std::chrono::steady_clock::now() - start;
    std::fprintf(stderr, "rank 0: ll bench, %lld tokens: %s (%.1f s)\n",
                 static_cast<long long>(tokens), step, since.count());
  };
  int device = 0;
  check_cuda(cudaGetDevice(&device), "device");
  cudaDeviceProp properties{};
  check_cuda(cudaGetDeviceProperties(&properties, device), "properties");
  const int share = o.shares_gpu ? std::max(1, properties.multiProcessorCount / o.num_ranks)
                                 : properties.multiProcessorCount;
  const int sms = o.sms > 0 ? std::min(o.sms, share) : share;
  BufferConfig config{.max_tokens_per_rank = kMaxTokens,
                      .hidden = o.hidden,
                      .num_experts = o.experts,
                      .num_topk = o.topk,
                      .timeout_seconds = double(o.timeout_seconds),
                      .num_sms = sms < properties.multiProcessorCount ? sms : 0,
                      .low_latency_max_tokens = kMaxTokens};
  // Fixed addresses for the graphs' outputs (reset between rounds of eager calls: each round's
  // outputs are dead once the next starts).
  auto arena = std::make_shared<testing::ArenaAllocator>(size_t(1) << 27);
  Buffer buffer(comm, config, arena);
  BufferConfig fp8_config = config;
  fp8_config.fp8_dispatch = true;
  auto fp8_arena = std::make_shared<testing::ArenaAllocator>(size_t(1) << 27);
  Buffer fp8_buffer(comm, fp8_config, fp8_arena);
  const testing::DeviceOps ops = testing::cuda_device_ops(device, stream);
  const Device where = buffer.device();
  const int64_t row_bytes = o.hidden * 2;

  std::mt19937 rng(uint32_t(o.rank));
  std::vector<uint16_t> x_host(size_t(kMaxTokens * o.hidden));
  for (uint16_t& v : x_host) v = static_cast<uint16_t>(0x3c00 + rng() % 0x0800);
  std::vector<uint8_t> fp8_host(size_t(kMaxTokens * o.hidden));
  for (uint8_t& v : fp8_host) v = static_cast<uint8_t>(rng() % 0x7e);
  const std::vector<float> scales_host(size_t(kMaxTokens * o.hidden / 128), 1.0f);
  const std::vector<float> w_host(size_t(kMaxTokens * o.topk), 1.0f / o.topk);
  auto x = ops.upload(x_host.data(), x_host.size() * 2);
  auto x_fp8 = ops.upload(fp8_host.data(), fp8_host.size());
  auto scales = ops.upload(scales_host.data(), scales_host.size() * 4);
  auto weights = ops.upload(w_host.data(), w_host.size() * 4);
  const std::vector<uint8_t> copy_host(size_t(kMaxTokens * o.topk * row_bytes));
  auto copy_src = ops.upload(copy_host.data(), copy_host.size());
  auto copy_dst = ops.upload(copy_host.data(), copy_host.size());
  progress(0, "buffers and inputs ready");

  Timer timer(stream, o.start_gate, o.num_ranks);
  std::string report;
  char line[256];
  std::snprintf(line, sizeof(line),
                "rank %d: low-latency mode, hidden %lld, top-%d of %d, %d ranks, %d SMs (LL "
                "kernels and the copy), normal path on %d; zero-copy combines\n",
                o.rank, static_cast<long long>(o.hidden), o.topk, o.experts, o.num_ranks, sms,
                buffer.num_sms());
  report += line;
  auto row = [&](int64_t tokens, const char* name, double us, double copy_us) {
    std::snprintf(line, sizeof(line), "rank %d:   %4lld tokens  %-34s %8.1f us", o.rank,
                  static_cast<long long>(tokens), name, us);
    report += line;
    if (copy_us > 0) {
      std::snprintf(line, sizeof(line), "  %5.2fx the copy", us / copy_us);
      report += line;
    }
    report += "\n";
  };

  std::vector<int64_t> token_counts(std::begin(kTokenCounts), std::end(kTokenCounts));
  if (o.tokens > 0) token_counts = {o.tokens};
  for (int64_t tokens : token_counts) {
    const std::vector<int64_t> routing = uniform_routing(o.rank, tokens, o.experts, o.topk);
    auto topk = ops.upload(routing.data(), routing.size() * 8);
    DispatchInputs in;
    in.x = TensorView(x.get(), DType::kBFloat16, {tokens, o.hidden}, where);
    in.topk_idx = TensorView(topk.get(), DType::kInt64, {tokens, o.topk}, where);
    in.weights = TensorView(weights.get(), DType::kFloat32, {tokens, o.topk}, where);
    DispatchInputs in_fp8 = in;
    in_fp8.x = TensorView(x_fp8.get(), DType::kFloat8E4M3, {tokens, o.hidden}, where);
    in_fp8.x_scales = TensorView(scales.get(), DType::kFloat32, {tokens, o.hidden / 128}, where);

    // The copy of the bytes a dispatch writes, on the same SMs.
    const int64_t vectors = tokens * o.topk * row_bytes / 16;
    const Graph copy(stream, [&] {
      copy_kernel<<<sms, kCopyThreads, 0, stream>>>(static_cast<const int4*>(copy_src.get()),
                                                    static_cast<int4*>(copy_dst.get()), vectors);
    });
    const double copy_us = timer.mean_us(o.iters, [&] { copy.launch(); });
    progress(tokens, "copy timed");

    // Eager: calls alternate; the arena restarts with each round.
    std::optional<LowLatencyDispatchResult> recv;
    auto dispatch = [&](Buffer& b, const DispatchInputs& i) {
      recv.emplace(b.low_latency_dispatch(i, {}, stream));
    };
    auto combine = [&](Buffer& b) {
      (void)b.low_latency_combine(
          {.x = b.low_latency_combine_input().view, .weights = recv->weights.view}, recv->handle,
          {}, stream);
    };
    const auto [eager_dispatch, eager_combine] = timer.alternating_us(
        o.iters,
        [&] {
          arena->reset();
          dispatch(buffer, in);
        },
        [&] { combine(buffer); }, false);
    buffer.synchronize(stream);
    progress(tokens, "eager calls timed");

    // Graphs: a dispatch and a combine of their own, replayed alternately; a round; fp8. All are
    // captured and uploaded before any is replayed, and ranks sharing the GPU then meet on the
    // host: with the round graph captured after the first replays, one of 8 thread ranks lagged
    // its peers by more than their 3 s timeout at its first round-graph replay
    // (docs/performance.md, "Low-latency mode"; this order is the fix tried for it).
    arena->reset();
    const Graph dispatch_graph(stream, [&] { dispatch(buffer, in); });
    const Graph combine_graph(stream, [&] { combine(buffer); });
    const Graph round_graph(stream, [&] {
      dispatch(buffer, in);
      combine(buffer);
    });
    fp8_arena->reset();
    const Graph fp8_dispatch_graph(stream, [&] { dispatch(fp8_buffer, in_fp8); });
    const Graph fp8_combine_graph(stream, [&] { combine(fp8_buffer); });
    check_cuda(cudaStreamSynchronize(stream), "graph uploads");
    if (o.graphs_ready) o.graphs_ready();
    progress(tokens, "graphs captured");
    const auto [graph_dispatch, graph_combine] = timer.alternating_us(
        o.iters, [&] { dispatch_graph.launch(); }, [&] { combine_graph.launch(); }, true);
    // The device's errors (a wait that timed out) raise here, not after every stage's samples.
    buffer.synchronize(stream);
    progress(tokens, "held replays timed");
    const double idle_dispatch =
        timer
            .alternating_us(
                o.iters, [&] { dispatch_graph.launch(); }, [&] { combine_graph.launch(); }, false)
            .first;
    buffer.synchronize(stream);
    progress(tokens, "replays from idle timed");
    const double graph_round = timer.mean_us(o.iters, [&] { round_graph.launch(); });
    buffer.synchronize(stream);
    progress(tokens, "graphs timed");
    // With -DEPX_PHASE_CLOCK=ON: the marks of one replay of `launch` ("" without the clock),
    // each kernel timed from the earliest start of any rank's (their replays held to start
    // together, as the samples are).
    auto round_clock = [&](const std::string& round, const std::function<void()>& launch,
                           std::initializer_list<PhaseSpan> spans) {
      return phase_clock_report(
          "phase clock of one " + round + ", " + std::to_string(tokens) +
              " tokens (us from the kernel's first start on any rank):",
          o.rank, 3,
          [&] {
            timer.hold();
            launch();
          },
          [&] { check_cuda(cudaStreamSynchronize(stream), "sync"); }, spans,
          {.first = o.rank * sms, .count = sms, .barrier = o.graphs_ready});
    };
    const std::string clock =
        round_clock("LL round", [&] { round_graph.launch(); },
                    {{cuda::kMarkLlStart, cuda::kMarkLlCombineStart, {cuda::kMarkLlStart}},
                     {cuda::kMarkLlCombineStart, cuda::kMarkCount, {cuda::kMarkLlCombineStart}}});

    const auto fp8_times = timer.alternating_us(
        o.iters, [&] { fp8_dispatch_graph.launch(); }, [&] { fp8_combine_graph.launch(); }, true);
    fp8_buffer.synchronize(stream);
    progress(tokens, "fp8 timed");
    // The dispatch's marks for fp8 (and the combine after it, which the dispatch's half of the
    // round needs), the two graphs replayed one after the other.
    const std::string fp8_clock = round_clock(
        "LL fp8 round",
        [&] {
          fp8_dispatch_graph.launch();
          fp8_combine_graph.launch();
        },
        {{cuda::kMarkLlStart, cuda::kMarkLlCombineStart, {cuda::kMarkLlStart}}});

    // The normal path, compact, without a host synchronisation (unless left out: on one GPU
    // shared by eight thread ranks it takes minutes).
    std::pair<double, double> normal_times{0, 0};
    if (o.normal_rows) {
      DispatchOptions unsynced;
      unsynced.sync_counts = false;
      std::optional<DispatchResult> routed;
      const Graph normal_dispatch(stream,
                                  [&] { routed.emplace(buffer.dispatch(in, unsynced, stream)); });
      const Graph normal_combine(stream, [&] {
        CombineInputs back;
        back.x = routed->x.view;
        (void)buffer.combine(back, routed->handle, {}, stream);
      });
      normal_times = timer.alternating_us(
          o.iters, [&] { normal_dispatch.launch(); }, [&] { normal_combine.launch(); }, true);
      buffer.synchronize(stream);
    }

    report += clock + fp8_clock;
    row(tokens, "ll dispatch (graph)", graph_dispatch, copy_us);
    row(tokens, "ll combine (graph)", graph_combine, copy_us);
    row(tokens, "ll dispatch + combine (one graph)", graph_round, copy_us);
    row(tokens, "ll dispatch fp8 (graph)", fp8_times.first, copy_us);
    row(tokens, "ll dispatch (graph, from idle)", idle_dispatch, copy_us);
    row(tokens, "ll dispatch (eager)", eager_dispatch, copy_us);
    row(tokens, "ll combine (eager)", eager_combine, copy_us);
    if (o.normal_rows) {
      row(tokens, "normal dispatch compact (graph)", normal_times.first, copy_us);
      row(tokens, "normal combine compact (graph)", normal_times.second, copy_us);
    }
    row(tokens, "copy of the dispatch's bytes (graph)", copy_us, 0);
  }
  return report;
}

}  // namespace epx::bench
