// bench_gpu: first-look timings of the CUDA transport without Python (the full benchmark with
// the NCCL baseline is bench/bench.py). One process per visible GPU (or, with --thread-ranks,
// R threads sharing GPU 0), uniform random top-k
// routing, bf16 rows; every op is timed with CUDA events.
//
//   batched  N back-to-back calls between two events (sync_counts=false dispatch, cached
//            dispatch, combine, combine_backward: none of them waits on the host), mean per call;
//   per-call median of N calls that each end in a host synchronisation (sync_counts=true);
//   graph    the op captured once in a CUDA graph and replayed N times between two events:
//            device time without the host's launches and allocations;
//   host     host time per call of an op that does not wait on the host (100 calls back to
//            back on the host clock, fewer than the launch queue holds): what the C++ API
//            costs the caller's thread, to set against the Python layer's
//            (bench/python_overhead.py).
//
// GB/s counts the token rows (H * 2 bytes each) that cross NVLink into this rank: for
// dispatch the rows other ranks send it, for combine (and combine_backward, whose grad_y rows
// travel like a dispatch) the rows that come back to its own tokens from other ranks. Rows a
// rank sends itself are local copies and not counted.
//
// Usage: bench_gpu [--tokens S] [--hidden H] [--experts E] [--topk K] [--sms N] [--iters N]
//                  [--thread-ranks R]   (R ranks as threads on GPU 0 instead of one per GPU)
//                  [--low-latency 0|1|2]  (0: without the low-latency rows, low_latency_bench.hpp;
//                                        2: those rows alone, e.g. for 8 thread ranks, whose
//                                        normal-path rows take minutes on one GPU)
//                  [--ll-tokens S]  (the low-latency rows at S tokens only, instead of 1 to 256)
//                  [--ll-normal 0]  (without the normal path's rows beside them)
//                  [--ll-sms N]  (the low-latency kernels on at most N SMs; default every SM,
//                                or the rank's share of them when ranks share the GPU)
//                  [--timeout S]  (the Buffers' bound on each wait, default 60 s: lower it to
//                                 learn sooner which rank and phase a stalled run waits in)
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common/cuda_device_ops.hpp"
#include "common/multi_process.hpp"
#include "epx/buffer.hpp"
#include "epx/error.hpp"
#include "low_latency_bench.hpp"
#include "phase_clock.hpp"

namespace {

using namespace epx;

struct Options {
  int64_t tokens = 4096;
  int64_t hidden = 7168;
  int32_t experts = 256;
  int32_t topk = 8;
  int sms = 24;
  int iters = 20;
  int thread_ranks = 0;   // > 0: that many ranks as threads sharing GPU 0 (no NCCL)
  int low_latency = 1;    // 1: the low-latency rows too (low_latency_bench.hpp); 2: them alone
  int64_t ll_tokens = 0;  // > 0: the low-latency rows at that token count only
  bool ll_normal = true;  // the normal path's rows beside the low-latency ones
  int timeout = 60;       // seconds, BufferConfig::timeout_seconds
  int ll_sms = 0;         // > 0: at most that many SMs for the low-latency rows
  std::function<void()> graphs_ready;  // thread ranks: their barrier (low_latency_bench.hpp)
  unsigned* start_gate = nullptr;      // thread ranks: their samples' gate (low_latency_bench.hpp)
};

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const long long value = std::stoll(argv[i + 1]);
    if (key == "--low-latency" && (value < 0 || value > 2))
      throw std::runtime_error("--low-latency takes 0, 1 or 2");
    if (key == "--tokens")
      o.tokens = value;
    else if (key == "--hidden")
      o.hidden = value;
    else if (key == "--experts")
      o.experts = static_cast<int32_t>(value);
    else if (key == "--topk")
      o.topk = static_cast<int32_t>(value);
    else if (key == "--sms")
      o.sms = static_cast<int>(value);
    else if (key == "--iters")
      o.iters = static_cast<int>(value);
    else if (key == "--thread-ranks")
      o.thread_ranks = static_cast<int>(value);
    else if (key == "--low-latency")
      o.low_latency = static_cast<int>(value);
    else if (key == "--ll-tokens")
      o.ll_tokens = value;
    else if (key == "--ll-normal")
      o.ll_normal = value != 0;
    else if (key == "--ll-sms")
      o.ll_sms = static_cast<int>(value);
    else if (key == "--timeout")
      o.timeout = static_cast<int>(value);
    else
      throw std::runtime_error("unknown option " + key);
  }
  return o;
}

