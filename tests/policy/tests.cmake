hattn_add_test(NAME test_policy SOURCES ${CMAKE_CURRENT_LIST_DIR}/policies_test.cpp)
hattn_add_test(NAME test_hybrid_attention SOURCES ${CMAKE_CURRENT_LIST_DIR}/hybrid_attention_test.cpp)
if(HATTN_CUDA)
  hattn_add_test(NAME test_hybrid_attention_gpu SOURCES ${CMAKE_CURRENT_LIST_DIR}/hybrid_attention_gpu_test.cpp
                 LABELS gpu)
endif()
