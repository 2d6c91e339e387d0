#pragma once
// Page summaries, the metadata that scoring reads instead of the keys: per page and KV head the
// element-wise min and max of the keys (Quest's bound) and their mean (PSA's estimate), and a coarse
// level per group of pages so scoring can prune whole groups first (SPIN's two-level metadata).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>

#include "hattn/core/dtype.hpp"
#include "hattn/kv/page_layout.hpp"

namespace hattn {

/// Pages per coarse summary group. 16 pages of 16 tokens = 256 tokens per coarse entry.
constexpr int kPagesPerSummaryGroup = 16;

/// Groups of a sequence of `pages` pages.
constexpr int summary_groups(int pages) noexcept { return (pages + kPagesPerSummaryGroup - 1) / kPagesPerSummaryGroup; }

/// The most groups that `pages` consecutive pages can touch: how many trailing groups a selection of
/// groups must force to keep a local window of that many pages.
constexpr int max_groups_spanned(int pages) noexcept {
  return pages <= 0 ? 0 : (pages + kPagesPerSummaryGroup - 2) / kPagesPerSummaryGroup + 1;
}

/// Groups that two-level scoring (Config::coarse_keep) keeps for a segment of `pages` pages whose rule
/// attends at most `budget_pages`: ceil(keep x budget_pages / 16) ranked groups plus the groups of
/// the sink and local pages, at most every group. A segment keeps every group (and is scored as in
/// one pass) when this equals summary_groups(pages).
inline int kept_summary_groups(int pages, int budget_pages, double keep, int sink_pages, int local_pages) {
  const int groups = summary_groups(pages);
  const double ranked = std::ceil(keep * std::max(budget_pages, 0) / kPagesPerSummaryGroup);
  const double kept = ranked + summary_groups(sink_pages) + max_groups_spanned(local_pages);
  return kept >= groups ? groups : static_cast<int>(kept);
}

/// Recomputes the summary of one page from its first `tokens` keys. Min and max are exact in the KV
/// dtype; the mean is accumulated in fp32 in token order and rounded once to the KV dtype.
/// PagedKVStore keeps the same numbers incrementally, bit for bit.
inline void compute_page_summary(const PageLayout& layout, const std::byte* page, int tokens, std::byte* summary) {
  const DType t = layout.dtype;
  const int dim = layout.head_dim;
  for (int h = 0; h < layout.kv_heads; ++h) {
    for (int d = 0; d < dim; ++d) {
      float lo = std::numeric_limits<float>::infinity();
      float hi = -std::numeric_limits<float>::infinity();
      float sum = 0.0f;
      for (int tok = 0; tok < tokens; ++tok) {
        const float k = load_as_float(page, layout.key_offset(h, tok) + d, t);
        lo = std::min(lo, k);
        hi = std::max(hi, k);
        sum += k;
      }
      if (tokens == 0) lo = hi = 0.0f;
      const float mean = tokens > 0 ? sum / static_cast<float>(tokens) : 0.0f;
      store_from_float(summary, layout.summary_offset(h, 0) + d, t, lo);
      store_from_float(summary, layout.summary_offset(h, 1) + d, t, hi);
      store_from_float(summary, layout.summary_offset(h, 2) + d, t, mean);
    }
  }
}

/// Coarse summary of a group of pages from their fine summaries alone, fp32 [kv_heads][3][head_dim]:
/// min of mins, max of maxes, token-weighted mean of means. `tokens[i]` is the number of valid tokens
/// of `summaries[i]`. For a holder of fine summaries only (e.g. a device cache); min and max equal
/// PagedKVStore::group_summaries() exactly, the mean within one rounding of the KV dtype (the store
/// accumulates its coarse mean from the keys themselves).
inline void compute_group_summary(const PageLayout& layout, std::span<const std::byte* const> summaries,
                                  std::span<const int> tokens, float* out) {
  const int dim = layout.head_dim;
  const DType t = layout.dtype;
  for (int h = 0; h < layout.kv_heads; ++h) {
    float* lo = out + layout.summary_offset(h, 0);
    float* hi = out + layout.summary_offset(h, 1);
    float* mean = out + layout.summary_offset(h, 2);
    std::fill(lo, lo + dim, std::numeric_limits<float>::infinity());
    std::fill(hi, hi + dim, -std::numeric_limits<float>::infinity());
    std::fill(mean, mean + dim, 0.0f);
    int total = 0;
    for (std::size_t p = 0; p < summaries.size(); ++p) {
      if (tokens[p] == 0) continue;
      total += tokens[p];
      for (int d = 0; d < dim; ++d) {
        lo[d] = std::min(lo[d], load_as_float(summaries[p], layout.summary_offset(h, 0) + d, t));
        hi[d] = std::max(hi[d], load_as_float(summaries[p], layout.summary_offset(h, 1) + d, t));
        mean[d] += static_cast<float>(tokens[p]) * load_as_float(summaries[p], layout.summary_offset(h, 2) + d, t);
      }
    }
    for (int d = 0; d < dim; ++d) {
      if (total == 0) lo[d] = hi[d] = 0.0f;
      else mean[d] /= static_cast<float>(total);
    }
  }
}

}  // namespace hattn
