# GPU suites (built with the CUDA transport; each skips itself where too few GPUs are visible,
# so CI without GPUs runs and skips them).
function(epx_gpu_test name)
  add_executable(${name} ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/${name}.cpp)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
  target_link_libraries(${name} PRIVATE epx epx_test_common GTest::gtest_main)
  gtest_discover_tests(${name} DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 900 LABELS gpu)
endfunction()

epx_gpu_test(test_gpu)          # NCCL ranks, one process per GPU
epx_gpu_test(test_gpu_plan)     # the device routing plan against the host plan (one GPU)
# Several ranks as threads of one process (Comm::cuda_threads), sharing one GPU (or spread over
# the visible GPUs): the multi-rank protocol on a single-GPU machine.
epx_gpu_test(test_gpu_threads)
# The low-latency mode: thread ranks on one GPU (R = 1-8), one NCCL rank, graph replays.
epx_gpu_test(test_gpu_low_latency)
# Device-side numerics against plan/numerics.hpp, exhaustively (a CUDA source of its own).
add_executable(test_gpu_numerics ${CMAKE_CURRENT_LIST_DIR}/test_gpu_numerics.cu)
target_compile_options(test_gpu_numerics PRIVATE -gencode=arch=compute_90a,code=sm_90a)
target_include_directories(test_gpu_numerics PRIVATE ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(test_gpu_numerics PRIVATE GTest::gtest_main)
gtest_discover_tests(test_gpu_numerics DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 300 LABELS gpu)
