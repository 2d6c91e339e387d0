// The avx2 read reduction; compiled with only the avx2 flags (benchmarks/cpu.cmake).
#include "cpu_dram_read.hpp"
#include "cpu_dram_read_kernel.hpp"

namespace hattn::bench {

double read_sum_avx2(const float* p, std::size_t n) { return read_sum<xsimd::fma3<xsimd::avx2>>(p, n); }

}  // namespace hattn::bench
