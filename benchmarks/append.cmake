# Append throughput into the host KV pool (issue 3).
hattn_add_benchmark(NAME bench_append SOURCES ${CMAKE_CURRENT_LIST_DIR}/bench_append.cpp)
