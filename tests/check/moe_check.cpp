// epx-moe-check: one expert-parallel MoE layer, forward and backward, over R ranks (one process
// per rank), every output checked against the reference (src/reference) bit for bit. It links
// the test harness and the oracle: the example that uses the public API alone is
// examples/moe_layer.cpp.
//
//   forward:  recv = dispatch(x, topk, w, expand)   -> expert h_row = bf16(x_row * scale_e)
//             y = combine(h, handle, weights=recv_w)
//   backward: (dh, dw_rows) = combine_backward(dy, handle, x=h, weights=recv_w)
//             dx_rows = bf16(dh_row * scale_e)       (the expert's backward)
//             (dx, dw) = combine(dx_rows, handle, scalars=dw_rows)   (dispatch's backward)
//
// With --transport auto (the default) it runs on the GPUs when epx was built with CUDA and GPUs
// are visible (one rank per GPU unless --ranks says otherwise, which then needs that many GPUs),
// else on the host transport with --ranks ranks (default 4).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/random_problem.hpp"
#include "common/scenario.hpp"
#include "epx/buffer.hpp"
#include "epx/error.hpp"
#include "moe_layer.hpp"
#include "plan/numerics.hpp"
#include "reference/reference.hpp"
#if defined(EPX_WITH_CUDA)
#include <cuda_runtime.h>

#include "common/cuda_device_ops.hpp"
#endif

namespace {

using namespace epx;
using testing::RandomConfig;
using Clock = std::chrono::steady_clock;

constexpr const char* kUsage =
    "usage: epx-moe-check [--ranks R] [--tokens S] [--hidden H] [--experts E] [--topk K]\n"
    "                     [--transport auto|host|cuda] [--seed N] [--help]\n"
    "  --ranks R        processes, one rank each (default: one per GPU, or 4 on the host)\n"
    "  --tokens S       tokens per rank at most; ranks draw their own counts (default 96)\n"
    "  --hidden H       hidden size (default 256)\n"
    "  --experts E      experts, rounded up to a multiple of R (default 16)\n"
    "  --topk K         experts per token (default 4)\n"
    "  --transport T    auto (GPUs when built with CUDA and visible), host or cuda\n"
    "  --seed N         the random problem's seed (default 2026)\n";

struct Options {
  int ranks = 0;  // 0: one per GPU, or 4 on the host transport
  int64_t tokens = 96;
  int64_t hidden = 256;
  int32_t experts = 16;
  int32_t topk = 4;
  std::string transport = "auto";
  uint64_t seed = 2026;
  bool help = false;
};

// The example's strict command line (a mistake is a UsageError: the usage, exit code 2).
using moe_layer::for_each_option;
using moe_layer::parse_number;
using moe_layer::parse_transport;
using moe_layer::UsageError;

Options parse(int argc, char** argv) {
  Options o;
  for_each_option(argc, argv, o.help, [&](const std::string& option, auto value) {
    if (option == "--ranks") {
      o.ranks = parse_number(option, value(), 1, 64);
    } else if (option == "--tokens") {
      o.tokens = parse_number<int64_t>(option, value(), 1, 1 << 20);
    } else if (option == "--hidden") {
      o.hidden = parse_number<int64_t>(option, value(), 1, 1 << 16);
    } else if (option == "--experts") {
      o.experts = parse_number(option, value(), 1, 1 << 16);
    } else if (option == "--topk") {
      o.topk = parse_number(option, value(), 1, 64);
    } else if (option == "--seed") {
      o.seed = parse_number(option, value(), uint64_t(0), ~uint64_t(0));
    } else if (option == "--transport") {
      o.transport = parse_transport(value());
    } else {
      return false;
    }
    return true;
  });
  return o;
}

// The layer's expert: a per-expert scale, so its forward and backward are exact and cheap.
float expert_scale(int32_t global_expert) {
  return 0.5f + 0.125f * float(global_expert % 11);
}

uint16_t scale_bits(uint16_t x, float scale) {
  return plan::float_to_bf16_bits(plan::bf16_bits_to_float(x) * scale);
}

// Applies the expert (forward or backward: both scale by the same factor) to expanded rows.
std::vector<uint16_t> run_experts(const std::vector<uint16_t>& rows, int64_t hidden,
                                  const std::vector<int32_t>& expert_offsets, int32_t rank,
                                  int32_t local_experts) {
  std::vector<uint16_t> out(rows.size(), 0);
  for (int32_t e = 0; e + 1 < int32_t(expert_offsets.size()); ++e) {
    const float scale = expert_scale(rank * local_experts + e);
    for (int64_t row = expert_offsets[e]; row < expert_offsets[e + 1]; ++row) {
      for (int64_t h = 0; h < hidden; ++h) {
        out[row * hidden + h] = scale_bits(rows[row * hidden + h], scale);
      }
    }
  }
  return out;
}

std::vector<uint16_t> as_bf16(const std::vector<uint8_t>& bytes) {
  std::vector<uint16_t> out(bytes.size() / 2);
  std::memcpy(out.data(), bytes.data(), out.size() * 2);
  return out;
}

template <typename T>
std::string compare(const std::vector<T>& got, const std::vector<T>& want, const char* what) {
  if (got.size() != want.size()) return std::string(what) + ": size differs";
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0) {
      return std::string(what) + ": element " + std::to_string(i) + " differs";
    }
  }
  return "";
}

