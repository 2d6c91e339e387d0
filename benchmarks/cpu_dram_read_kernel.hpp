#pragma once
// Body of the read reduction, instantiated once per ISA file with that file's flags.
#include <cstddef>
#include <xsimd/xsimd.hpp>

namespace hattn::bench {
namespace {

// Four independent accumulators of four batches each: enough loads in flight that the loop is bound
// by memory, not by the add latency, on every width.
template <class Arch>
double read_sum(const float* p, std::size_t n) {
  using B = xsimd::batch<float, Arch>;
  constexpr std::size_t S = B::size;
  B a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
  for (std::size_t i = 0; i + 4 * S <= n; i += 4 * S) {
    a0 += B::load_aligned(p + i);
    a1 += B::load_aligned(p + i + S);
    a2 += B::load_aligned(p + i + 2 * S);
    a3 += B::load_aligned(p + i + 3 * S);
  }
  return static_cast<double>(xsimd::hadd((a0 + a1) + (a2 + a3)));
}

}  // namespace
}  // namespace hattn::bench
