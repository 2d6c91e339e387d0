// The avx512 read reduction; compiled with only the avx512 flags (benchmarks/cpu.cmake).
#include "cpu_dram_read.hpp"
#include "cpu_dram_read_kernel.hpp"

namespace hattn::bench {

double read_sum_avx512(const float* p, std::size_t n) { return read_sum<xsimd::avx512bw>(p, n); }

}  // namespace hattn::bench
