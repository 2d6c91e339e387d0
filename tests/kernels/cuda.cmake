# CUDA kernel tests (label gpu): they skip with "no CUDA device" where none is present.
hattn_add_test(NAME hattn_cuda_kernels_test
               SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_decode_test.cpp ${CMAKE_CURRENT_LIST_DIR}/cuda_select_test.cpp
                       ${CMAKE_CURRENT_LIST_DIR}/cuda_split_test.cpp ${CMAKE_CURRENT_LIST_DIR}/cuda_two_level_test.cpp
                       ${CMAKE_CURRENT_LIST_DIR}/cuda_host_wait_test.cpp ${CMAKE_CURRENT_LIST_DIR}/fast_divmod_test.cpp
               LABELS gpu)
