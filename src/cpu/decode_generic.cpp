// The generic path of the CPU kernels (decode and scoring): SSE2, the x86-64 baseline, compiled with
// the project's default flags.
#include <emmintrin.h>

#include "decode_kernel_impl.hpp"
#include "score_kernel_impl.hpp"

namespace hattn::detail::cpu {
namespace {

template <>
struct Isa<xsimd::sse2> {
  using B = xsimd::batch<float, xsimd::sse2>;
  static constexpr bool kBf16Dot = false;
  static constexpr int kChunkBlock = 2;  // row chunks per value pass: fits the register file
  static B load(const float* p) { return B::load_unaligned(p); }
  // bf16 is the high half of an fp32: interleave zeros below it.
  static B load(const bfloat16_t* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));
  }
  // SSE2 has no fp16 conversion (F16C came with AVX); the exact scalar one.
  static B load(const half_t* p) {
    alignas(16) float f[4] = {to_float(p[0]), to_float(p[1]), to_float(p[2]), to_float(p[3])};
    return B::load_aligned(f);
  }
  static void load_bf16_pairs(const bfloat16_t* p, B& even, B& odd) {
    const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    even = _mm_castsi128_ps(_mm_slli_epi32(w, 16));
    odd = _mm_castsi128_ps(_mm_and_si128(w, _mm_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static B reduce_rows(const B* acc) { return xsimd::haddp(acc); }
};

}  // namespace

template void DecodePages::operator()<xsimd::sse2>(xsimd::sse2, const PageRange&) const;
template void ScoreSummaries::operator()<xsimd::sse2>(xsimd::sse2, const SummaryRange&) const;

}  // namespace hattn::detail::cpu
