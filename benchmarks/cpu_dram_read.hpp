#pragma once
// The DRAM read ceiling the CPU kernel is judged against: a streaming-read reduction (sum of all
// floats) with the widest vectors the CPU has, one source file per ISA.
#include <cstddef>

namespace hattn::bench {

/// Sum of p[0, n): reads every byte once. n a multiple of 64; p 64-byte aligned.
double read_sum_generic(const float* p, std::size_t n);
double read_sum_avx2(const float* p, std::size_t n);
double read_sum_avx512(const float* p, std::size_t n);

/// The widest of the above this CPU runs (and its name, for the report).
using ReadSum = double (*)(const float*, std::size_t);
ReadSum best_read_sum(const char** name);

}  // namespace hattn::bench