// Top-k distinct experts per token, uniform; a pure function of (rank, options).
std::vector<int64_t> routing_of(int rank, const Options& o) {
  std::mt19937_64 rng(0x5eed0000ull + rank);
  std::vector<int64_t> topk(o.tokens * o.topk);
  std::vector<int32_t> experts(o.experts);
  for (int64_t t = 0; t < o.tokens; ++t) {
    for (int32_t e = 0; e < o.experts; ++e) experts[e] = e;
    for (int32_t k = 0; k < o.topk; ++k) {
      std::uniform_int_distribution<int32_t> pick(k, o.experts - 1);
      std::swap(experts[k], experts[pick(rng)]);
      topk[t * o.topk + k] = experts[k];
    }
  }
  return topk;
}

// Rows source rank `s` sends to rank `r` (a token counts once per destination rank).
int64_t rows_between(int s, int r, int num_ranks, const Options& o) {
  const int32_t local_experts = o.experts / num_ranks;
  const std::vector<int64_t> topk = routing_of(s, o);
  int64_t rows = 0;
  for (int64_t t = 0; t < o.tokens; ++t) {
    bool hit = false;
    for (int32_t k = 0; k < o.topk; ++k) hit |= topk[t * o.topk + k] / local_experts == r;
    rows += hit;
  }
  return rows;
}

struct Timer {
  cudaStream_t stream;
  // Mean per call of `iters` calls between two events.
  double batched_us(int iters, const std::function<void()>& op) const {
    cudaEvent_t start, stop;
    testing::check_cuda(cudaEventCreate(&start), "event");
    testing::check_cuda(cudaEventCreate(&stop), "event");
    testing::check_cuda(cudaEventRecord(start, stream), "record");
    for (int i = 0; i < iters; ++i) op();
    testing::check_cuda(cudaEventRecord(stop, stream), "record");
    testing::check_cuda(cudaEventSynchronize(stop), "sync");
    float ms = 0;
    testing::check_cuda(cudaEventElapsedTime(&ms, start, stop), "elapsed");
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return 1000.0 * ms / iters;
  }
  // Median of `iters` calls, each timed alone (the op may synchronise the host).
  double median_us(int iters, const std::function<void()>& op) const {
    std::vector<double> samples;
    for (int i = 0; i < iters; ++i) samples.push_back(batched_us(1, op));
    std::sort(samples.begin(), samples.end());
    return samples[samples.size() / 2];
  }
};

std::string low_latency_rows(int rank, int num_ranks, const Options& o, const Comm& comm,
                             cudaStream_t stream) {
  return bench::low_latency_report({.rank = rank,
                                    .num_ranks = num_ranks,
                                    .hidden = o.hidden,
                                    .experts = o.experts,
                                    .topk = o.topk,
                                    .iters = o.iters,
                                    .shares_gpu = o.thread_ranks > 0,
                                    .tokens = o.ll_tokens,
                                    .normal_rows = o.ll_normal,
                                    .timeout_seconds = o.timeout,
                                    .sms = o.ll_sms,
                                    .graphs_ready = o.graphs_ready,
                                    .start_gate = o.start_gate},
                                   comm, stream);
}

