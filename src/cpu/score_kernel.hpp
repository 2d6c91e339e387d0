#pragma once
// The per-ISA scoring kernel behind cpu_score_pages and cpu_score_groups: the Quest bound and the
// mean-key mass estimate of a run of summaries of one KV head, for the query heads of its GQA group.
// Shaped as the decode kernel is (decode_kernel.hpp): a functor templated on the arch, defined by
// score_kernel_impl.hpp in each per-ISA source file. Internal to src/cpu.
//
// Why per ISA: at 128K tokens a CPU step scores 8192 summaries per KV head (50 MB of bf16 rows per
// layer), and on the baseline SSE2 path that took ~20x the decode of the 5% it selects.
#include <cstddef>

#include "arch.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kv/page_layout.hpp"

namespace hattn::detail::cpu {

/// Query heads per KV head a scoring call takes (hattn/kernels/cpu_select.hpp): its log-sum-exp runs
/// across a batch of summaries (up to 16 on AVX-512) and holds their logits for every head.
constexpr int kMaxScoreGroup = kMaxCpuScoreGroup;

/// Summaries i in [0, n): base + ids[i] * stride (page summaries in the pool's arena) or, without
/// ids, base + i * stride (group summaries, fp32). Each has the head's lo, hi and mean rows at the
/// element offsets given.
struct SummaryRange {
  const std::byte* base = nullptr;
  std::size_t stride = 0;  ///< bytes
  const PageId* ids = nullptr;
  std::size_t n = 0;
  std::size_t lo = 0, hi = 0, mean = 0;  ///< elements from a summary's start
  DType dtype = DType::kBFloat16;
  int head_dim = 128;  ///< 64, 128 or 256 (PageLayout::validate)
  int full_tokens = 1, last_tokens = 1;  ///< tokens under each summary, and under the last one
  const float* q = nullptr;  ///< [group][head_dim]
  int group = 1;
  float scale = 0;
  float* upper = nullptr;     ///< [n] max over the group of scale * sum_d max(q lo, q hi)
  float* estimate = nullptr;  ///< [n] log(tokens) + log(mean over the group of exp(scale * q . mean))
};

struct ScoreSummaries {
  template <class Tag>
  void operator()(Tag, const SummaryRange& range) const;
};

extern template void ScoreSummaries::operator()<xsimd::sse2>(xsimd::sse2, const SummaryRange&) const;
#if HATTN_CPU_HAVE_AVX2
extern template void ScoreSummaries::operator()<xsimd::fma3<xsimd::avx2>>(xsimd::fma3<xsimd::avx2>,
                                                                           const SummaryRange&) const;
#endif
#if HATTN_CPU_HAVE_AVX512
extern template void ScoreSummaries::operator()<xsimd::avx512bw>(xsimd::avx512bw, const SummaryRange&) const;
#endif

}  // namespace hattn::detail::cpu
