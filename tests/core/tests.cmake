# core/: dtype conversions, errors, shapes and views. CPU only, no device needed.
hattn_add_test(NAME test_core SOURCES ${CMAKE_CURRENT_LIST_DIR}/dtype_test.cpp
                                      ${CMAKE_CURRENT_LIST_DIR}/error_test.cpp LABELS cpu)
if(HATTN_CUDA)
  # Links the CUDA runtime (through hattn) but needs no device: it only formats error strings.
  hattn_add_test(NAME test_core_cuda_check SOURCES ${CMAKE_CURRENT_LIST_DIR}/cuda_check_test.cpp LABELS cpu)
endif()