std::string run_rank(int rank, int num_ranks, const Options& o, const Comm& comm,
                     cudaStream_t stream) {
  if (o.low_latency == 2) {
    std::fputs(low_latency_rows(rank, num_ranks, o, comm, stream).c_str(), stdout);
    std::fflush(stdout);
    return "";
  }
  BufferConfig config;
  config.max_tokens_per_rank = o.tokens;
  config.hidden = o.hidden;
  config.num_experts = o.experts;
  config.num_topk = o.topk;
  config.num_sms = o.sms;
  config.timeout_seconds = o.timeout;
  Buffer buffer(comm, config);
  const Device device = buffer.device();

  // Inputs rotated over copies that together exceed twice the 60 MB L2.
  const int64_t row_bytes = o.hidden * 2;
  const int copies = static_cast<int>(
      std::max<int64_t>(1, 2 * 64'000'000 / std::max<int64_t>(1, o.tokens * row_bytes) + 1));
  std::vector<uint16_t> x_host(o.tokens * o.hidden);
  std::mt19937 rng(rank);
  for (auto& v : x_host) v = static_cast<uint16_t>(0x3c00 + rng() % 0x0800);  // ~[2^-7, 2)
  std::vector<std::shared_ptr<void>> xs;
  const testing::DeviceOps ops = testing::cuda_device_ops(device.index, stream);
  for (int c = 0; c < copies; ++c) xs.push_back(ops.upload(x_host.data(), x_host.size() * 2));
  const std::vector<int64_t> topk_host = routing_of(rank, o);
  auto topk = ops.upload(topk_host.data(), topk_host.size() * 8);
  std::vector<float> w_host(o.tokens * o.topk, 0.125f);
  auto weights = ops.upload(w_host.data(), w_host.size() * 4);

  int which = 0;
  auto inputs = [&](bool with_topk) {
    DispatchInputs in;
    in.x = TensorView(xs[which++ % copies].get(), DType::kBFloat16, {o.tokens, o.hidden}, device);
    if (with_topk) in.topk_idx = TensorView(topk.get(), DType::kInt64, {o.tokens, o.topk}, device);
    in.weights = TensorView(weights.get(), DType::kFloat32, {o.tokens, o.topk}, device);
    return in;
  };
  DispatchOptions compact_async;
  compact_async.sync_counts = false;
  DispatchOptions compact_sync;
  DispatchOptions expanded;
  expanded.expand = true;
  expanded.expert_alignment = 128;

  const Timer timer{stream};
  const int warmup = 3;
  auto measure = [&](bool batched, const std::function<void()>& op) {
    for (int i = 0; i < warmup; ++i) op();
    buffer.synchronize(stream);
    const double us = batched ? timer.batched_us(o.iters, op) : timer.median_us(o.iters, op);
    buffer.synchronize(stream);
    return us;
  };

  // Host microseconds per call of `op` (see "host" above).
  auto host_us = [&](const std::function<void()>& op) {
    for (int i = 0; i < warmup; ++i) op();
    buffer.synchronize(stream);
    const int calls = 100;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < calls; ++i) op();
    const std::chrono::duration<double, std::micro> elapsed =
        std::chrono::steady_clock::now() - start;
    buffer.synchronize(stream);
    return elapsed.count() / calls;
  };

  struct Row {
    const char* name;
    double us;
    bool returns;       // the rows travel back to their source (combine direction)
    bool host = false;  // host time per call, no bytes
  };
  std::vector<Row> rows;
  rows.push_back(
      {"dispatch compact (sync_counts=false)",
       measure(true, [&] { (void)buffer.dispatch(inputs(true), compact_async, stream); }), false});
  rows.push_back(
      {"dispatch compact (sync_counts=true)",
       measure(false, [&] { (void)buffer.dispatch(inputs(true), compact_sync, stream); }), false});
  rows.push_back({"dispatch expanded, align 128 (synced)",
                  measure(false, [&] { (void)buffer.dispatch(inputs(true), expanded, stream); }),
                  false});
  const DispatchResult compact = buffer.dispatch(inputs(true), compact_sync, stream);
  const DispatchResult wide = buffer.dispatch(inputs(true), expanded, stream);
  rows.push_back({"cached dispatch expanded",
                  measure(true, [&] { (void)buffer.dispatch(inputs(false), wide.handle, stream); }),
                  false});
  CombineInputs combine_compact;
  combine_compact.x = compact.x.view;
  rows.push_back(
      {"combine compact",
       measure(true, [&] { (void)buffer.combine(combine_compact, compact.handle, {}, stream); }),
       true});
  CombineInputs combine_wide;
  combine_wide.x = wide.x.view;
  combine_wide.weights = wide.weights.view;
  rows.push_back(
      {"combine expanded, weighted",
       measure(true, [&] { (void)buffer.combine(combine_wide, wide.handle, {}, stream); }), true});
  CombineOptions at_source;
  at_source.reduce_at = ReduceAt::kSource;
  rows.push_back(
      {"combine expanded, weighted, at source",
       measure(true, [&] { (void)buffer.combine(combine_wide, wide.handle, at_source, stream); }),
       true});
  rows.push_back({"host: dispatch compact (sync_counts=false)",
                  host_us([&] { (void)buffer.dispatch(inputs(true), compact_async, stream); }),
                  false, true});
  rows.push_back({"host: combine compact", host_us([&] {
                    (void)buffer.combine(combine_compact, compact.handle, {}, stream);
                  }),
                  true, true});
  auto grad_y = ops.upload(x_host.data(), x_host.size() * 2);
  const TensorView grad_view(grad_y.get(), DType::kBFloat16, {o.tokens, o.hidden}, device);
  rows.push_back({"combine_backward",
                  measure(true,
                          [&] {
                            (void)buffer.combine_backward(grad_view, wide.handle, wide.x.view,
                                                          wide.weights.view, stream);
                          }),
                  false});

  // The same small ops captured once in a CUDA graph (outputs in an arena) and replayed: the
  // time without host overhead (launches, allocations). The input is not rotated here.
  {
    auto arena = std::make_shared<testing::ArenaAllocator>(size_t(1) << 32);
    Buffer graph_buffer(comm, config, arena);
    const DispatchResult routed = graph_buffer.dispatch(inputs(true), compact_async, stream);
    CombineInputs combine_routed;
    combine_routed.x = routed.x.view;
    const DispatchInputs fixed = inputs(true);
    auto replay_us = [&](const std::function<void()>& op) {
      graph_buffer.synchronize(stream);
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      testing::check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal),
                          "begin capture");
      op();
      testing::check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
      testing::check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
      const double us = measure(
          true, [&] { testing::check_cuda(cudaGraphLaunch(exec, stream), "graph launch"); });
      graph_buffer.synchronize(stream);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      return us;
    };
    rows.push_back({"graph: dispatch compact (sync_counts=false)",
                    replay_us([&] { (void)graph_buffer.dispatch(fixed, compact_async, stream); }),
                    false});
    rows.push_back({"graph: combine compact", replay_us([&] {
                      (void)graph_buffer.combine(combine_routed, routed.handle, {}, stream);
                    }),
                    true});
    rows.push_back({"graph: dispatch + combine compact", replay_us([&] {
                      const DispatchResult r = graph_buffer.dispatch(fixed, compact_async, stream);
                      CombineInputs c;
                      c.x = r.x.view;
                      (void)graph_buffer.combine(c, r.handle, {}, stream);
                    }),
                    false});
  }

  // With -DEPX_PHASE_CLOCK=ON: the marks of one unsynced compact dispatch, from its first start.
  std::fputs(bench::phase_clock_report(
                 "phase clock of one dispatch compact (sync_counts=false), us from the first "
                 "kernel start:",
                 rank, 5, [&] { (void)buffer.dispatch(inputs(true), compact_async, stream); },
                 [&] { buffer.synchronize(stream); },
                 {{cuda::kMarkSendStart,
                   cuda::kMarkLlStart,
                   {cuda::kMarkSendStart, cuda::kMarkReceiveStart}}})
                 .c_str(),
             stdout);

  int64_t rows_in = 0, rows_back = 0;
  for (int peer = 0; peer < num_ranks; ++peer) {
    if (peer == rank) continue;
    rows_in += rows_between(peer, rank, num_ranks, o);
    rows_back += rows_between(rank, peer, num_ranks, o);
  }
  std::string report;
  char line[256];
  std::snprintf(line, sizeof(line),
                "rank %d: %lld tokens x hidden %lld, top-%d of %d, %d SMs, %d ranks; remote rows "
                "in: %lld by dispatch (%.1f MB), %lld back by combine (%.1f MB)\n",
                rank, static_cast<long long>(o.tokens), static_cast<long long>(o.hidden), o.topk,
                o.experts, o.sms, num_ranks, static_cast<long long>(rows_in),
                rows_in * row_bytes / 1e6, static_cast<long long>(rows_back),
                rows_back * row_bytes / 1e6);
  report += line;
  for (const Row& row : rows) {
    const double bytes =
        row.host ? 0.0 : static_cast<double>(row.returns ? rows_back : rows_in) * row_bytes;
    std::snprintf(line, sizeof(line), "rank %d:   %-40s %10.1f us %8.1f GB/s\n", rank, row.name,
                  row.us, row.us > 0 ? bytes / (row.us * 1e3) : 0.0);
    report += line;
  }
  if (o.low_latency) report += low_latency_rows(rank, num_ranks, o, comm, stream);
  std::fputs(report.c_str(), stdout);
  std::fflush(stdout);
  // The stream stays: results and inputs still alive here free on it when they go out of scope.
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    const int gpus = epx::testing::count_cuda_devices();
    if (gpus < 1) {
      std::printf("bench_gpu: skipped (no GPU visible)\n");
      return 0;
    }
    const int num_ranks = o.thread_ranks > 0 ? o.thread_ranks : std::min(gpus, 8);
    if (o.experts % num_ranks != 0) {
      std::printf("bench_gpu: %d experts do not split over %d ranks\n", o.experts, num_ranks);
      return 1;
    }
    std::string failed;
    if (o.thread_ranks > 0) {
      // Every rank a thread on GPU 0: the multi-rank protocol's costs on one GPU (peer rows go
      // through this GPU's memory, not NVLink).
      // The LL samples' start gate: rank 0 allocates it (in the ranks' process: CUDA here
      // would not survive run_threads' fork); it lives as long as that process.
      unsigned* gate = nullptr;
      failed = epx::testing::run_threads(
          num_ranks, epx::testing::Placement::kOneGpu, 60,
          [&](const epx::testing::ThreadRank& r) {
            // Ranks sharing the GPU wait for each other inside kernels: all their blocks must
            // be resident at once (at most one 512-thread block per SM), so the SM budget splits.
            cudaDeviceProp properties{};
            epx::testing::check_cuda(cudaGetDeviceProperties(&properties, r.device), "properties");
            Options shared = o;
            shared.graphs_ready = [&r] { r.barrier->arrive_and_wait(); };
            if (r.rank == 0) {
              epx::testing::check_cuda(cudaMalloc(&gate, sizeof(unsigned)), "gate");
              epx::testing::check_cuda(cudaMemset(gate, 0, sizeof(unsigned)), "gate");
            }
            r.barrier->arrive_and_wait();  // the gate is set (and orders its write)
            shared.start_gate = gate;
            shared.sms = std::max(1, std::min(o.sms, properties.multiProcessorCount / num_ranks));
            return run_rank(r.rank, num_ranks, shared, r.comm, r.stream);
          },
          300);
    } else {
      const std::string rendezvous = epx::testing::unique_name("epx-bench");
      const auto outcomes = epx::testing::run_ranks(
          num_ranks,
          [&](int rank) {
            const epx::testing::RankContext ctx = epx::testing::open_rank(
                epx::testing::GpuTransport::kNccl, rank, num_ranks, rendezvous);
            return run_rank(rank, num_ranks, o, ctx.comm, ctx.stream);
          },
          300);
      failed = epx::testing::failures(outcomes);
    }
    if (!failed.empty()) {
      std::printf("bench_gpu: FAILED\n%s", failed.c_str());
      return 1;
    }
    return 0;
  } catch (const std::exception& error) {
    std::printf("bench_gpu: %s\n", error.what());
    return 1;
  }
}
