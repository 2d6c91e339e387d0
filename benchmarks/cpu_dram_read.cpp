// The generic (SSE2) read reduction and the choice of the widest one this CPU runs.
#include "cpu_dram_read.hpp"

#include <xsimd/xsimd.hpp>

#include "cpu_dram_read_kernel.hpp"

namespace hattn::bench {

double read_sum_generic(const float* p, std::size_t n) { return read_sum<xsimd::sse2>(p, n); }

ReadSum best_read_sum(const char** name) {
#if HATTN_BENCH_HAVE_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
    *name = "avx512";
    return &read_sum_avx512;
  }
#endif
#if HATTN_BENCH_HAVE_AVX2
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *name = "avx2";
    return &read_sum_avx2;
  }
#endif
  *name = "sse2";
  return &read_sum_generic;
}

}  // namespace hattn::bench
