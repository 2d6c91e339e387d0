# reference/: exact attention and the LSE merge, the yardstick of every other test. CPU only.
hattn_add_test(NAME test_reference SOURCES ${CMAKE_CURRENT_LIST_DIR}/exact_attention_test.cpp LABELS cpu)
