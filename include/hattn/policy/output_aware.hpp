#pragma once
// Fluxion's granularity-budget selector: each head gets the pages its output needs, not a fixed k.
// Per head, the predictor's expected share (what the mass rule needed in recent steps) sets a cap;
// caps are scaled to the layer's average budget, and what local heads leave unused goes to heads that
// need more. Within its cap a head stops as soon as the estimated mass passes the threshold, pages
// are ranked by the blend of bound and estimate (PageRank::kBlend), and diffuse heads are selected in
// coarser aligned runs of pages.
#include <algorithm>
#include <cmath>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class OutputAware {
 public:
  struct Tuning {
    /// Estimated-mass threshold of the per-head rule.
    float mass_threshold = 0.98f;
    /// Headroom over the predicted need, so a head whose query drifts is not cut at its last count.
    float margin = 1.5f;
    friend bool operator==(const Tuning&, const Tuning&) = default;
  };

  OutputAware() = default;
  explicit OutputAware(Tuning t) : tuning_(t) {
    detail::require(t.mass_threshold > 0 && t.mass_threshold <= 1, "OutputAware", "mass_threshold", t.mass_threshold,
                    "in (0, 1]");
    detail::require(t.margin >= 1, "OutputAware", "margin", t.margin, ">= 1");
  }

  void select(const SelectInputs& in, SelectOutputs& out) {
    need_.resize(static_cast<std::size_t>(in.kv_heads));
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
      for (int h = 0; h < in.kv_heads; ++h) {
        const double extra = free_need > 0 ? (need_[h] - forced) * factor : free_total / in.kv_heads;
        const int cap = std::clamp(static_cast<int>(std::ceil(forced + extra)), forced, n);
        out.rules[b * in.kv_heads + h] = SegmentRule{cap, tuning_.mass_threshold,
                                                     std::max(1, in.advice[h].granularity_pages), PageRank::kBlend};
      }
    }
  }

  const Tuning& tuning() const noexcept { return tuning_; }

 private:
  Tuning tuning_{};
  std::vector<double> need_;
};
static_assert(BudgetSelector<OutputAware>);

}  // namespace hattn
