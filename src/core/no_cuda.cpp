// What a build without the CUDA transport provides in its place: every CUDA entry point of the
// public API and of the engine factory, raising a clear error. Compiled only when epx is built
// without CUDA (CMakeLists.txt), so the real definitions and these never meet.
#include "core/engine.hpp"
#include "epx/comm.hpp"
#include "epx/error.hpp"

namespace epx {
namespace {

[[noreturn]] void no_cuda(const char* what) {
  EPX_FAIL(kInvalidArgument, "epx was built without CUDA: " << what << " is unavailable");
}

}  // namespace

UniqueId Comm::nccl_unique_id() {
  no_cuda("the NCCL transport");
}
Comm Comm::nccl(int, int, const UniqueId&, int, double) {
  no_cuda("the NCCL transport");
}
Comm Comm::nccl(ncclComm*, int) {
  no_cuda("the NCCL transport");
}
Comm Comm::cuda_threads(const ThreadGroup&, int, int) {
  no_cuda("the CUDA thread transport");
}
Comm Comm::ipc(int, int, const std::string&, int) {
  no_cuda("the CUDA IPC transport");
}
bool Comm::cuda_available() {
  return false;
}

namespace detail {
std::unique_ptr<Engine> make_cuda_engine(const EngineContext&) {
  no_cuda("the CUDA transport");
}
std::shared_ptr<Allocator> make_cuda_allocator() {
  no_cuda("CUDA memory");
}
}  // namespace detail

}  // namespace epx
