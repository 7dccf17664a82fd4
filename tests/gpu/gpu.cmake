# GPU suites (built with the CUDA transport; they skip themselves where fewer than 2 GPUs are
# visible, so CI without GPUs runs and skips them).
add_executable(test_gpu ${CMAKE_CURRENT_LIST_DIR}/test_gpu.cpp
                        ${CMAKE_CURRENT_LIST_DIR}/../cpp/multi_process.cpp)
target_include_directories(test_gpu PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(test_gpu PRIVATE epx epx_test_common GTest::gtest_main)
gtest_discover_tests(test_gpu DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 900)

# First-look timings of the CUDA transport (not a test; tools/gpu-check.sh runs it).
add_executable(bench_gpu ${CMAKE_CURRENT_LIST_DIR}/bench_gpu.cpp
                         ${CMAKE_CURRENT_LIST_DIR}/../cpp/multi_process.cpp)
target_include_directories(bench_gpu PRIVATE ${PROJECT_SOURCE_DIR}/src ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(bench_gpu PRIVATE epx epx_test_common)

# The device routing plan against the host plan (one GPU).
add_executable(test_gpu_plan ${CMAKE_CURRENT_LIST_DIR}/test_gpu_plan.cpp
                             ${CMAKE_CURRENT_LIST_DIR}/../cpp/multi_process.cpp)
target_include_directories(test_gpu_plan PRIVATE ${PROJECT_SOURCE_DIR}/src
                                                 ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(test_gpu_plan PRIVATE epx epx_test_common GTest::gtest_main)
gtest_discover_tests(test_gpu_plan DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 600)

# Several ranks as threads of one process (Comm::cuda_threads), sharing one GPU (or spread over
# the visible GPUs): the multi-rank protocol on a single-GPU machine.
add_executable(test_gpu_threads ${CMAKE_CURRENT_LIST_DIR}/test_gpu_threads.cpp
                                ${CMAKE_CURRENT_LIST_DIR}/../cpp/multi_process.cpp)
target_include_directories(test_gpu_threads PRIVATE ${PROJECT_SOURCE_DIR}/src
                                                    ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(test_gpu_threads PRIVATE epx epx_test_common GTest::gtest_main)
gtest_discover_tests(test_gpu_threads DISCOVERY_TIMEOUT 60 PROPERTIES TIMEOUT 900)
