# What both device scripts (gpu-check.sh, device-run.sh) share. Sourced.
#   - the settings the GPU machine requires: no NVLink multicast anywhere;
#   - nccl_root: where PyTorch's NCCL lives (the nvidia-nccl-cu13 wheel: include/ and lib/), empty
#     when that package is absent (CMake then finds a system NCCL);
#   - memcheck: the compute-sanitizer memcheck command. --padding puts 4 KB between allocations,
#     so a stray write into a neighbouring allocation is an error too; every process of a test;
#     exit 9 on any error.
export NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nccl_root=$("${python:-python3}" -c "import nvidia.nccl as n; print(list(n.__path__)[0])" \
  2>/dev/null || true)
memcheck=(compute-sanitizer --tool memcheck --target-processes all --report-api-errors no
          --padding 4096 --error-exitcode 9)
