// DeviceOps and a poison fill for CUDA buffers (tests, demo); compiled only with CUDA.
#pragma once

#include "common/scenario.hpp"

namespace epx::testing {

DeviceOps cuda_device_ops(int device, void* stream);
void cuda_poison(void* device_memory, size_t bytes);  // fills with kPoisonByte

}  // namespace epx::testing
