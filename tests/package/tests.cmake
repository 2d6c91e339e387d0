# The installed package, used the way an engine uses it (fmt's find-package-test is the model): install
# this build into a fresh prefix, then configure, build and run examples/consumer against it.
#   package_install              cmake --install into <build>/tests/package/prefix
#   package_consumer             find_package(HybridAttention CONFIG REQUIRED), build, run
#   package_consumer_cuda        with CUDA: COMPONENTS CUDA is found and the consumer says so
#   package_consumer_cuda_absent without CUDA: asking for COMPONENTS CUDA fails with a clear message
if(HATTN_INSTALL)
  set(_hattn_pkg_dir ${CMAKE_CURRENT_BINARY_DIR}/package)
  # Settings of this build that the consumer needs, written to a file so lists survive intact.
  file(CONFIGURE OUTPUT ${_hattn_pkg_dir}/package_test_settings.cmake @ONLY CONTENT [[
set(HATTN_BUILD_DIR "@PROJECT_BINARY_DIR@")
set(HATTN_CONSUMER_SOURCE_DIR "@PROJECT_SOURCE_DIR@/examples/consumer")
set(HATTN_WORK_DIR "@_hattn_pkg_dir@")
set(HATTN_GENERATOR "@CMAKE_GENERATOR@")
set(HATTN_CXX_COMPILER "@CMAKE_CXX_COMPILER@")
set(HATTN_BUILD_TYPE "@CMAKE_BUILD_TYPE@")
set(HATTN_PREFIX_PATH "@CMAKE_PREFIX_PATH@")
set(HATTN_CUDA_TOOLKIT_ROOT "@CUDAToolkit_LIBRARY_ROOT@")
set(HATTN_EXPECT_CUDA "@HATTN_CUDA@")
set(HATTN_VERSION "@PROJECT_VERSION@")
]])
  set(_hattn_pkg_script ${CMAKE_CURRENT_LIST_DIR}/consumer_test.cmake)
  foreach(mode install consumer consumer_cuda consumer_cuda_absent)
    if(mode STREQUAL "consumer_cuda" AND NOT HATTN_CUDA)
      continue()
    endif()
    if(mode STREQUAL "consumer_cuda_absent" AND HATTN_CUDA)
      continue()
    endif()
    add_test(NAME package_${mode}
             COMMAND ${CMAKE_COMMAND} -DSETTINGS=${_hattn_pkg_dir}/package_test_settings.cmake -DMODE=${mode}
                     -P ${_hattn_pkg_script})
    set_tests_properties(package_${mode} PROPERTIES LABELS package TIMEOUT 900)
    if(mode STREQUAL "install")
      set_tests_properties(package_${mode} PROPERTIES FIXTURES_SETUP hattn_installed_package)
    else()
      set_tests_properties(package_${mode} PROPERTIES FIXTURES_REQUIRED hattn_installed_package)
    endif()
  endforeach()
endif()
