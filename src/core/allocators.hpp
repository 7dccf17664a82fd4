// The allocators behind epx::default_allocator().
#pragma once

#include <memory>

#include "epx/tensor.hpp"

namespace epx::detail {

std::shared_ptr<Allocator> make_host_allocator();  // src/core/tensor.cpp
// src/cuda/runtime/cuda_allocator.cpp; without CUDA (src/core/no_cuda.cpp) it throws.
std::shared_ptr<Allocator> make_cuda_allocator();

}  // namespace epx::detail
