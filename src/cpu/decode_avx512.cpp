// The AVX-512 path (F, CD, DQ, BW, VL, with F16C and FMA). Compiled with those flags only.
#include <immintrin.h>

#include "decode_kernel_impl.hpp"
#include "decode_kernel_avx512.hpp"

namespace hattn::detail::cpu {
namespace {

template <>
struct Isa<xsimd::avx512bw> {
  using B = xsimd::batch<float, xsimd::avx512bw>;
  static constexpr bool kBf16Dot = false;
  static constexpr int kChunkBlock = 4;  // row chunks per value pass: fits the register file
  static B load(const float* p) { return B::load_unaligned(p); }
  static B load(const bfloat16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static B load(const half_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void load_bf16_pairs(const bfloat16_t* p, B& even, B& odd) {
    __m512 e, o;
    avx512::load_bf16_pairs(reinterpret_cast<const std::uint16_t*>(p), e, o);
    even = e;
    odd = o;
  }
  static B reduce_rows(const B* acc) {
    __m512 a[16];
    for (int i = 0; i < 16; ++i) a[i] = acc[i];
    return avx512::reduce16(a);
  }
};

}  // namespace

template void DecodePages::operator()<xsimd::avx512bw>(xsimd::avx512bw, const PageRange&) const;

}  // namespace hattn::detail::cpu
