# CUDA kernel microbenchmarks and the figures of docs/results/cuda_kernels.json (issue 5).
if(HATTN_CUDA)
  hattn_add_benchmark(NAME bench_cuda_kernels SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_kernels_bench.cpp)
endif()
