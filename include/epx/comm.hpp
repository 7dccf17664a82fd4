// The communicator a Buffer runs over: which ranks take part and which transport joins them.
// Every CUDA transport runs the same kernels; they differ in how a rank reaches its peers'
// workspaces.
//   - host: one process per rank, POSIX shared memory (works everywhere, no GPU needed);
//   - nccl: an NCCL (>= 2.28) communicator whose symmetric windows give NVLink load/store
//     access to peers, one rank per GPU;
//   - ipc: one process per rank on one host, workspaces shared through CUDA IPC; no NCCL at all,
//     any number of ranks on any number of GPUs, several ranks may share one GPU;
//   - cuda threads: ranks that are threads of one process, each on a CUDA device of its choice
//     (peer access between devices; several ranks may share one device).
#pragma once

#include <array>
#include <memory>
#include <string>

struct ncclComm;  // from nccl.h; the public headers do not include NCCL

namespace epx {

enum class Transport { kHost, kNccl, kIpc, kCudaThreads };
const char* to_string(Transport transport);
inline bool is_cuda(Transport transport) {
  return transport != Transport::kHost;
}

// An NCCL unique id, made by one rank and distributed by the caller (a file, a pipe, a
// torch.distributed broadcast).
struct UniqueId {
  std::array<char, 128> bytes{};
};

namespace detail {
struct CommState;         // transport-specific state, defined in src/
struct ThreadGroupState;  // the rendezvous of a ThreadGroup, defined in src/
}  // namespace detail

// The ranks of a CUDA group whose ranks are threads of this process (Comm::cuda_threads).
// Made once with the number of ranks and handed to every rank thread; copies share one state.
// Buffers on such ranks are created and destroyed collectively (every rank, in the same order):
// setup and teardown wait for every rank at most `timeout_seconds`, then raise kTimeout naming
// the ranks that did not arrive. After such a timeout the group is unusable (later buffer
// setups and teardowns raise at once); make a new one.
class ThreadGroup {
 public:
  static ThreadGroup create(int num_ranks, double timeout_seconds = 100.0);
  int num_ranks() const;
  double timeout_seconds() const;
  const std::shared_ptr<detail::ThreadGroupState>& state() const { return state_; }

 private:
  explicit ThreadGroup(std::shared_ptr<detail::ThreadGroupState> state)
      : state_(std::move(state)) {}
  std::shared_ptr<detail::ThreadGroupState> state_;
};

class Comm {
 public:
  // Host transport. Every rank passes the same `name` (it names the shared-memory segments;
  // letters, digits, '-', '_' only) and `timeout_seconds` bounds every wait for a peer.
  static Comm host(int rank, int num_ranks, const std::string& name);

  // CUDA transport over NCCL (available when epx was built with CUDA; otherwise these throw).
  // The communicator is created non-blocking and waited for at most `timeout_seconds`: a rank
  // that never joins makes the others raise kTimeout instead of hanging.
  static UniqueId nccl_unique_id();
  static Comm nccl(int rank, int num_ranks, const UniqueId& id, int cuda_device,
                   double timeout_seconds = 100.0);
  // Wraps a communicator the caller owns (it must outlive every Buffer built on it).
  static Comm nccl(ncclComm* comm, int cuda_device);
  // CUDA transport for rank `rank` of a ThreadGroup, running on `cuda_device` (set current
  // for the calling thread). Each rank's workspace is a cudaMalloc on its device; ranks on
  // different devices reach each other through peer access (the buffer raises where two
  // devices cannot), ranks may also share a device. Rules for the rank threads, since ranks'
  // kernels wait for each other on the device:
  //   - issue work on a stream made with cudaStreamNonBlocking: the legacy default stream (and
  //     cudaMemset, cudaMemcpy without Async) waits for every blocking stream's kernels;
  //   - between operations, never wait for the whole device (cudaDeviceSynchronize, cudaFree,
  //     cudaHostAlloc): that waits for a peer's kernels, which may wait for this rank's next
  //     operation. Use stream-ordered calls (cudaMallocAsync, cudaFreeAsync, cudaMemcpyAsync)
  //     and cudaStreamSynchronize;
  //   - ranks sharing a device must fit on it at once: BufferConfig::num_sms blocks each;
  //   - ranks sharing a device need a hardware queue each: set CUDA_DEVICE_MAX_CONNECTIONS=32
  //     before the process first uses CUDA (the default, 8, lets CUDA put two ranks' streams
  //     on one queue, where a kernel waits behind a peer's kernel that waits for it; the
  //     buffer raises when fewer queues than sharing ranks + 1 are configured);
  //   - any kernel of your own launched between operations should be loaded beforehand
  //     (cudaFuncGetAttributes): under CUDA's lazy loading a first launch waits for the whole
  //     device. epx loads its own kernels when a Buffer is built.
  // The device's default memory pool is set to keep its memory (release threshold: max), as
  // giving memory back at a synchronisation may wait for the whole device.
  static Comm cuda_threads(const ThreadGroup& group, int rank, int cuda_device);
  // CUDA transport over CUDA IPC for rank `rank` of `num_ranks` processes of one host, running
  // on `cuda_device`. Every rank passes the same `name` (letters, digits, '-', '_'; it names the
  // POSIX shared-memory segments through which the ranks exchange their workspaces' IPC
  // handles, as for Comm::host: one name per job). Buffer setup and teardown wait for every
  // rank at most BufferConfig::timeout_seconds, then raise kTimeout naming the missing rank.
  // Ranks sharing a GPU work (their kernels time-slice, so each wait for a peer costs
  // milliseconds there: for tests and small jobs; on separate GPUs they run concurrently).
  static Comm ipc(int rank, int num_ranks, const std::string& name, int cuda_device);
  static bool cuda_available();  // built with CUDA and at least one device visible

  int rank() const;
  int num_ranks() const;
  Transport transport() const;
  const std::shared_ptr<detail::CommState>& state() const { return state_; }

  explicit Comm(std::shared_ptr<detail::CommState> state) : state_(std::move(state)) {}

 private:
  std::shared_ptr<detail::CommState> state_;
};

}  // namespace epx
