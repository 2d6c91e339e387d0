#pragma once
// Pieces both AVX-512 paths share (decode_avx512.cpp, decode_avx512bf16.cpp). Included only by those
// two files, after <immintrin.h>, so everything here is compiled with AVX-512 flags and has internal
// linkage: no copy of it can end up in the generic path.
#include <immintrin.h>

#include <cstdint>

#include "decode_kernel.hpp"

namespace hattn::detail::cpu {
namespace {
namespace avx512 {

// Sixteen accumulators to one vector whose lane i is the sum of acc[i]'s lanes: a transposing tree of
// 45 shuffles and adds, against 16 separate horizontal reductions (~8 dependent steps each). xsimd 8.1
// has haddp for this but its AVX-512 version puts the sums in the wrong lanes (every group > 1 case
// failed on the Sapphire Rapids host, 2026-11-23).
inline __m512 reduce16(const __m512* acc) {
  __m512 pair[8];  // per 128-bit lane: a(0+2), b(0+2), a(1+3), b(1+3) of rows a = 2k, b = 2k + 1
  for (int k = 0; k < 8; ++k)
    pair[k] = _mm512_add_ps(_mm512_unpacklo_ps(acc[2 * k], acc[2 * k + 1]), _mm512_unpackhi_ps(acc[2 * k], acc[2 * k + 1]));
  __m512 quad[4];  // per 128-bit lane: the lane's sum of rows 4m, 4m + 1, 4m + 2, 4m + 3
  for (int m = 0; m < 4; ++m) {
    const __m512d a = _mm512_castps_pd(pair[2 * m]), b = _mm512_castps_pd(pair[2 * m + 1]);
    quad[m] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // 128-bit lanes: [q0 L0+L1, q0 L2+L3, q1 L0+L1, q1 L2+L3], then the same for q2, q3.
  const __m512 h01 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88), _mm512_shuffle_f32x4(quad[0], quad[1], 0xdd));
  const __m512 h23 = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88), _mm512_shuffle_f32x4(quad[2], quad[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(h01, h23, 0x88), _mm512_shuffle_f32x4(h01, h23, 0xdd));
}

// Sixteen fp32 values from 32 bf16 ones, split by parity: a bf16 is the high half of an fp32, so the
// even elements are the dwords shifted left and the odd ones the dwords with the low half cleared.
// One single-uop instruction per 16 values, against a widening shuffle plus a shift.
inline void load_bf16_pairs(const std::uint16_t* p, __m512& even, __m512& odd) {
  const __m512i w = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// The primitives of Isa<Tag> (decode_kernel_impl.hpp) that both AVX-512 paths have alike: loads in
// fp32 from every KV dtype, the parity split of bf16 rows and the 16-accumulator reduction. Each path
// derives its Isa specialisation from this and adds how it computes q.k.
struct IsaCommon {
  using B = xsimd::batch<float, xsimd::avx512bw>;
  static constexpr int kChunkBlock = 4;  // row chunks per value pass: fits the register file
  static __m512 widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }
  static B load(const float* p) { return B::load_unaligned(p); }
  static B load(const bfloat16_t* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
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

}  // namespace avx512
}  // namespace
}  // namespace hattn::detail::cpu
