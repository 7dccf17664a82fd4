#include "common/cuda_device_ops.hpp"

#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/multi_process.hpp"
#include "common/random_problem.hpp"
#include "epx/error.hpp"
#include "reference/reference.hpp"

namespace epx::testing {
void check_cuda(cudaError_t status, const char* what) {
  EPX_CHECK(status == cudaSuccess, kTransport, what << ": " << cudaGetErrorString(status));
}

const char* to_string(GpuTransport transport) {
  return transport == GpuTransport::kNccl ? "nccl" : "ipc";
}

RankContext open_rank(GpuTransport transport, int rank, int num_ranks,
                      const std::string& rendezvous) {
  int devices = 0;
  check_cuda(cudaGetDeviceCount(&devices), "cudaGetDeviceCount");
  const int device = transport == GpuTransport::kNccl ? rank : rank % devices;
  check_cuda(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t stream;
  check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
  if (transport == GpuTransport::kIpc) {
    return RankContext{rank, device, stream, Comm::ipc(rank, num_ranks, rendezvous, device)};
  }
  const UniqueId id = share_unique_id(rank, "/tmp/" + rendezvous + ".id");
  return RankContext{rank, device, stream, Comm::nccl(rank, num_ranks, id, device)};
}

DeviceOps cuda_device_ops(int device, void* stream) {
  DeviceOps ops;
  ops.stream = stream;
  // Stream-ordered throughout: no call here waits for other streams' work (ranks that share a
  // device spin in kernels that wait for each other; a cudaFree or a legacy-stream copy would
  // wait for them).
  ops.upload = [device, stream](const void* host, size_t bytes) {
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    auto s = static_cast<cudaStream_t>(stream);
    void* memory = nullptr;
    check_cuda(cudaMallocAsync(&memory, bytes > 0 ? bytes : 16, s), "cudaMallocAsync");
    if (bytes) {
      check_cuda(cudaMemcpyAsync(memory, host, bytes, cudaMemcpyHostToDevice, s), "upload");
    }
    check_cuda(cudaStreamSynchronize(s), "upload sync");
    return std::shared_ptr<void>(memory, [s](void* p) { cudaFreeAsync(p, s); });
  };
  ops.download = [stream](void* host, const void* device_memory, size_t bytes) {
    auto s = static_cast<cudaStream_t>(stream);
    check_cuda(cudaMemcpyAsync(host, device_memory, bytes, cudaMemcpyDeviceToHost, s), "download");
    check_cuda(cudaStreamSynchronize(s), "download sync");
  };
  ops.write = [stream](void* device_memory, const void* host, size_t bytes) {
    auto s = static_cast<cudaStream_t>(stream);
    check_cuda(cudaMemcpyAsync(device_memory, host, bytes, cudaMemcpyHostToDevice, s), "write");
    check_cuda(cudaStreamSynchronize(s), "write sync");
  };
  return ops;
}

TinyInputs tiny_inputs(const Buffer& buffer, int rank, int64_t bad_expert, int device,
                       void* stream) {
  const BufferConfig& c = buffer.config();
  const int64_t tokens = kTinyTokens;
  std::vector<uint16_t> x(tokens * c.hidden);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<uint16_t>(0x3f80 + i % 61);
  std::vector<int64_t> topk(tokens * c.num_topk);
  for (size_t i = 0; i < topk.size(); ++i) topk[i] = (i * 7 + rank) % c.num_experts;
  if (bad_expert != 0) topk[1] = bad_expert;
  const DeviceOps ops = cuda_device_ops(device, stream);
  TinyInputs in;
  in.x = ops.upload(x.data(), x.size() * 2);
  in.topk = ops.upload(topk.data(), topk.size() * 8);
  in.view.x = TensorView(in.x.get(), DType::kBFloat16, {tokens, c.hidden}, buffer.device());
  in.view.topk_idx =
      TensorView(in.topk.get(), DType::kInt64, {tokens, c.num_topk}, buffer.device());
  return in;
}

std::shared_ptr<Allocator> poisoned_cuda_allocator() {
  return std::make_shared<PoisonAllocator>(default_allocator(), [](void* p, size_t bytes,
                                                                   void* stream) {
    check_cuda(cudaMemsetAsync(p, kPoisonByte, bytes, static_cast<cudaStream_t>(stream)), "poison");
  });
}

UniqueId share_unique_id(int rank, const std::string& path, double timeout_seconds) {
  UniqueId id;
  if (rank == 0) {
    id = Comm::nccl_unique_id();
    const std::string partial = path + ".partial";
    std::ofstream(partial, std::ios::binary).write(id.bytes.data(), id.bytes.size());
    std::rename(partial.c_str(), path.c_str());  // readers never see half a file
    return id;
  }
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in && in.read(id.bytes.data(), id.bytes.size())) return id;
    EPX_CHECK(std::chrono::steady_clock::now() < deadline, kTimeout,
              "rank " << rank << ": no unique id from rank 0 in " << path << " after "
                      << timeout_seconds << " s");
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

int count_cuda_devices() {
  const pid_t pid = fork();
  if (pid == 0) {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    _exit(count > 100 ? 100 : count);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 0;
}

}  // namespace epx::testing

// The thread-rank runner (cuda_device_ops.hpp).
namespace epx::testing {

DeviceOps ThreadRank::ops() const {
  DeviceOps ops = cuda_device_ops(device, stream);
  if (align) ops.before_operation = [barrier = align] { barrier->arrive_and_wait(); };
  return ops;
}

// Runs fn on `num_ranks` threads of one forked child (a ThreadGroup with `group_timeout`);
// "" when every rank returned "", else one line per failing rank. The child is killed after
// `timeout_seconds`, so a deadlock fails the test instead of hanging it.
std::string run_threads(int num_ranks, Placement placement, double group_timeout,
                        const std::function<std::string(const ThreadRank&)>& fn,
                        double timeout_seconds) {
  const auto outcomes = run_ranks(
      1,
      [&](int) -> std::string {
        // Before CUDA starts in this child: ranks sharing a device need a hardware queue each
        // (Comm::cuda_threads); a value set by the caller is kept.
        setenv("CUDA_DEVICE_MAX_CONNECTIONS", "32", 0);
        int num_devices = 0;
        check_cuda(cudaGetDeviceCount(&num_devices), "cudaGetDeviceCount");
        const int used_devices =
            placement == Placement::kOneGpu ? 1 : std::min(num_devices, num_ranks);
        const ThreadGroup group = ThreadGroup::create(num_ranks, group_timeout);
        const char* align_env = std::getenv("EPX_TEST_ALIGN_RANKS");
        std::barrier<> barrier(num_ranks);
        std::barrier<>* aligned = align_env && std::string(align_env) == "1" ? &barrier : nullptr;
        std::vector<std::string> results(num_ranks);
        std::vector<std::thread> threads;
        for (int rank = 0; rank < num_ranks; ++rank) {
          threads.emplace_back([&, rank] {
            try {
              const int device = rank % used_devices;
              const int sharing = (num_ranks - device + used_devices - 1) / used_devices;
              check_cuda(cudaSetDevice(device), "cudaSetDevice");
              cudaStream_t stream;
              check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "stream");
              results[rank] = fn(ThreadRank{rank, num_ranks, device, sharing, stream,
                                            Comm::cuda_threads(group, rank, device), aligned,
                                            &barrier});
              // The stream is left alive: outputs still owned by the caller free on it.
            } catch (const std::exception& error) {
              results[rank] = std::string("threw: ") + error.what();
            }
            // A rank that stopped early (a failure) no longer holds the others at the barrier.
            barrier.arrive_and_drop();
          });
        }
        for (auto& thread : threads) thread.join();
        std::string failed;
        for (int rank = 0; rank < num_ranks; ++rank) {
          if (!results[rank].empty())
            failed += "rank " + std::to_string(rank) + ": " + results[rank] + "\n";
        }
        return failed;
      },
      timeout_seconds);
  return failures(outcomes);
}

std::string expect_raise(Buffer& buffer, const ThreadRank& r, ErrorCode code, int bad_rank,
                         const std::string& needle,
                         const std::function<void(Buffer&, const ThreadRank&)>& bad,
                         const char* tag) {
  try {
    bad(buffer, r);
    buffer.synchronize(r.stream);
    return "no error was raised";
  } catch (const Error& error) {
    const std::string what = error.what();
    std::cout << tag << " rank " << r.rank << " raised: " << what << std::endl;
    if (error.code() != code) return "wrong code: " + what;
    if (r.rank != bad_rank && what.find(needle) == std::string::npos) {
      return "message lacks '" + needle + "': " + what;
    }
  }
  return "";
}

}  // namespace epx::testing

namespace epx::testing {

RandomConfig graph_config(uint64_t seed, int num_ranks) {
  RandomConfig config = draw_config(seed, num_ranks);
  config.fp8 = false;
  config.expand = true;
  config.sync_counts = false;
  config.with_weights = true;
  config.with_aux = false;
  config.with_scalars = false;
  config.with_bias0 = config.with_bias1 = false;
  config.reduce_at_source = false;
  config.topk_int64 = true;
  return config;
}

std::string graph_replay_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                                  void* stream_ptr, const DeviceOps& ops) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int num_ranks = buffer.num_ranks();
  const reference::Problem problem = config.problem();
  auto inputs = draw_dispatch_inputs(config);
  const int64_t tokens = inputs[rank].num_tokens, hidden = config.hidden, k = config.num_topk;
  auto x = ops.upload(inputs[rank].x.data(), inputs[rank].x.size());
  auto topk = ops.upload(inputs[rank].topk_idx.data(), inputs[rank].topk_idx.size() * 8);
  auto w = ops.upload(inputs[rank].weights.data(), inputs[rank].weights.size() * 4);
  DispatchInputs din;
  din.x = TensorView(x.get(), DType::kBFloat16, {tokens, hidden}, buffer.device());
  din.topk_idx = TensorView(topk.get(), DType::kInt64, {tokens, k}, buffer.device());
  din.weights = TensorView(w.get(), DType::kFloat32, {tokens, k}, buffer.device());
  DispatchOptions options;
  options.expand = true;
  options.expert_alignment = config.expert_alignment;
  options.sync_counts = false;

