// CUDA helpers for the GPU tests and the demo (compiled only with CUDA): device copies for the
// scenario, a poisoned allocator, the unique id handed from rank 0 to the others through a file,
// and a GPU count taken in a child process (a parent that initialises CUDA cannot fork ranks).
#pragma once

#include <cuda_runtime.h>

#include <barrier>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <memory>
#include <random>
#include <string>

#include "common/scenario.hpp"
#include "epx/buffer.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx::testing {

DeviceOps cuda_device_ops(int device, void* stream);
std::shared_ptr<Allocator> poisoned_cuda_allocator();

// Rank 0 makes an NCCL unique id and writes it to `path`; the other ranks wait for the file
// (bounded by timeout_seconds) and read it.
UniqueId share_unique_id(int rank, const std::string& path, double timeout_seconds = 60);

// CUDA devices visible, counted in a forked child so this process stays CUDA-free.
int count_cuda_devices();

// Raises epx::Error(kTransport) naming `what` when a CUDA call failed.
void check_cuda(cudaError_t status, const char* what);

// A tiny routing dispatch (kTinyTokens tokens) for the error and timeout tests: its inputs on
// `device`, uploaded on `stream`; topk_idx[0][1] = bad_expert when that is non-zero.
constexpr int64_t kTinyTokens = 4;
struct TinyInputs {
  std::shared_ptr<void> x, topk;
  DispatchInputs view;
};
TinyInputs tiny_inputs(const Buffer& buffer, int rank, int64_t bad_expert, int device,
                       void* stream);

// How the rank processes of a GPU test or benchmark are joined: NCCL (one GPU per rank, the
// unique id rank 0 writes to a file) or CUDA IPC (rank r on GPU r % visible GPUs, so any number
// of ranks runs on one GPU; the rendezvous names the shared-memory segments).
enum class GpuTransport { kNccl, kIpc };
const char* to_string(GpuTransport transport);

// What a rank process needs: its device, a stream and its communicator.
struct RankContext {
  int rank;
  int device;
  cudaStream_t stream;
  Comm comm;
  DeviceOps ops() const { return cuda_device_ops(device, stream); }
};
// `rendezvous`: a unique name (unique_name(), multi_process.hpp); NCCL puts its id file in /tmp.
RankContext open_rank(GpuTransport transport, int rank, int num_ranks,
                      const std::string& rendezvous);

// What every GPU test binary starts with: the visible GPU count (counted in a child, so the
// test process stays CUDA-free), the run's base seed (printed, EPX_TEST_SEED replays it), and a
// skip where too few GPUs are visible.
inline int gpu_count() {
  static const int count = count_cuda_devices();
  return count;
}

// An integer from the environment (test sizes such as EPX_GPU_CONFIGS), else `fallback`.
inline int env_int(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value ? std::atoi(value) : fallback;
}

// Dispatches `in` on a buffer where rank `missing` never arrives and prints what was raised and
// when (`tag` names the suite): "" when it is kTimeout naming the entry phase and that rank, in
// bounded time.
inline std::string dispatch_expecting_missing_peer(Buffer& buffer, const DispatchInputs& in,
                                                   void* stream, const char* tag, int rank,
                                                   int missing) {
  const auto start = std::chrono::steady_clock::now();
  try {
    buffer.dispatch(in, DispatchOptions{}, stream);
    return "no error was raised";
  } catch (const Error& error) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const std::string what = error.what();
    std::cout << "[" << tag << "] rank " << rank << " after " << seconds << " s: " << what
              << std::endl;
    if (error.code() != ErrorCode::kTimeout) return "wrong code: " + what;
    if (what.find("phase dispatch/entry") == std::string::npos ||
        what.find("waiting for rank " + std::to_string(missing)) == std::string::npos) {
      return "phase or rank missing: " + what;
    }
    if (seconds > 20) return "took " + std::to_string(seconds) + " s";
    return "";
  }
}

}  // namespace epx::testing

#define EPX_REQUIRE_GPUS(n)                                                                      \
  if (::epx::testing::gpu_count() < (n)) {                                                       \
    GTEST_SKIP() << "needs " << (n) << " GPU(s), " << ::epx::testing::gpu_count() << " visible"; \
  }

