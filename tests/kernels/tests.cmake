# CPU kernels (cpu.cmake) and CUDA kernels (cuda.cmake, only when HATTN_CUDA) each own a fragment.
include(${CMAKE_CURRENT_LIST_DIR}/cpu.cmake OPTIONAL)
if(HATTN_CUDA)
  include(${CMAKE_CURRENT_LIST_DIR}/cuda.cmake OPTIONAL)
endif()
