# CPU kernels (cpu.cmake) and CUDA kernels (cuda.cmake, only when HATTN_CUDA) each own a fragment.
include(${CMAKE_CURRENT_LIST_DIR}/cpu.cmake OPTIONAL)
if(HATTN_CUDA)
  include(${CMAKE_CURRENT_LIST_DIR}/cuda.cmake OPTIONAL)
endif()

# The GPU top-k's selection body (cuda/detail/block_top_k.cuh) run by emulated threads on the host:
# it needs the CUDA headers, not nvcc or a GPU, so the CPU-only sanitizer builds run it too
# (scripts/tsan.sh under ThreadSanitizer, which sees a missing barrier as a race).
find_package(CUDAToolkit QUIET)
if(CUDAToolkit_FOUND)
  hattn_add_test(NAME test_block_top_k_emulated SOURCES ${CMAKE_CURRENT_LIST_DIR}/block_top_k_emulated_test.cpp)
  target_include_directories(test_block_top_k_emulated SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
endif()
