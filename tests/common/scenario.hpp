// One randomized end-to-end check of a Buffer against the reference, shared by the host tests,
// the GPU tests and the demo: routing dispatch, a cached replay with fresh values, combine and
// (expanded, weighted) combine_backward, every output element compared bit for bit.
#pragma once

#include <cstring>
#include <functional>
#include <memory>
#include <string>

#include "common/random_problem.hpp"
#include "epx/buffer.hpp"

namespace epx::testing {

// How the scenario moves data between the host and the buffer's device.
struct DeviceOps {
  // Copies `bytes` of host data into new device memory; the shared_ptr owns it.
  std::function<std::shared_ptr<void>(const void* host, size_t bytes)> upload;
  std::function<void(void* host, const void* device, size_t bytes)> download;
  // Copies `bytes` of host data into existing memory of the device (a workspace view).
  std::function<void(void* device, const void* host, size_t bytes)> write;
  void* stream = nullptr;
  // Optional, called before each buffer operation: thread ranks line up there when asked to
  // (thread_ranks.hpp, EPX_TEST_ALIGN_RANKS).
  std::function<void()> before_operation;
};

DeviceOps host_device_ops();

// An allocator that fills every output with a poison byte pattern (0x7f: huge finite bf16 and
// fp32 values, int32 0x7f7f7f7f), so an element the transport forgot to write cannot pass.
class PoisonAllocator : public Allocator {
 public:
  // fill(memory, bytes, stream) poisons a fresh allocation, ordered on the allocation's stream.
  PoisonAllocator(std::shared_ptr<Allocator> inner,
                  std::function<void(void* device, size_t bytes, void* stream)> fill)
      : inner_(std::move(inner)), fill_(std::move(fill)) {}
  Tensor allocate(DType dtype, const std::vector<int64_t>& shape, Device device,
                  void* stream) override;

 private:
  std::shared_ptr<Allocator> inner_;
  std::function<void(void*, size_t, void*)> fill_;
};
constexpr unsigned char kPoisonByte = 0x7f;

// The default host allocator, poisoned.
inline std::shared_ptr<Allocator> poisoned_host_allocator() {
  return std::make_shared<PoisonAllocator>(
      default_allocator(), [](void* p, size_t n, void*) { std::memset(p, kPoisonByte, n); });
}

struct PhaseTimes {
  double dispatch_ms = 0, cached_ms = 0, combine_ms = 0, backward_ms = 0;
};

// The BufferConfig a random configuration needs.
BufferConfig buffer_config_for(const RandomConfig& config, double timeout_seconds = 60);

// Runs the scenario on this rank; returns "" on success, else a message naming the operation,
// the output, the first mismatching element (or the error an operation raised) and the
// configuration.
std::string run_scenario(Buffer& buffer, const RandomConfig& config, int rank,
                         const DeviceOps& ops, PhaseTimes* times = nullptr);

}  // namespace epx::testing
