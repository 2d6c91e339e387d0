# eval/: the head zoo's determinism and head properties, its selection traces, the metrics on hand-made
# cases. CPU only.
if(TARGET hattn_zoo AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/head_zoo_test.cpp AND EXISTS ${CMAKE_CURRENT_LIST_DIR}/metrics_test.cpp)
  hattn_add_test(NAME test_eval
                 SOURCES ${CMAKE_CURRENT_LIST_DIR}/head_zoo_test.cpp
                         ${CMAKE_CURRENT_LIST_DIR}/metrics_test.cpp
                         ${CMAKE_CURRENT_LIST_DIR}/zoo_trace_test.cpp
                 LABELS cpu)
  target_link_libraries(test_eval PRIVATE hattn_zoo)
endif()
