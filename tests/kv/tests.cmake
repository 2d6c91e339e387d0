# kv/: page layout, host pool, paged store with its summaries. CPU only.
hattn_add_test(NAME test_kv
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/page_layout_test.cpp
                       ${CMAKE_CURRENT_LIST_DIR}/host_kv_pool_test.cpp
                       ${CMAKE_CURRENT_LIST_DIR}/paged_kv_store_test.cpp
               LABELS cpu)
