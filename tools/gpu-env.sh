# What both device scripts (gpu-check.sh, device-run.sh) share. Sourced.
#   - the settings the GPU machine requires: no NVLink multicast anywhere;
#   - nccl_root: where PyTorch's NCCL lives (the nvidia-nccl-cu13 wheel: include/ and lib/), empty
#     when that package is absent (CMake then finds a system NCCL);
#   - memcheck: the compute-sanitizer memcheck command. --padding puts 4 KB between allocations,
#     so a stray write into a neighbouring allocation is an error too; every process of a test;
#     exit 9 on any error;
#   - sanitized_low_latency: the low-latency suite's cases under a compute-sanitizer tool.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nccl_root=$("${python:-python3}" -c "import nvidia.nccl as n; print(list(n.__path__)[0])" \
  2>/dev/null || true)
memcheck=(compute-sanitizer --tool memcheck --target-processes all --report-api-errors no
          --padding 4096 --error-exitcode 9)
# The low-latency suite under compute-sanitizer tool $1 (memcheck, racecheck, synccheck), the
# binaries of build directory $2 (gpu-check.sh; device-run.sh step sanitize): random
# configurations on one rank and on two IPC processes, a graph replayed with new routing, a
# rank's bad routing; EPX_SANITIZE_CONFIGS (default 2) random configurations per case. (The
# production shapes are left out: at 34 s without a sanitizer, their time under one is not
# known yet.)
sanitized_low_latency() {
  local tool=$1 build=$2
  local command=(compute-sanitizer --tool "$tool" --target-processes all --error-exitcode 9)
  [ "$tool" = memcheck ] && command=("${memcheck[@]}")
  local cases='*LowLatencyThreads.RandomConfigurationsMatchTheReference/R1'
  cases+=':*LowLatencyIpc.RandomConfigurationsMatchTheReference/R2'
  cases+=':*LowLatencyGraph.ReplaysWithNewRouting/R1'
  cases+=':LowLatencyErrors.InvalidRoutingOnOneRankRaisesEverywhere'
  EPX_GPU_CONFIGS=${EPX_SANITIZE_CONFIGS:-2} timeout 300 "${command[@]}" \
    "$build/tests/test_gpu_low_latency" --gtest_filter="$cases"
}
