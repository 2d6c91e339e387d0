// The AVX2 + FMA path of the CPU kernels, decode and scoring (with F16C for fp16 keys and values).
// Compiled with -mavx2 -mfma -mf16c only.
#include <immintrin.h>

#include "decode_kernel_impl.hpp"
#include "score_kernel_impl.hpp"

namespace hattn::detail::cpu {
namespace {

using Avx2 = xsimd::fma3<xsimd::avx2>;

template <>
struct Isa<Avx2> {
  using B = xsimd::batch<float, Avx2>;
  static constexpr bool kBf16Dot = false;
  static constexpr int kChunkBlock = 2;  // row chunks per value pass: fits the register file
  static B load(const float* p) { return B::load_unaligned(p); }
  static B load(const bfloat16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static B load(const half_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // A bf16 is the high half of an fp32: even elements are the dwords shifted left, odd ones the dwords
  // with the low half cleared (one instruction per 8 values instead of a widening shuffle and a shift).
  static void load_bf16_pairs(const bfloat16_t* p, B& even, B& odd) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static B reduce_rows(const B* acc) { return xsimd::haddp(acc); }
};

}  // namespace

template void DecodePages::operator()<Avx2>(Avx2, const PageRange&) const;
template void ScoreSummaries::operator()<Avx2>(Avx2, const SummaryRange&) const;

}  // namespace hattn::detail::cpu
