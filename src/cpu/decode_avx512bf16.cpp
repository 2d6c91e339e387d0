// The AVX-512 BF16 path: the AVX-512 path with q.k of bf16 keys done by VDPBF16PS on the raw key
// bytes, which removes the widening of K (half the conversions of a bf16 page). Compiled with the
// AVX-512 flags plus -mavx512bf16 only.
//
// Precision: VDPBF16PS multiplies bf16 by bf16, so the query (fp32) is split into a bf16 high half
// and a bf16 low half (its rounding residual) and both are dotted with the keys. Each product is
// exact in fp32; what is lost is the low half's own rounding, 2^-9 of a residual already below 2^-9
// of q: a relative error of at most 2^-18 per term of q.k, 2^9 times finer than the bf16 keys
// themselves are stored and about 2^5 times the fp32 path's own rounding over 128 terms. One bf16
// query (no low half) would give 2^-9 per term: up to ~0.1 of logit error on a sink of logit 30,
// which moves softmax weights by 10%; that is why the low half is kept.
#include <immintrin.h>

#include "decode_kernel_impl.hpp"
#include "decode_kernel_avx512.hpp"

namespace hattn::detail::cpu {
namespace {

template <>
struct Isa<avx512bf16> : avx512::IsaCommon {
  static constexpr bool kBf16Dot = true;

  // q_bf16[h] = [high halves: D][low halves: D], in the order of the key elements, so pair i of a
  // key vector meets pair i of the query.
  template <int D>
  static void split_query(const float* qs, int group, std::uint16_t* q_bf16) {
    for (int h = 0; h < group; ++h) {
      const float* q = qs + static_cast<std::size_t>(h) * D;
      std::uint16_t* hi = q_bf16 + static_cast<std::size_t>(h) * 2 * D;
      std::uint16_t* lo = hi + D;
      for (int c = 0; c < D; c += 32) {
        const __m512 a = _mm512_load_ps(q + c);
        const __m512 b = _mm512_load_ps(q + c + 16);
        const __m512i h16 = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // [a | b], rounded
        const __m512 ra = _mm512_sub_ps(a, widen(_mm512_castsi512_si256(h16)));
        const __m512 rb = _mm512_sub_ps(b, widen(_mm512_extracti64x4_epi64(h16, 1)));
        const __m512i l16 = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(rb, ra));
        _mm512_store_si512(reinterpret_cast<__m512i*>(hi + c), h16);
        _mm512_store_si512(reinterpret_cast<__m512i*>(lo + c), l16);
      }
    }
  }

  template <int D, int NB>
  static void dot_bf16(const std::uint16_t* k, const std::uint16_t* q_bf16, float* logits) {
    __m512 acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 32) {
      const __m512bh kc = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + c));
      for (int j = 0; j < NB; ++j) {
        const std::uint16_t* q = q_bf16 + static_cast<std::size_t>(j) * 2 * D;
        acc[j] = _mm512_dpbf16_ps(acc[j], kc, reinterpret_cast<__m512bh>(_mm512_load_si512(q + c)));
        acc[j] = _mm512_dpbf16_ps(acc[j], kc, reinterpret_cast<__m512bh>(_mm512_load_si512(q + D + c)));
      }
    }
    for (int j = 0; j < NB; ++j) logits[j * kMaxPageTokens] = _mm512_reduce_add_ps(acc[j]);
  }

  // NB heads (1, 2 or 4) against TB = 16 / NB consecutive key rows: the 16 accumulators reduce with
  // one transposing tree, and acc[j * TB + t] puts head j's TB logits in adjacent lanes.
  template <int D, int NB>
  static void block_dot_bf16(const std::uint16_t* k, const std::uint16_t* q_bf16, float* logits) {
    constexpr int TB = 16 / NB;
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int c = 0; c < D; c += 32) {
      __m512bh hi[NB], lo[NB];
      for (int j = 0; j < NB; ++j) {
        const std::uint16_t* q = q_bf16 + static_cast<std::size_t>(j) * 2 * D;
        hi[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(q + c));
        lo[j] = reinterpret_cast<__m512bh>(_mm512_load_si512(q + D + c));
      }
      for (int t = 0; t < TB; ++t) {
        const __m512bh kc = reinterpret_cast<__m512bh>(_mm512_loadu_si512(k + static_cast<std::size_t>(t) * D + c));
        for (int j = 0; j < NB; ++j) {
          acc[j * TB + t] = _mm512_dpbf16_ps(acc[j * TB + t], kc, hi[j]);
          acc[j * TB + t] = _mm512_dpbf16_ps(acc[j * TB + t], kc, lo[j]);
        }
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, avx512::reduce16(acc));
    for (int j = 0; j < NB; ++j)
      for (int t = 0; t < TB; ++t) logits[j * kMaxPageTokens + t] = sums[j * TB + t];
  }
};

}  // namespace

template void DecodePages::operator()<avx512bf16>(avx512bf16, const PageRange&) const;

}  // namespace hattn::detail::cpu
