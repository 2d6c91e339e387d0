# CPU kernels: one source file per ISA, each compiled with only its own flags, so the library runs on
# any x86-64 CPU and picks its path at run time (src/cpu/arch.hpp holds the one xsimd arch_list).
include(CheckCXXCompilerFlag)
set(_hattn_cpu ${CMAKE_CURRENT_LIST_DIR})
target_sources(hattn PRIVATE
  ${_hattn_cpu}/cpu_decode.cpp
  ${_hattn_cpu}/cpu_select.cpp
  ${_hattn_cpu}/decode_generic.cpp)

# -O3 in every configuration: at -O0 (Debug) the inline helpers of xsimd and the standard library
# are emitted as weak symbols, and the linker may keep the copy compiled with AVX-512 flags for the
# generic path too. Fully inlined (checked with nm: only DecodePages::operator() is defined), each
# ISA file exports nothing but its kernel.
set(_hattn_avx2_flags -mavx2 -mfma -mf16c -O3)
set(_hattn_avx512_flags -mavx512f -mavx512cd -mavx512dq -mavx512bw -mavx512vl -mfma -mf16c -O3)
check_cxx_compiler_flag("-mavx2 -mfma -mf16c" HATTN_CXX_HAS_AVX2)
check_cxx_compiler_flag("-mavx512f -mavx512cd -mavx512dq -mavx512bw -mavx512vl" HATTN_CXX_HAS_AVX512)
check_cxx_compiler_flag("-mavx512f -mavx512bw -mavx512bf16" HATTN_CXX_HAS_AVX512BF16)

if(HATTN_CXX_HAS_AVX2)
  target_sources(hattn PRIVATE ${_hattn_cpu}/decode_avx2.cpp)
  set_source_files_properties(${_hattn_cpu}/decode_avx2.cpp TARGET_DIRECTORY hattn
                              PROPERTIES COMPILE_OPTIONS "${_hattn_avx2_flags}")
  target_compile_definitions(hattn PRIVATE HATTN_CPU_HAVE_AVX2=1)
endif()
if(HATTN_CXX_HAS_AVX512)
  target_sources(hattn PRIVATE ${_hattn_cpu}/decode_avx512.cpp)
  set_source_files_properties(${_hattn_cpu}/decode_avx512.cpp TARGET_DIRECTORY hattn
                              PROPERTIES COMPILE_OPTIONS "${_hattn_avx512_flags}")
  target_compile_definitions(hattn PRIVATE HATTN_CPU_HAVE_AVX512=1)
endif()
if(HATTN_CXX_HAS_AVX512 AND HATTN_CXX_HAS_AVX512BF16)
  target_sources(hattn PRIVATE ${_hattn_cpu}/decode_avx512bf16.cpp)
  set_source_files_properties(${_hattn_cpu}/decode_avx512bf16.cpp TARGET_DIRECTORY hattn
                              PROPERTIES COMPILE_OPTIONS "${_hattn_avx512_flags};-mavx512bf16")
  target_compile_definitions(hattn PRIVATE HATTN_CPU_HAVE_AVX512BF16=1)
endif()