struct RankReport {
  int64_t tokens = 0, recv_rows = 0;
  double ms[5] = {0, 0, 0, 0, 0};  // dispatch, combine, combine_backward, dispatch-backward, total
  char failure[512] = {0};
};

RankReport run_rank(Buffer& buffer, const RandomConfig& config, int rank,
                    const testing::DeviceOps& ops) {
  RankReport report;
  const reference::Problem problem = config.problem();
  const int64_t hidden = problem.hidden, k = problem.num_topk;
  const int32_t local_experts = problem.local_experts();
  const Device device = buffer.device();
  auto fail = [&](const std::string& message) {
    std::snprintf(report.failure, sizeof(report.failure), "%s", message.c_str());
    return report;
  };
  auto up = [&](const void* data, size_t bytes) { return ops.upload(data, bytes); };
  auto down = [&](void* host, const Tensor& t, size_t bytes) {
    if (bytes) ops.download(host, t.view.data, bytes);
  };

  // Inputs of every rank (the reference needs them all); this rank uploads its own.
  const auto inputs = testing::draw_dispatch_inputs(config);
  const auto& mine = inputs[rank];
  const int64_t tokens = mine.num_tokens;
  report.tokens = tokens;
  std::vector<int32_t> topk32(mine.topk_idx.begin(), mine.topk_idx.end());
  auto x = up(mine.x.data(), mine.x.size());
  auto topk = up(topk32.data(), topk32.size() * 4);
  auto w = up(mine.weights.data(), mine.weights.size() * 4);
  DispatchInputs din;
  din.x = TensorView(x.get(), DType::kBFloat16, {tokens, hidden}, device);
  din.topk_idx = TensorView(topk.get(), DType::kInt32, {tokens, k}, device);
  din.weights = TensorView(w.get(), DType::kFloat32, {tokens, k}, device);
  DispatchOptions options;
  options.expand = true;
  options.expert_alignment = config.expert_alignment;

  const auto start = Clock::now();
  auto lap = [last = start]() mutable {
    const auto now = Clock::now();
    const double ms = std::chrono::duration<double, std::milli>(now - last).count();
    last = now;
    return ms;
  };

  // Forward.
  DispatchResult recv = buffer.dispatch(din, options, ops.stream);
  report.ms[0] = lap();
  const int64_t rows = recv.handle.num_rows;
  report.recv_rows = rows;
  std::vector<uint16_t> recv_x(rows * hidden);
  std::vector<float> recv_w(rows);
  std::vector<int32_t> offsets(local_experts + 1);
  down(recv_x.data(), recv.x, recv_x.size() * 2);
  down(recv_w.data(), recv.weights, recv_w.size() * 4);
  for (int32_t e = 0; e <= local_experts; ++e)
    offsets[e] = int32_t(recv.handle.host_expert_offsets[e]);
  const std::vector<uint16_t> h = run_experts(recv_x, hidden, offsets, rank, local_experts);
  auto h_dev = up(h.data(), h.size() * 2);
  CombineInputs cin;
  cin.x = TensorView(h_dev.get(), DType::kBFloat16, {rows, hidden}, device);
  cin.weights = recv.weights.view;
  CombineResult y = buffer.combine(cin, recv.handle, {}, ops.stream);
  buffer.synchronize(ops.stream);
  report.ms[1] = lap();

  // Backward.
  const auto grad_y = testing::draw_grad_y(config, inputs);
  auto dy = up(grad_y[rank].data(), grad_y[rank].size() * 2);
  const TensorView dy_view(dy.get(), DType::kBFloat16, {tokens, hidden}, device);
  CombineBackwardResult back =
      buffer.combine_backward(dy_view, recv.handle, cin.x, recv.weights.view, ops.stream);
  buffer.synchronize(ops.stream);
  report.ms[2] = lap();
  std::vector<uint16_t> dh(rows * hidden);
  std::vector<float> dw_rows(rows);
  down(dh.data(), back.grad_x, dh.size() * 2);
  down(dw_rows.data(), back.grad_weights, dw_rows.size() * 4);
  const std::vector<uint16_t> dx_rows = run_experts(dh, hidden, offsets, rank, local_experts);
  auto dx_rows_dev = up(dx_rows.data(), dx_rows.size() * 2);
  CombineInputs bin;
  bin.x = TensorView(dx_rows_dev.get(), DType::kBFloat16, {rows, hidden}, device);
  bin.scalars = back.grad_weights.view;
  CombineResult dx = buffer.combine(bin, recv.handle, {}, ops.stream);
  buffer.synchronize(ops.stream);
  report.ms[3] = lap();
  report.ms[4] = std::chrono::duration<double, std::milli>(Clock::now() - start).count();

  // The same layer through the reference, for every rank, then this rank's outputs compared.
  const auto ref = reference::dispatch(problem, inputs, true, config.expert_alignment, false);
  std::vector<reference::CombineRankInputs> ref_h(config.num_ranks);
  std::vector<std::vector<uint16_t>> ref_h_rows(config.num_ranks);
  std::vector<std::vector<float>> ref_w(config.num_ranks);
  for (int32_t r = 0; r < config.num_ranks; ++r) {
    ref_h_rows[r] = run_experts(as_bf16(ref[r].x), hidden, ref[r].expert_offsets, r, local_experts);
    ref_h[r].x = ref_h_rows[r];
    ref_h[r].weights = ref_w[r] = ref[r].weights;
  }
  const auto ref_y = reference::combine(problem, inputs, ref, true, ref_h, false);
  const auto ref_back =
      reference::combine_backward(problem, inputs, ref, grad_y, ref_h_rows, ref_w);
  // The dispatch backward's scalars are the transport's own grad_weights (checked against the
  // fp64 reference with DESIGN's tolerance); the rows are bit-exact.
  std::vector<reference::CombineRankInputs> ref_dx_in(config.num_ranks);
  for (int32_t r = 0; r < config.num_ranks; ++r) {
    ref_dx_in[r].x =
        run_experts(ref_back[r].grad_x, hidden, ref[r].expert_offsets, r, local_experts);
  }
  const auto ref_dx = reference::combine(problem, inputs, ref, true, ref_dx_in, false);

  std::string bad = compare(recv_x, as_bf16(ref[rank].x), "dispatch x");
  std::vector<uint16_t> got(tokens * hidden);
  if (bad.empty()) {
    down(got.data(), y.x, got.size() * 2);
    bad = compare(got, ref_y[rank].x, "combine y");
  }
  if (bad.empty()) bad = compare(dh, ref_back[rank].grad_x, "combine_backward grad_x");
  for (int64_t row = 0; bad.empty() && row < rows; ++row) {
    if (!reference::grad_weight_ok(dw_rows[row], ref_back[rank].grad_weights[row],
                                   ref_back[rank].magnitude[row])) {
      bad = "combine_backward grad_weights row " + std::to_string(row);
    }
  }
  if (bad.empty()) {
    down(got.data(), dx.x, got.size() * 2);
    bad = compare(got, ref_dx[rank].x, "dispatch backward dx");
  }
  if (bad.empty()) {
    // Router-weight gradient: picked from each owner's grad_weights row.
    std::vector<float> dw(tokens * k);
    down(dw.data(), dx.scalars, dw.size() * 4);
    for (int64_t i = 0; bad.empty() && i < tokens * k; ++i) {
      if (mine.topk_idx[i] < 0 && dw[i] != 0.0f) bad = "router gradient of a masked expert";
    }
  }
  if (!bad.empty()) return fail(bad);
  return report;
}

