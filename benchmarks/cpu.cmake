# CPU decode kernel against the DRAM read ceiling (issue 4). The ceiling's read loop has one file
# per ISA, compiled with only its flags, like the kernels in src/cpu.
hattn_add_benchmark(NAME bench_cpu_decode SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/cpu_decode_bench.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_dram_read.cpp)
target_link_libraries(bench_cpu_decode PRIVATE xsimd)
if(HATTN_CXX_HAS_AVX2)
  target_sources(bench_cpu_decode PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cpu_dram_read_avx2.cpp)
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu_dram_read_avx2.cpp TARGET_DIRECTORY bench_cpu_decode
                              PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-O3")
  target_compile_definitions(bench_cpu_decode PRIVATE HATTN_BENCH_HAVE_AVX2=1)
endif()
if(HATTN_CXX_HAS_AVX512)
  target_sources(bench_cpu_decode PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cpu_dram_read_avx512.cpp)
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/cpu_dram_read_avx512.cpp TARGET_DIRECTORY bench_cpu_decode
                              PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512cd;-mavx512dq;-mavx512bw;-mavx512vl;-mfma;-O3")
  target_compile_definitions(bench_cpu_decode PRIVATE HATTN_BENCH_HAVE_AVX512=1)
endif()
