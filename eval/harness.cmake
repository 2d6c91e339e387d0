# hattn-eval (accuracy of every policy combination on the zoo) and hattn-bench (end-to-end decode
# step of one layer against the baselines). Both run on the CPU backend without CUDA; GPU parts are
# compiled in when HATTN_CUDA is on.
if(HATTN_BUILD_EVAL)
  find_package(CLI11 CONFIG REQUIRED)
  foreach(tool eval bench)
    if(EXISTS ${CMAKE_CURRENT_LIST_DIR}/hattn_${tool}.cpp)
      add_executable(hattn-${tool} ${CMAKE_CURRENT_LIST_DIR}/hattn_${tool}.cpp)
      target_link_libraries(hattn-${tool} PRIVATE hattn_zoo CLI11::CLI11)
    endif()
  endforeach()
endif()
