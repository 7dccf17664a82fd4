// The host transport's low-latency mode (host_low_latency.cpp): docs/protocol.md's LL protocol
// in plain loops over the shared-memory workspaces.
#pragma once

#include <memory>

#include "core/engine.hpp"
#include "core/low_latency_engine.hpp"
#include "core/shm_segments.hpp"

namespace epx::detail {

std::unique_ptr<LowLatencyEngine> make_host_low_latency(const EngineContext& context,
                                                        const ShmSegments& segments,
                                                        const plan::LowLatencyLayout& layout);

}  // namespace epx::detail
