target_sources(hattn PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/config.cpp
  ${CMAKE_CURRENT_LIST_DIR}/cpu_side.cpp
  ${CMAKE_CURRENT_LIST_DIR}/decode_engine.cpp)
if(HATTN_CUDA)
  target_sources(hattn PRIVATE ${CMAKE_CURRENT_LIST_DIR}/gpu_side.cpp)
endif()
