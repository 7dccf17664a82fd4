// The thread-rank runner (thread_ranks.hpp).
#include "common/thread_ranks.hpp"

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include "common/multi_process.hpp"

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
        std::barrier<> align(num_ranks);
        std::barrier<>* aligned = align_env && std::string(align_env) == "1" ? &align : nullptr;
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
                                            Comm::cuda_threads(group, rank, device), aligned});
              // The stream is left alive: outputs still owned by the caller free on it.
            } catch (const std::exception& error) {
              results[rank] = std::string("threw: ") + error.what();
            }
            // A rank that stopped early (a failure) no longer holds the others at the barrier.
            if (aligned) aligned->arrive_and_drop();
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

}  // namespace epx::testing
