#pragma once
// Definition of DecodePages for one ISA. Included only by the per-ISA source files, each of which
// first specialises Isa<Tag> (its loads, and optionally its q.k dot product) and then instantiates
// DecodePages::operator()<Tag>.
//
// Everything here has internal linkage or depends on Tag: a function compiled with AVX-512 flags must
// never be the copy the linker keeps for the generic path. So no std algorithms and no shared inline
// helpers are called from here; the loops are written out.
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "decode_kernel.hpp"


namespace hattn::detail::cpu {
namespace {

/// The primitives a path provides: `load(const T*)` of one batch of keys or values in fp32 for T in
/// float, half_t, bfloat16_t; `load_bf16_pairs(p, even, odd)`: 2 batches from 2S bf16 values, split
/// by parity; `reduce_rows(acc)`: S accumulators to one batch whose lane i is the sum of acc[i];
/// kChunkBlock (even); kBf16Dot, and when true split_query<D>, dot_bf16<D, NB> and
/// block_dot_bf16<D, NB> (q.k of bf16 keys by VDPBF16PS).
template <class Tag>
struct Isa;

/// Query heads whose accumulators live in registers at once (4 batches; 16 registers on AVX2).
constexpr int kHeadBlock = 4;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLn2 = 0.693147180559945309417f;

template <class Tag>
using Batch = xsimd::batch<float, simd_arch_t<Tag>>;

// Prefetches go to L2 (prefetcht1), not L1: a core has only ~16 L1 fill buffers, and with L1
// prefetches those capped a thread at ~13 lines in flight, far short of what the DRAM latency needs.
// L2 tracks several times more misses. Dev VM (Sapphire Rapids, 2 cores), bf16 at 128K, cold: one
// thread 5.9 -> 10.7 GB/s, two threads 11.5 -> 17.6 GB/s (5%: 10.3 -> 16.7), 2026-12-07; prefetcht2
// was the same within noise, and 4 or 8 pages ahead no better than 2.
constexpr int kPrefetchLocality = 2;

template <std::size_t Bytes>
inline void prefetch_rows(const std::byte* p) {
  for (std::size_t off = 0; off < Bytes; off += 64) __builtin_prefetch(p + off, 0, kPrefetchLocality);
}

inline void prefetch_block(const std::byte* p, std::size_t bytes) {
  for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, kPrefetchLocality);
}

// Logits of one key row against query heads [h0, h0 + NB): logits[j * kMaxPageTokens] = qs_j . k,
// where qs is the query already scaled by scale * log2(e). For bf16 keys (without VDPBF16PS) qs is
// stored in parity order per 2S-wide chunk (its even elements, then its odd ones: decode_range), so
// each key chunk is widened by load_bf16_pairs, two instructions per 2S values, as values are.
template <class Tag, int D, int NB, class T>
inline void row_logits(const T* k, const float* qs, const std::uint16_t* q_bf16, float* logits) {
  if constexpr (Isa<Tag>::kBf16Dot && std::is_same_v<T, bfloat16_t>) {
    Isa<Tag>::template dot_bf16<D, NB>(reinterpret_cast<const std::uint16_t*>(k), q_bf16, logits);
  } else if constexpr (std::is_same_v<T, bfloat16_t>) {
    using B = Batch<Tag>;
    constexpr int S = static_cast<int>(B::size);
    B acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = B(0.0f);
    for (int c = 0; c < D; c += 2 * S) {
      B even, odd;
      Isa<Tag>::load_bf16_pairs(k + c, even, odd);
      for (int j = 0; j < NB; ++j) {
        acc[j] = xsimd::fma(B::load_aligned(qs + j * D + c), even, acc[j]);
        acc[j] = xsimd::fma(B::load_aligned(qs + j * D + c + S), odd, acc[j]);
      }
    }
    for (int j = 0; j < NB; ++j) logits[j * kMaxPageTokens] = xsimd::hadd(acc[j]);
  } else {
    using B = Batch<Tag>;
    constexpr int S = static_cast<int>(B::size);
    B acc[NB];
    for (int j = 0; j < NB; ++j) acc[j] = B(0.0f);
    for (int c = 0; c < D; c += S) {
      const B kc = Isa<Tag>::load(k + c);
      for (int j = 0; j < NB; ++j) acc[j] = xsimd::fma(B::load_aligned(qs + j * D + c), kc, acc[j]);
    }
    for (int j = 0; j < NB; ++j) logits[j * kMaxPageTokens] = xsimd::hadd(acc[j]);
  }
}

// Logits of NB heads against TB = S / NB consecutive key rows at once: the NB x TB accumulators are
// exactly one batch of sums, so one transposing reduction replaces S horizontal adds, and each query
// chunk loaded serves TB rows. acc[j * TB + tb] is head j, row tb, so head j's TB logits are adjacent.
template <class Tag, int D, int NB, class T>
inline void block_logits(const T* k, const float* qs, float* logits) {
  using B = Batch<Tag>;
  constexpr int S = static_cast<int>(B::size);
  constexpr int TB = S / NB;
  static_assert(TB * NB == S);
  B acc[S];
  for (int i = 0; i < S; ++i) acc[i] = B(0.0f);
  if constexpr (std::is_same_v<T, bfloat16_t>) {
    // qs in parity order (row_logits): one chunk of 2S keys is an even and an odd batch.
    for (int c = 0; c < D; c += 2 * S) {
      B qe[NB], qo[NB];
      for (int j = 0; j < NB; ++j) {
        qe[j] = B::load_aligned(qs + j * D + c);
        qo[j] = B::load_aligned(qs + j * D + c + S);
      }
      for (int tb = 0; tb < TB; ++tb) {
        B even, odd;
        Isa<Tag>::load_bf16_pairs(k + static_cast<std::size_t>(tb) * D + c, even, odd);
        for (int j = 0; j < NB; ++j) {
          acc[j * TB + tb] = xsimd::fma(qe[j], even, acc[j * TB + tb]);
          acc[j * TB + tb] = xsimd::fma(qo[j], odd, acc[j * TB + tb]);
        }
      }
    }
  } else {
    for (int c = 0; c < D; c += S) {
      B qc[NB];
      for (int j = 0; j < NB; ++j) qc[j] = B::load_aligned(qs + j * D + c);
      for (int tb = 0; tb < TB; ++tb) {
        const B kc = Isa<Tag>::load(k + static_cast<std::size_t>(tb) * D + c);
        for (int j = 0; j < NB; ++j) acc[j * TB + tb] = xsimd::fma(qc[j], kc, acc[j * TB + tb]);
      }
    }
  }
  alignas(64) float sums[S];
  Isa<Tag>::reduce_rows(acc).store_aligned(sums);
  for (int j = 0; j < NB; ++j)
    for (int tb = 0; tb < TB; ++tb) logits[j * kMaxPageTokens + tb] = sums[j * TB + tb];
}

// acc[h][c .. c + S) += sum over attended tokens t of prob[h][t] * V[t][c .. c + S), for NB heads,
// CB chunks of the row at a time so each broadcast probability serves CB multiply-adds.
// bf16 values are widened by parity (load_bf16_pairs), so for bf16 the accumulators of each 2S-wide
// chunk hold its even elements, then its odd ones; decode_range puts them back in order at the end.
// When `pf` is set, the same token's value row of a later page is prefetched, one row per token.
template <class Tag, int D, int NB, class T>
inline void accumulate_values(const T* v, const float* prob, std::uint64_t mask, int n_tok, float* acc,
                              const std::byte* pf) {
  using B = Batch<Tag>;
  constexpr int S = static_cast<int>(B::size);
  constexpr int CB = Isa<Tag>::kChunkBlock;
  static_assert(D % (S * CB) == 0 && CB % 2 == 0);
  constexpr std::size_t kRowBytes = static_cast<std::size_t>(D) * sizeof(T);
  for (int c = 0; c < D; c += S * CB) {
    B a[NB][CB];
    for (int j = 0; j < NB; ++j)
      for (int b = 0; b < CB; ++b) a[j][b] = B::load_aligned(acc + j * D + c + b * S);
    for (int t = 0; t < n_tok; ++t) {
      if (pf != nullptr && c == 0) prefetch_rows<kRowBytes>(pf + t * kRowBytes);
      if (((mask >> t) & 1u) == 0) continue;
      B vc[CB];
      const T* row = v + static_cast<std::size_t>(t) * D + c;
      if constexpr (std::is_same_v<T, bfloat16_t>) {
        for (int b = 0; b < CB; b += 2) Isa<Tag>::load_bf16_pairs(row + b * S, vc[b], vc[b + 1]);
      } else {
        for (int b = 0; b < CB; ++b) vc[b] = Isa<Tag>::load(row + b * S);
      }
      for (int j = 0; j < NB; ++j) {
        const B p(prob[j * kMaxPageTokens + t]);
        for (int b = 0; b < CB; ++b) a[j][b] = xsimd::fma(p, vc[b], a[j][b]);
      }
    }
    for (int j = 0; j < NB; ++j)
      for (int b = 0; b < CB; ++b) a[j][b].store_aligned(acc + j * D + c + b * S);
  }
}

// Calls f.template operator()<NB>(h0) for head blocks of kHeadBlock and a remainder.
template <class F>
inline void for_head_blocks(int group, F&& f) {
  int h0 = 0;
  for (; h0 + kHeadBlock <= group; h0 += kHeadBlock) f.template operator()<kHeadBlock>(h0);
  switch (group - h0) {
    case 1: f.template operator()<1>(h0); break;
    case 2: f.template operator()<2>(h0); break;
    case 3: f.template operator()<3>(h0); break;
    default: break;
  }
}

template <class Tag, int D, class T>
void decode_range(const PageRange& r) {
  using B = Batch<Tag>;
  constexpr int S = static_cast<int>(B::size);
  static_assert(D % (2 * S) == 0 && kMaxPageTokens % S == 0 && 16 % S == 0);
  const int G = r.group;
  const int P = r.page_size;
  const std::size_t GD = static_cast<std::size_t>(G) * D;

  float* acc = r.work;                          // [G][D]
  float* logits = acc + GD;                     // [G][kMaxPageTokens]
  float* qs = logits + static_cast<std::size_t>(G) * kMaxPageTokens;  // [G][D]
  auto* q_bf16 = reinterpret_cast<std::uint16_t*>(qs + GD);          // [G][2][D]: high, low halves
  float* run_max = qs + 2 * GD;                 // [G]
  float* run_sum = run_max + (G + 15) / 16 * 16;  // [G]

  // The BF16 path's q.k for bf16 keys (VDPBF16PS); every other case widens the keys to fp32, bf16
  // keys by parity, so there the query is stored in parity order per 2S-wide chunk (row_logits).
  constexpr bool kBf16Keys = Isa<Tag>::kBf16Dot && std::is_same_v<T, bfloat16_t>;
  constexpr bool kParityQuery = std::is_same_v<T, bfloat16_t> && !kBf16Keys;
  for (std::size_t i = 0; i < GD; ++i) acc[i] = 0.0f;
  for (std::size_t h = 0; h < static_cast<std::size_t>(G); ++h)
    for (int c = 0; c < D; c += 2 * S)
      for (int s = 0; s < 2 * S; ++s) {
        const int from = kParityQuery ? c + 2 * (s % S) + s / S : c + s;
        qs[h * D + c + s] = r.q[h * D + from] * r.scale_log2;
      }
  for (int h = 0; h < G; ++h) {
    run_max[h] = kNegInf;
    run_sum[h] = 0.0f;
  }
  if constexpr (kBf16Keys) Isa<Tag>::template split_query<D>(qs, G, q_bf16);

  const std::size_t block_bytes = static_cast<std::size_t>(P) * D * sizeof(T);
  constexpr std::size_t kRowBytes = static_cast<std::size_t>(D) * sizeof(T);
  auto page_at = [&](int i) { return r.pages_base + static_cast<std::size_t>(r.pages[i]) * r.page_bytes; };
  // Pages are scattered in the pool and each KV head's block is a separate 2-16 KB run, which the
  // hardware prefetcher only picks up after a few misses, so the kernel asks for the page kAhead on,
  // row by row as it works through the same rows of this page. Issued in one burst at the start of
  // a page (as before), the 128 lines of a bf16 page are far more than the core's fill buffers hold,
  // which likely stalled it until most had landed (not verified with counters). Device host, bf16,
  // 128K tokens, 16 threads, one sweep: one page ahead in a burst 9.5 ms, spread 1/2/4 pages ahead
  // 10.9/8.2/9.2 ms, none 12.4 ms. The host is noisy (its DRAM read ceiling moved by up to 2x
  // between processes of that sweep), so only the gap to "none" and to the burst is clear.
  constexpr int kAhead = 2;
  for (int i = 0; i < kAhead && i < r.n_pages; ++i) {
    prefetch_block(page_at(i) + r.key_offset_bytes, block_bytes);
    prefetch_block(page_at(i) + r.value_offset_bytes, block_bytes);
  }
  for (int i = 0; i < r.n_pages; ++i) {
    const std::byte* page = page_at(i);
    const std::byte* pf_k = nullptr;
    const std::byte* pf_v = nullptr;
    if (i + kAhead < r.n_pages) {
      pf_k = page_at(i + kAhead) + r.key_offset_bytes;
      pf_v = page_at(i + kAhead) + r.value_offset_bytes;
    }
    const int n_tok = i + 1 == r.n_pages ? r.last_page_tokens : P;
    std::uint64_t mask = n_tok >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << n_tok) - 1;
    if (r.token_masks != nullptr) mask &= r.token_masks[i];
    if (mask == 0) continue;
    const T* k = reinterpret_cast<const T*>(page + r.key_offset_bytes);
    const T* v = reinterpret_cast<const T*>(page + r.value_offset_bytes);

    // 1. Logits of every token for every head (base 2), then -inf for the tokens not attended.
    //    Rows past the valid tokens may hold anything; their logits are overwritten below.
    for_head_blocks(G, [&]<int NB>(int h0) {
      const float* qh = qs + static_cast<std::size_t>(h0) * D;
      const std::uint16_t* qb = q_bf16 + static_cast<std::size_t>(h0) * 2 * D;
      float* lh = logits + h0 * kMaxPageTokens;
      const std::byte* pf = h0 == 0 ? pf_k : nullptr;
      auto by_rows = [&] {
        for (int t = 0; t < P; ++t) {
          if (pf != nullptr) prefetch_rows<kRowBytes>(pf + t * kRowBytes);
          if ((mask >> t) & 1u) row_logits<Tag, D, NB>(k + static_cast<std::size_t>(t) * D, qh, qb, lh + t);
        }
      };
      // Nested so that the branch naming block_dot_bf16 is discarded as soon as Tag is known.
      if constexpr (NB == 3) {
        by_rows();
      } else if constexpr (kBf16Keys) {
        constexpr int TB = 16 / NB;
        for (int t = 0; t < P; t += TB) {
          if (pf != nullptr) prefetch_rows<TB * kRowBytes>(pf + t * kRowBytes);
          Isa<Tag>::template block_dot_bf16<D, NB>(reinterpret_cast<const std::uint16_t*>(k + static_cast<std::size_t>(t) * D),
                                                   qb, lh + t);
        }
      } else {
        constexpr int TB = S / NB;
        for (int t = 0; t < P; t += TB) {
          if (pf != nullptr) prefetch_rows<TB * kRowBytes>(pf + t * kRowBytes);
          block_logits<Tag, D, NB>(k + static_cast<std::size_t>(t) * D, qh, lh + t);
        }
      }
    });
    for (int t = 0; t < P; ++t)
      if (((mask >> t) & 1u) == 0)
        for (int h = 0; h < G; ++h) logits[h * kMaxPageTokens + t] = kNegInf;

    // 2. Online softmax, once per page: rescale a head's accumulators only when its max grows.
    for (int h = 0; h < G; ++h) {
      float* row = logits + h * kMaxPageTokens;
      B vmax(kNegInf);
      for (int t = 0; t < P; t += S) vmax = xsimd::max(vmax, B::load_aligned(row + t));
      alignas(64) float lanes[S];
      vmax.store_aligned(lanes);
      float page_max = lanes[0];
      for (int s = 1; s < S; ++s) page_max = lanes[s] > page_max ? lanes[s] : page_max;
      if (page_max > run_max[h]) {
        const float alpha = std::exp2(run_max[h] - page_max);  // 0 on the first page (max was -inf)
        run_sum[h] *= alpha;
        const B va(alpha);
        for (int c = 0; c < D; c += S) (B::load_aligned(acc + h * D + c) * va).store_aligned(acc + h * D + c);
        run_max[h] = page_max;
      }
      const B vm(run_max[h]);
      B vsum(0.0f);
      for (int t = 0; t < P; t += S) {
        const B p = xsimd::exp2(B::load_aligned(row + t) - vm);  // exp2(-inf) = 0 for skipped tokens
        p.store_aligned(row + t);
        vsum += p;
      }
      run_sum[h] += xsimd::hadd(vsum);
    }

    // 3. Values, weighted by the probabilities just computed.
    for_head_blocks(G, [&]<int NB>(int h0) {
      accumulate_values<Tag, D, NB>(v, logits + h0 * kMaxPageTokens, mask, n_tok, acc + static_cast<std::size_t>(h0) * D,
                                    h0 == 0 ? pf_v : nullptr);
    });
  }

