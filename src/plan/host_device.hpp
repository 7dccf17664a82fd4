// Marks functions shared by host code and CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define EPX_HD __host__ __device__ __forceinline__
#else
#define EPX_HD inline
#endif
