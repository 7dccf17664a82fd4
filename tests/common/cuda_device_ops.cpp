#include "common/cuda_device_ops.hpp"

#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "epx/error.hpp"

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
  in.view.topk_idx = TensorView(in.topk.get(), DType::kInt64, {tokens, c.num_topk},
                                buffer.device());
  return in;
}

std::shared_ptr<Allocator> poisoned_cuda_allocator() {
  return std::make_shared<PoisonAllocator>(default_allocator(), [](void* p, size_t bytes,
                                                                   void* stream) {
    check_cuda(cudaMemsetAsync(p, kPoisonByte, bytes, static_cast<cudaStream_t>(stream)),
               "poison");
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
