# cmake -DSETTINGS=<file> -DMODE=<install|consumer|consumer_cuda|consumer_cuda_absent> -P consumer_test.cmake
# Installs the build into a fresh prefix (install) or configures, builds and runs examples/consumer
# against that prefix (the other modes). Any failure ends the script with FATAL_ERROR.
cmake_minimum_required(VERSION 3.25)
include(${SETTINGS})
set(prefix ${HATTN_WORK_DIR}/prefix)

function(run_checked what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (exit ${rc})")
  endif()
  set(last_output "${out}${err}" PARENT_SCOPE)
endfunction()

if(MODE STREQUAL "install")
  file(REMOVE_RECURSE ${prefix})
  run_checked("cmake --install" ${CMAKE_COMMAND} --install ${HATTN_BUILD_DIR} --prefix ${prefix}
              --config ${HATTN_BUILD_TYPE})
  file(GLOB_RECURSE config_files ${prefix}/*/HybridAttentionConfig.cmake)
  file(GLOB_RECURSE version_files ${prefix}/*/HybridAttentionConfigVersion.cmake)
  file(GLOB_RECURSE target_files ${prefix}/*/HybridAttentionTargets.cmake)
  file(GLOB_RECURSE libraries ${prefix}/*/libhattn.a)
  foreach(v config_files version_files target_files libraries)
    if(NOT ${v})
      message(FATAL_ERROR "the install lacks ${v} (prefix ${prefix})")
    endif()
  endforeach()
  if(NOT EXISTS ${prefix}/include/hattn/kv/paged_kv_store.hpp)
    message(FATAL_ERROR "the install lacks the public headers (prefix ${prefix})")
  endif()
  message(STATUS "installed into ${prefix}: ${config_files}")
  return()
endif()

set(require_cuda OFF)
if(MODE STREQUAL "consumer_cuda" OR MODE STREQUAL "consumer_cuda_absent")
  set(require_cuda ON)
endif()
set(build ${HATTN_WORK_DIR}/build-${MODE})
file(REMOVE_RECURSE ${build})
# The install prefix first, then whatever this build searched (e.g. where xsimd lives on the device).
# The list goes through the environment (":"-separated): a ";" inside one -D argument would be split
# into separate arguments when ${configure} is expanded.
set(search_path ${prefix} ${HATTN_PREFIX_PATH})
list(JOIN search_path ":" search_path_env)
set(configure ${CMAKE_COMMAND} -E env "CMAKE_PREFIX_PATH=${search_path_env}"
    ${CMAKE_COMMAND} -S ${HATTN_CONSUMER_SOURCE_DIR} -B ${build} -G ${HATTN_GENERATOR}
    -DCMAKE_CXX_COMPILER=${HATTN_CXX_COMPILER} -DCMAKE_BUILD_TYPE=${HATTN_BUILD_TYPE}
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
    -DCONSUMER_REQUIRE_CUDA=${require_cuda})
if(HATTN_CUDA_TOOLKIT_ROOT)
  list(APPEND configure -DCUDAToolkit_ROOT=${HATTN_CUDA_TOOLKIT_ROOT})
endif()

if(MODE STREQUAL "consumer_cuda_absent")
  # A CPU-only package must refuse COMPONENTS CUDA, and say why.
  execute_process(COMMAND ${configure} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  message("${out}${err}")
  if(rc EQUAL 0)
    message(FATAL_ERROR "find_package(HybridAttention COMPONENTS CUDA) succeeded against a CPU-only package")
  endif()
  if(NOT "${out}${err}" MATCHES "built without CUDA")
    message(FATAL_ERROR "the failure does not say that the package was built without CUDA")
  endif()
  return()
endif()

run_checked("configuring the consumer" ${configure})
string(FIND "${last_output}" "from ${prefix}/" at)
if(at EQUAL -1)
  message(FATAL_ERROR "the consumer did not find the package in ${prefix}")
endif()
run_checked("building the consumer" ${CMAKE_COMMAND} --build ${build})
run_checked("running the consumer" ${build}/hattn_consumer)
if(NOT last_output MATCHES "^consumer ok: HybridAttention ${HATTN_VERSION} ")
  message(FATAL_ERROR "unexpected consumer output")
endif()
if(require_cuda AND NOT last_output MATCHES "CUDA component: found")
  message(FATAL_ERROR "the consumer did not see the CUDA component")
endif()
