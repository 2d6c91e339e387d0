# HBM page cache (issue 6): the host model runs everywhere; the GPU cache test skips without a device.
hattn_add_test(NAME test_kv_cache_model SOURCES ${CMAKE_CURRENT_LIST_DIR}/kv/device_kv_cache_model_test.cpp)
if(HATTN_CUDA)
  hattn_add_test(NAME test_kv_cache_gpu SOURCES ${CMAKE_CURRENT_LIST_DIR}/kv/device_kv_cache_gpu_test.cpp LABELS gpu)
endif()
