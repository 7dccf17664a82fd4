# GPU suites (built with the CUDA transport; each skips itself where too few GPUs are visible,
# so CI without GPUs runs and skips them).
function(epx_gpu_test name)
  add_executable(${name} ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/${name}.cpp
                         ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../cpp/multi_process.cpp)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
  target_link_libraries(${name} PRIVATE epx epx_test_common GTest::gtest_main)
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 900 LABELS gpu)
endfunction()

epx_gpu_test(test_gpu)          # NCCL ranks, one process per GPU
epx_gpu_test(test_gpu_plan)     # the device routing plan against the host plan (one GPU)
# Several ranks as threads of one process (Comm::cuda_threads), sharing one GPU (or spread over
# the visible GPUs): the multi-rank protocol on a single-GPU machine.
epx_gpu_test(test_gpu_threads)
# Device-side numerics against plan/numerics.hpp, exhaustively (a CUDA source of its own).
add_executable(test_gpu_numerics ${CMAKE_CURRENT_LIST_DIR}/test_gpu_numerics.cu)
target_compile_options(test_gpu_numerics PRIVATE -gencode=arch=compute_90a,code=sm_90a)
target_include_directories(test_gpu_numerics PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(test_gpu_numerics PRIVATE GTest::gtest_main)
gtest_discover_tests(test_gpu_numerics DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 300 LABELS gpu)

# First-look timings of the CUDA transport (not a test; tools/gpu-check.sh runs it).
add_executable(bench_gpu ${CMAKE_CURRENT_LIST_DIR}/bench_gpu.cpp
                         ${CMAKE_CURRENT_LIST_DIR}/../cpp/multi_process.cpp)
target_include_directories(bench_gpu PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(bench_gpu PRIVATE epx epx_test_common)

# Costs of the synchronisation pieces on their own (bench/micro/sync_costs.cu; not a test).
add_executable(sync_costs ${PROJECT_SOURCE_DIR}/bench/micro/sync_costs.cu)
target_compile_options(sync_costs PRIVATE -gencode=arch=compute_90a,code=sm_90a)

# Register copies against bulk (cp.async.bulk) copies of 14 KB rows (bench/micro/copy_paths.cu).
add_executable(copy_paths ${PROJECT_SOURCE_DIR}/bench/micro/copy_paths.cu)
target_compile_options(copy_paths PRIVATE -gencode=arch=compute_90a,code=sm_90a)
# The expert-side sum of 8 rows per token by register loads and by cp.async stages
# (bench/micro/row_sums.cu).
add_executable(row_sums ${PROJECT_SOURCE_DIR}/bench/micro/row_sums.cu)
target_compile_options(row_sums PRIVATE -gencode=arch=compute_90a,code=sm_90a)
target_include_directories(row_sums PRIVATE ${PROJECT_SOURCE_DIR}/src)  # plan/numerics.hpp
