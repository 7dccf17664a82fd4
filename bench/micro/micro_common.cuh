// What the micro benchmarks (bench/micro/*.cu) share: a CUDA check that exits with a message,
// a skip where no GPU is visible, and the mean time of `repeats` calls of a body on a stream,
// between two events.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

namespace micro {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::fprintf(stderr, "micro benchmark: %s: %s\n", what, cudaGetErrorString(status));
    std::exit(1);
  }
}

// False (after saying so) when no GPU is visible: the benchmark then has nothing to measure.
inline bool gpu_visible(const char* name) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("%s: skipped (no GPU visible)\n", name);
    return false;
  }
  return true;
}

template <typename Body>
float elapsed_us(cudaStream_t s, int repeats, const Body& body) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "event");
  check(cudaEventCreate(&stop), "event");
  check(cudaEventRecord(start, s), "record");
  for (int i = 0; i < repeats; ++i) body();
  check(cudaEventRecord(stop, s), "record");
  check(cudaEventSynchronize(stop), "sync");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "elapsed");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 1000.0f * ms / repeats;
}

}  // namespace micro
