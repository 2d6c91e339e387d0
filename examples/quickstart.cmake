add_executable(hattn_quickstart ${CMAKE_CURRENT_LIST_DIR}/quickstart/quickstart.cpp)
target_link_libraries(hattn_quickstart PRIVATE hattn hattn_zoo CLI11::CLI11)
set_target_properties(hattn_quickstart PROPERTIES OUTPUT_NAME hattn-quickstart)
