# Included by tests/CMakeLists.txt: the oracle's own hand-worked tests (epx_test_common is
# defined in tests/common/CMakeLists.txt).
add_executable(test_reference ${CMAKE_CURRENT_LIST_DIR}/test_reference.cpp)
target_include_directories(test_reference PRIVATE ${PROJECT_SOURCE_DIR}/src
                                                  ${PROJECT_SOURCE_DIR}/tests)
target_link_libraries(test_reference PRIVATE epx_test_common epx_reference GTest::gtest_main)
target_compile_options(test_reference PRIVATE -Wall -Wextra)
gtest_discover_tests(test_reference DISCOVERY_TIMEOUT 60)
