// Host transport communicator: the ranks are processes on one machine that meet through POSIX
// shared-memory segments whose names start with `name`. Comm::host is in host_engine.cpp.
#pragma once

#include <memory>
#include <string>

#include "core/engine.hpp"
#include "core/low_latency_engine.hpp"
#include "core/shm_segments.hpp"

namespace epx::detail {

struct HostCommState final : CommState {
  std::string name;
  Transport transport() const override { return Transport::kHost; }
};

// The host transport's low-latency mode (host_low_latency.cpp): docs/protocol.md's LL protocol
// in plain loops over the shared-memory workspaces.
std::unique_ptr<LowLatencyEngine> make_host_low_latency(const EngineContext& context,
                                                        const ShmSegments& segments,
                                                        const plan::LowLatencyLayout& layout);

}  // namespace epx::detail
