#pragma once
// Definition of ScoreSummaries for one ISA, included by the per-ISA source files after their Isa<Tag>
// specialisation (decode_kernel_impl.hpp: `load(const T*)` widens one batch of T to fp32). The same
// linkage rule as the decode's: everything here depends on Tag or has internal linkage, and the
// scalar math is the compiler's built-ins, so no copy compiled with wider flags can stand in for the
// generic path's.
#include "decode_kernel_impl.hpp"
#include "score_kernel.hpp"

namespace hattn::detail::cpu {
namespace {

// Why the prefetch: a head's rows of consecutive summaries are a summary apart (6 KB for 8 KV heads
// at dim 128, bf16), each in another 4 KB page, where the hardware prefetchers stop; the widened
// loop then waited on every summary. Dev VM, AVX-512 path, 128K fluxion step: 12.9-15.2 ms without,
// 6.9-7.3 ms with 8 ahead (2, 4 and 16 within the noise of 8).
template <class Tag, class T>
void score_summaries(const SummaryRange& r) {
  using B = Batch<Tag>;
  constexpr int S = static_cast<int>(B::size);
  static_assert(S <= 16, "logits holds 16 summaries per head");
  const int dim = r.head_dim;  // a multiple of 16, so of S
  // A summary's three rows are widened once into these, then read once per query head.
  alignas(64) float rows[3][256];
  const std::size_t offsets[3] = {r.lo, r.hi, r.mean};
  const float log_full = __builtin_logf(static_cast<float>(r.full_tokens));
  const float log_last = __builtin_logf(static_cast<float>(r.last_tokens));
  const float log_group = __builtin_logf(static_cast<float>(r.group));
  auto summary = [&](std::size_t i) {
    return r.base + (r.ids != nullptr ? static_cast<std::size_t>(r.ids[i]) : i) * r.stride;
  };
  constexpr std::size_t kAhead = 8;  // summaries prefetched ahead, into L2 (why: above)
  // The estimate's log-sum-exp over the group runs across summaries, a batch of exp and log per S of
  // them, not per summary: per summary and head, the libm calls had been ~30% of the scoring.
  // logits[g * S + lane] holds head g of summary i0 + lane (group <= kMaxScoreGroup, S <= 16).
  alignas(64) float logits[kMaxScoreGroup * 16];
  for (int k = 0; k < r.group * S; ++k) logits[k] = 0.0f;
  alignas(64) float estimates[S];
  for (std::size_t i0 = 0; i0 < r.n; i0 += S) {
    const int lanes = r.n - i0 < static_cast<std::size_t>(S) ? static_cast<int>(r.n - i0) : S;
    for (int lane = 0; lane < lanes; ++lane) {
      const std::size_t i = i0 + static_cast<std::size_t>(lane);
      if (i + kAhead < r.n) {
        const std::byte* next = summary(i + kAhead);
        for (int row = 0; row < 3; ++row)
          prefetch_block(next + offsets[row] * sizeof(T), static_cast<std::size_t>(dim) * sizeof(T));
      }
      const std::byte* s = summary(i);
      for (int row = 0; row < 3; ++row) {
        const T* src = reinterpret_cast<const T*>(s) + offsets[row];
        for (int c = 0; c < dim; c += S) Isa<Tag>::load(src + c).store_aligned(rows[row] + c);
      }
      float best = kNegInf;
      for (int g = 0; g < r.group; ++g) {
        const float* qg = r.q + static_cast<std::size_t>(g) * dim;
        B bound(0.0f), dot(0.0f);
        for (int c = 0; c < dim; c += S) {
          const B qv = B::load_unaligned(qg + c);
          bound += xsimd::max(qv * B::load_aligned(rows[0] + c), qv * B::load_aligned(rows[1] + c));
          dot = xsimd::fma(qv, B::load_aligned(rows[2] + c), dot);
        }
        const float b = r.scale * xsimd::hadd(bound);
        best = b > best ? b : best;
        logits[g * S + lane] = r.scale * xsimd::hadd(dot);
      }
      r.upper[i] = best;
    }
    // Lanes past `lanes` hold an earlier batch's logits (or zeros): computed, never stored.
    B top(kNegInf), sum(0.0f);
    for (int g = 0; g < r.group; ++g) top = xsimd::max(top, B::load_aligned(logits + g * S));
    for (int g = 0; g < r.group; ++g) sum += xsimd::exp(B::load_aligned(logits + g * S) - top);
    (top + xsimd::log(sum) + B(log_full - log_group)).store_aligned(estimates);
    for (int lane = 0; lane < lanes; ++lane) {
      const std::size_t i = i0 + static_cast<std::size_t>(lane);
      r.estimate[i] = estimates[lane] + (i + 1 == r.n ? log_last - log_full : 0.0f);
    }
  }
}

}  // namespace

template <class Tag>
void ScoreSummaries::operator()(Tag, const SummaryRange& r) const {
  switch (r.dtype) {
    case DType::kFloat32: score_summaries<Tag, float>(r); break;
    case DType::kFloat16: score_summaries<Tag, half_t>(r); break;
    case DType::kBFloat16: score_summaries<Tag, bfloat16_t>(r); break;
  }
}

}  // namespace hattn::detail::cpu