// Ranks as threads of one process (ThreadGroup, Comm::cuda_threads) for the GPU tests and
// bench_gpu: R ranks on a single GPU, or spread over the visible ones.
// The calling process stays CUDA-free (a process that has initialised CUDA cannot fork rank
// processes afterwards): the threads run in one forked child.
namespace epx::testing {

// Where the ranks run: all on device 0, or rank r on device r % (visible devices).
enum class Placement { kOneGpu, kSpread };

// A rank thread's context.
struct ThreadRank {
  int rank;
  int num_ranks;
  int device;
  int ranks_on_device;  // ranks sharing this rank's device (their blocks must all fit)
  cudaStream_t stream;
  Comm comm;
  // Set when EPX_TEST_ALIGN_RANKS=1: ops().before_operation waits for every rank. For runs
  // under compute-sanitizer: there, eight ranks that reach an operation at different times
  // (each first checks the previous one against the reference on the host) time out in it
  // every time; lined up they pass (seen on one H200 at cc2470e, in git history); presumably
  // the tool holds a rank's CUDA calls while a peer's kernel spins waiting for that rank.
  std::barrier<>* align = nullptr;
  // Every rank's barrier (the one `align` points to when set): a rank whose fn returned or threw
  // drops out of it, so a rank that failed never holds the others there.
  std::barrier<>* barrier = nullptr;
  DeviceOps ops() const;
};

// Runs fn on `num_ranks` threads of one forked child (a ThreadGroup with `group_timeout`);
// "" when every rank returned "", else one line per failing rank. The child is killed after
// `timeout_seconds`, so a deadlock fails the test instead of hanging it.
std::string run_threads(int num_ranks, Placement placement, double group_timeout,
                        const std::function<std::string(const ThreadRank&)>& fn,
                        double timeout_seconds);

// On a rank thread: runs `bad` on `buffer` and synchronises. "" when it raised `code` with a
// message containing `needle` (not asked of rank `bad_rank`, whose own message may differ),
// else what went wrong; every error is printed after `tag`.
std::string expect_raise(Buffer& buffer, const ThreadRank& r, ErrorCode code, int bad_rank,
                         const std::string& needle,
                         const std::function<void(Buffer&, const ThreadRank&)>& bad,
                         const char* tag);

}  // namespace epx::testing

// The CUDA-graph scenario of the GPU tests, shared by the NCCL ranks (test_gpu) and the thread
// ranks (test_gpu_threads): sync_counts=false expanded dispatch + weighted combine, captured once
// on the rank's stream, then replayed three times with new values written into the captured
// inputs; every replay's combined output must equal the reference.
namespace epx::testing {

// A bump allocator over one cudaMalloc'd arena: outputs allocated during a CUDA-graph capture
// keep fixed addresses that every replay writes again (what a framework's graph memory pool
// provides). reset() reuses the arena from the start.
class ArenaAllocator : public Allocator {
 public:
  explicit ArenaAllocator(size_t bytes) : bytes_(bytes) {
    EPX_CHECK(cudaMalloc(&base_, bytes) == cudaSuccess, kOutOfMemory, "arena");
  }
  ~ArenaAllocator() override { cudaFree(base_); }
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device, void*) override {
    TensorView view(nullptr, dtype, shape, device);
    const size_t bytes = (view.nbytes() + 255) / 256 * 256;
    EPX_CHECK(used_ + bytes <= bytes_, kOutOfMemory, "arena exhausted");
    view.data = static_cast<char*>(base_) + used_;
    used_ += bytes;
    return Tensor{view, nullptr};
  }
  void reset() { used_ = 0; }

 private:
  void* base_ = nullptr;
  size_t bytes_ = 0;
  size_t used_ = 0;
};

// The configuration the graph scenario runs (a random one made capturable).
RandomConfig graph_config(uint64_t seed, int num_ranks);

// Runs the scenario on this rank; `buffer` must allocate its outputs from fixed memory (e.g. an
// ArenaAllocator: a graph replay writes the captured addresses again). "" when it matches.
std::string graph_replay_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                                  void* stream, const DeviceOps& ops);

}  // namespace epx::testing
