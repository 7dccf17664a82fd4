// CUDA and NCCL status checks that raise epx::Error (kTransport) with the failed call.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include "epx/error.hpp"

#define EPX_CUDA_CHECK(call)                                                 \
  do {                                                                       \
    const cudaError_t epx_cuda_status_ = (call);                             \
    EPX_CHECK(epx_cuda_status_ == cudaSuccess, kTransport,                   \
              #call << " failed: " << cudaGetErrorString(epx_cuda_status_)); \
  } while (0)

#define EPX_NCCL_CHECK(call)                                                 \
  do {                                                                       \
    const ncclResult_t epx_nccl_status_ = (call);                            \
    EPX_CHECK(epx_nccl_status_ == ncclSuccess, kTransport,                   \
              #call << " failed: " << ncclGetErrorString(epx_nccl_status_)); \
  } while (0)
