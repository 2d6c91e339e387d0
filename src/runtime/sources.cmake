# The runtime the CPU kernels run on: the persistent thread pool.
target_sources(hattn PRIVATE ${CMAKE_CURRENT_LIST_DIR}/thread_pool.cpp)