  // The one place base 2 becomes natural log: lse = ln(2) * (max2 + log2(sum)).
  for (int h = 0; h < G; ++h) {
    float* out = r.out + static_cast<std::size_t>(h) * D;
    if (run_sum[h] > 0.0f) {
      const float inv = 1.0f / run_sum[h];
      const float* a = acc + static_cast<std::size_t>(h) * D;
      if constexpr (std::is_same_v<T, bfloat16_t>) {
        // Back from [even elements, odd elements] per 2S-wide chunk (accumulate_values).
        for (int c = 0; c < D; c += 2 * S)
          for (int s = 0; s < S; ++s) {
            out[c + 2 * s] = a[c + s] * inv;
            out[c + 2 * s + 1] = a[c + S + s] * inv;
          }
      } else {
        const B vinv(inv);
        for (int c = 0; c < D; c += S) (B::load_aligned(a + c) * vinv).store_unaligned(out + c);
      }
      r.lse[h] = kLn2 * (run_max[h] + std::log2(run_sum[h]));
    } else {
      for (int c = 0; c < D; ++c) out[c] = 0.0f;
      r.lse[h] = kNegInf;
    }
  }
}

template <class Tag, int D>
void decode_range_dtype(const PageRange& r) {
  switch (r.dtype) {
    case DType::kFloat32: decode_range<Tag, D, float>(r); return;
    case DType::kFloat16: decode_range<Tag, D, half_t>(r); return;
    case DType::kBFloat16: decode_range<Tag, D, bfloat16_t>(r); return;
  }
}

}  // namespace

template <class Tag>
void DecodePages::operator()(Tag, const PageRange& r) const {
  // Head dim is a template parameter (it sizes the unrolled row loops); page size and group are not.
  switch (r.head_dim) {
    case 64: decode_range_dtype<Tag, 64>(r); return;
    case 128: decode_range_dtype<Tag, 128>(r); return;
    case 256: decode_range_dtype<Tag, 256>(r); return;
    default: return;  // validated by CpuDecoder before any task starts
  }
}

}  // namespace hattn::detail::cpu
