# HBM page cache (issue 6): the host model everywhere, the device cache's host side with CUDA only.
# host_kv_pool.cpp and paged_kv_store.cpp are listed in src/CMakeLists.txt.
target_sources(hattn PRIVATE ${CMAKE_CURRENT_LIST_DIR}/device_kv_cache_model.cpp)
if(HATTN_CUDA)
  target_sources(hattn PRIVATE ${CMAKE_CURRENT_LIST_DIR}/device_kv_cache.cpp)
endif()