  // A warm-up outside the capture (collective, like every operation), then the capture, which
  // runs nothing (thread-local mode: other threads may keep issuing work meanwhile).
  (void)buffer.dispatch(din, options, stream);
  buffer.synchronize(stream);
  cudaGraph_t graph;
  check_cuda(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), "begin capture");
  DispatchResult recv = buffer.dispatch(din, options, stream);
  CombineInputs cin;
  cin.x = recv.x.view;  // combine the dispatched rows themselves, weighted
  cin.weights = recv.weights.view;
  CombineResult out = buffer.combine(cin, recv.handle, {}, stream);
  check_cuda(cudaStreamEndCapture(stream, &graph), "end capture");
  cudaGraphExec_t exec;
  check_cuda(cudaGraphInstantiate(&exec, graph, 0), "instantiate");

  std::string bad;
  for (int replay = 0; replay < 3 && bad.empty(); ++replay) {
    // Every rank draws the same new values for every rank (the reference needs them all).
    std::mt19937_64 rng(config.seed + 100 * replay);
    for (auto& in : inputs) {
      for (size_t i = 0; i + 1 < in.x.size(); i += 2) {
        const uint16_t bits = random_bf16(rng);
        std::memcpy(&in.x[i], &bits, 2);
      }
    }
    check_cuda(cudaMemcpyAsync(x.get(), inputs[rank].x.data(), inputs[rank].x.size(),
                               cudaMemcpyHostToDevice, stream),
               "new inputs");
    check_cuda(cudaGraphLaunch(exec, stream), "graph launch");
    buffer.synchronize(stream);
    const auto want = reference::dispatch(problem, inputs, true, config.expert_alignment, false);
    std::vector<reference::CombineRankInputs> cin_ref(num_ranks);
    for (int q = 0; q < num_ranks; ++q) {
      cin_ref[q].x.resize(want[q].x.size() / 2);
      std::memcpy(cin_ref[q].x.data(), want[q].x.data(), want[q].x.size());
      cin_ref[q].weights = want[q].weights;
    }
    const auto want_y = reference::combine(problem, inputs, want, true, cin_ref, false);
    std::vector<uint16_t> y(tokens * hidden);
    ops.download(y.data(), out.x.view.data, y.size() * 2);
    bad = first_mismatch(y.data(), want_y[rank].x.data(), 2, y.size(), "graph replay combine y");
    if (!bad.empty()) bad = "replay " + std::to_string(replay) + ": " + bad;
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return bad;
}

}  // namespace epx::testing
