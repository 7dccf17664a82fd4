// The allocators behind epx::default_allocator().
#pragma once

#include <memory>

#include "epx/tensor.hpp"

namespace epx::detail {

std::shared_ptr<Allocator> make_host_allocator();  // src/core/tensor.cpp
#if defined(EPX_WITH_CUDA)
std::shared_ptr<Allocator> make_cuda_allocator();  // src/cuda/runtime/cuda_allocator.cpp
#endif

}  // namespace epx::detail
