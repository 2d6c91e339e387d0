# HBM page cache (issue 6): hit rate of the bucketed LRU against exact LRU on selection traces (host
# model) and, with CUDA, the device maintenance time per step at 100K slots.
hattn_add_benchmark(NAME bench_hbm_cache SOURCES ${CMAKE_CURRENT_LIST_DIR}/cache_hbm.cpp)
# The head zoo's traces where the zoo is built (HATTN_BUILD_EVAL).
if(HATTN_BUILD_EVAL)
  target_link_libraries(bench_hbm_cache PRIVATE hattn_zoo)
  target_compile_definitions(bench_hbm_cache PRIVATE HATTN_WITH_ZOO=1)
endif()
