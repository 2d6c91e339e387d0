# The head zoo and its selection traces: a static library that tests, benchmarks and both harnesses link.
add_library(hattn_zoo STATIC ${CMAKE_CURRENT_LIST_DIR}/zoo/head_zoo.cpp ${CMAKE_CURRENT_LIST_DIR}/zoo/zoo_trace.cpp)
target_include_directories(hattn_zoo PUBLIC ${CMAKE_CURRENT_LIST_DIR})
target_link_libraries(hattn_zoo PUBLIC hattn)
target_compile_features(hattn_zoo PUBLIC cxx_std_20)
