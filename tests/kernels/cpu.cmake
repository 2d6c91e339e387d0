# CPU kernels: the thread pool, the decode kernel on every path this CPU supports, scoring and
# selection. Label "cpu"; scripts/tsan.sh runs test_cpu_thread_pool and the split test under TSan.
hattn_add_test(NAME test_cpu_thread_pool SOURCES ${CMAKE_CURRENT_LIST_DIR}/cpu_thread_pool_test.cpp LABELS cpu)
hattn_add_test(NAME test_cpu_decode SOURCES ${CMAKE_CURRENT_LIST_DIR}/cpu_decode_test.cpp LABELS cpu)
hattn_add_test(NAME test_cpu_select SOURCES ${CMAKE_CURRENT_LIST_DIR}/cpu_select_test.cpp LABELS cpu)