int visible_gpus() {
#if defined(EPX_WITH_CUDA)
  return testing::count_cuda_devices();  // counted in a child: this process forks the ranks
#else
  return 0;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  Options options;
  try {
    options = parse(argc, argv);
  } catch (const UsageError& error) {
    std::fprintf(stderr, "epx-moe-check: %s\n%s", error.what(), kUsage);
    return 2;
  }
  if (options.help) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  const int gpus = options.transport == "host" ? 0 : visible_gpus();
  const bool use_cuda =
      options.transport == "cuda" ||
      (options.transport == "auto" && gpus > 0 && (options.ranks == 0 || options.ranks <= gpus));
  if (options.ranks == 0) options.ranks = use_cuda ? std::max(gpus, 1) : 4;
  // Experts must split evenly over the ranks (any GPU count works with the defaults).
  const int32_t experts = (options.experts + options.ranks - 1) / options.ranks * options.ranks;
  if (experts != options.experts) {
    std::printf("epx-moe-check: --experts %d -> %d (experts split evenly over the %d ranks)\n",
                options.experts, experts, options.ranks);
    options.experts = experts;
  }
  RandomConfig config = testing::draw_config(options.seed, options.ranks);
  config.max_tokens = options.tokens;
  config.hidden = options.hidden;
  config.num_experts = options.experts;
  config.num_topk = options.topk;
  config.fp8 = false;
  config.with_weights = true;
  config.expand = true;
  config.expert_alignment = 4;
  config.sync_counts = true;

  std::printf(
      "epx-moe-check: MoE layer forward + backward, %d ranks (%s transport), up to %lld "
      "tokens/rank, hidden %lld, top-%d of %d experts\n",
      options.ranks, use_cuda ? "cuda" : "host", (long long)options.tokens,
      (long long)options.hidden, options.topk, options.experts);
  std::fflush(stdout);

  const std::string name = "moe-check-" + std::to_string(getpid());
  const std::string id_file = "/tmp/epx-moe-check-" + std::to_string(getpid()) + ".id";
  std::vector<int> pipes(options.ranks);
  std::vector<pid_t> pids(options.ranks);
  for (int rank = 0; rank < options.ranks; ++rank) {
    int fds[2];
    if (pipe(fds) != 0) return 1;
    const pid_t pid = fork();
    if (pid == 0) {
      close(fds[0]);
      RankReport report;
      try {
        BufferConfig bc;
        bc.max_tokens_per_rank = config.max_tokens;
        bc.hidden = config.hidden;
        bc.num_experts = config.num_experts;
        bc.num_topk = config.num_topk;
        bc.timeout_seconds = 60;
        if (use_cuda) {
#if defined(EPX_WITH_CUDA)
          cudaSetDevice(rank);
          const UniqueId id = testing::share_unique_id(rank, id_file);
          cudaStream_t stream;
          cudaStreamCreate(&stream);
          Buffer buffer(Comm::nccl(rank, options.ranks, id, rank), bc);
          report = run_rank(buffer, config, rank, testing::cuda_device_ops(rank, stream));
#endif
        } else {
          Buffer buffer(Comm::host(rank, options.ranks, name), bc);
          report = run_rank(buffer, config, rank, testing::host_device_ops());
        }
      } catch (const std::exception& error) {
        std::snprintf(report.failure, sizeof(report.failure), "%s", error.what());
      }
      (void)!write(fds[1], &report, sizeof(report));
      _exit(report.failure[0] ? 1 : 0);
    }
    close(fds[1]);
    pipes[rank] = fds[0];
    pids[rank] = pid;
  }
  bool ok = true;
  std::printf("%-5s %7s %9s %12s %12s %12s %14s %10s  %s\n", "rank", "tokens", "exp.rows",
              "dispatch ms", "combine ms", "comb.bwd ms", "disp.bwd ms", "total ms", "result");
  for (int rank = 0; rank < options.ranks; ++rank) {
    RankReport report;
    const bool got = read(pipes[rank], &report, sizeof(report)) == ssize_t(sizeof(report));
    int status = 0;
    waitpid(pids[rank], &status, 0);
    const bool pass = got && WIFEXITED(status) && WEXITSTATUS(status) == 0 && !report.failure[0];
    ok = ok && pass;
    std::printf("%-5d %7lld %9lld %12.3f %12.3f %12.3f %14.3f %10.3f  %s %s\n", rank,
                (long long)report.tokens, (long long)report.recv_rows, report.ms[0], report.ms[1],
                report.ms[2], report.ms[3], report.ms[4], pass ? "PASS" : "FAIL",
                got ? report.failure : "(rank died)");
  }
  std::remove(id_file.c_str());
  std::printf(
      "epx-moe-check: %s (every output compared with the reference bit for bit; router "
      "gradients within 1e-5 relative)\n",
      ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
