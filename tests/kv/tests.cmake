hattn_add_test(NAME test_kv SOURCES ${CMAKE_CURRENT_LIST_DIR}/paged_kv_store_test.cpp)
