// The AVX-512 path of the CPU kernels, decode and scoring (F, CD, DQ, BW, VL, with F16C and FMA).
// Compiled with those flags only.
#include <immintrin.h>

#include "decode_kernel_impl.hpp"
#include "score_kernel_impl.hpp"
#include "decode_kernel_avx512.hpp"

namespace hattn::detail::cpu {
namespace {

template <>
struct Isa<xsimd::avx512bw> : avx512::IsaCommon {
  static constexpr bool kBf16Dot = false;
};

}  // namespace

template void DecodePages::operator()<xsimd::avx512bw>(xsimd::avx512bw, const PageRange&) const;
template void ScoreSummaries::operator()<xsimd::avx512bw>(xsimd::avx512bw, const SummaryRange&) const;

}  // namespace hattn::detail::cpu
