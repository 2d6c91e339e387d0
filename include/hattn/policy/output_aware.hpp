#pragma once
// Fluxion's granularity-budget selector: each head gets the pages its output needs, not a fixed k.
// Per head, the predictor's expected share (what the mass rule needed in recent steps) sets a cap;
// caps are scaled to the layer's average budget, and what local heads leave unused goes to heads that
// need more. Within its cap a head stops as soon as the estimated mass passes the threshold; pages
// are ranked by the blend of bound and estimate (PageRank::kBlend), except for heads the predictor
// calls retrieval, which rank by the Quest bound (PageRank::kBound); diffuse heads are selected in
// coarser aligned runs of pages. Every field it sets is honoured by both backends (one threshold per
// layer, rank per segment), so the CPU and GPU select alike.
#include <algorithm>
#include <cmath>
#include <ostream>
#include <utility>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class OutputAware {
 public:
  struct Tuning {
    /// Estimated-mass threshold of the per-head rule. The estimate (log tokens + q.mean key) is Jensen's
    /// lower bound of a page's mass and is far too low for a page whose mass sits in a few tokens:
    /// on the head zoo (Llama, 8K, 5%, CPU backend) a page holding the 1-8-token end of a needle
    /// that straddles a page boundary carried 7-35% of the exact mass but under 0.3% of the estimate,
    /// so at 0.98 the rule stopped right after the needle's main page and missed the rest (13 of 51
    /// needles in `hattn-eval --quick`). At 0.999 the estimated remainder a head may leave is 20x
    /// smaller; heads whose estimate is spread out run to their cap (top-k within it), heads whose
    /// mass sits in the sinks and window still stop early and are learned as local.
    float mass_threshold = 0.999f;
    /// Rank of heads the predictor calls retrieval: the Quest bound keeps a page holding a few needle
    /// tokens near the top (bound rank <= 12 for every needle page on the zoo at 8K), where the blend,
    /// 90% estimate, put it at rank 7-61, beyond caps of 5-29 pages.
    PageRank retrieval_rank = PageRank::kBound;
    /// Headroom over the predicted need, so a head whose query drifts is not cut at its last count.
    float margin = 1.5f;
    friend bool operator==(const Tuning&, const Tuning&) = default;
    friend std::ostream& operator<<(std::ostream& os, const Tuning& t) {
      return os << "OutputAware::Tuning{mass_threshold " << t.mass_threshold << ", margin " << t.margin
                << ", retrieval_rank " << (t.retrieval_rank == PageRank::kBound ? "bound" : "blend") << "}";
    }
  };

  OutputAware() = default;
  explicit OutputAware(Tuning t) : tuning_(t) {
    detail::require(t.mass_threshold > 0 && t.mass_threshold <= 1, "OutputAware", "mass_threshold", t.mass_threshold,
                    "in (0, 1]");
    detail::require(t.margin >= 1, "OutputAware", "margin", t.margin, ">= 1");
  }

  void select(const SelectInputs& in, SelectOutputs& out) {
    need_.resize(static_cast<std::size_t>(in.kv_heads));
    cap_.resize(static_cast<std::size_t>(in.kv_heads));
    extra_.resize(static_cast<std::size_t>(in.kv_heads));
    for (std::size_t b = 0; b < in.pages_per_row.size(); ++b) {
      const int n = in.pages_per_row[b];
      const int forced = detail::forced_pages(n, in.sink_pages, in.local_pages);
      const double total = std::max<double>(in.avg_budget * n * in.kv_heads, static_cast<double>(forced) * in.kv_heads);
      double sum_need = 0;
      for (int h = 0; h < in.kv_heads; ++h) {
        const HeadAdvice& a = in.advice[h];
        double need = a.expected_share < 0 ? in.avg_budget * n : a.expected_share * tuning_.margin * n;
        if (a.head_class == HeadClass::kLocal) need = forced + 1;
        need_[h] = std::clamp(need, static_cast<double>(forced), static_cast<double>(n));
        sum_need += need_[h];
      }
      // Scale the non-forced part of every head so the layer stays within its average budget; when
      // the heads need less, the rest is shared out in proportion to need (the mass rule still stops
      // each head early, so unused cap costs nothing).
      const double free_total = total - static_cast<double>(forced) * in.kv_heads;
      const double free_need = sum_need - static_cast<double>(forced) * in.kv_heads;
      const double factor = free_need > 0 ? free_total / free_need : 0.0;
      // Whole pages by largest remainder, so the layer never takes more than its average budget
      // (rounding every head up took up to one page per head more: used 0.0508 at 5% on 8K).
      const int free_pages = static_cast<int>(std::floor(free_total + 1e-9));
      int given = 0;
      for (int h = 0; h < in.kv_heads; ++h) {
        const double extra = free_need > 0 ? (need_[h] - forced) * factor : free_total / in.kv_heads;
        extra_[h] = {extra, h};
        cap_[h] = std::clamp(forced + static_cast<int>(std::floor(extra)), forced, n);
        given += cap_[h] - forced;
      }
      std::sort(extra_.begin(), extra_.end(), [](const auto& x, const auto& y) {
        const double fx = x.first - std::floor(x.first), fy = y.first - std::floor(y.first);
        return fx > fy || (fx == fy && x.second < y.second);
      });
      for (const auto& [extra, h] : extra_) {
        if (given >= free_pages) break;
        if (cap_[h] < n) ++cap_[h], ++given;
      }
      for (int h = 0; h < in.kv_heads; ++h) {
        const HeadAdvice& a = in.advice[h];
        const PageRank rank = a.head_class == HeadClass::kRetrieval ? tuning_.retrieval_rank : PageRank::kBlend;
        out.rules[b * in.kv_heads + h] =
            SegmentRule{cap_[h], tuning_.mass_threshold, std::max(1, a.granularity_pages), rank};
      }
    }
  }

  const Tuning& tuning() const noexcept { return tuning_; }

 private:
  Tuning tuning_{};
  std::vector<double> need_;
  std::vector<int> cap_;
  std::vector<std::pair<double, int>> extra_;  // (non-forced pages before rounding, head)
};
static_assert(BudgetSelector<OutputAware>);

}  // namespace hattn
