#pragma once
// The baseline every paper beats: top-k pages by the Quest bound at a fixed share of each request.
#include <algorithm>
#include <cmath>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class FixedBudget {
 public:
  /// share of pages per head, in (0, 1]; 0 = take the config's avg_budget.
  explicit FixedBudget(double share = 0.0) : share_(share) {
    detail::require(share >= 0 && share <= 1, "FixedBudget", "share", share, "in (0, 1] (or 0 for the config's)");
  }
  void select(const SelectInputs& in, SelectOutputs& out) {
    const double share = share_ > 0 ? share_ : in.avg_budget;
    for (std::size_t b = 0; b < in.pages_per_row.size(); ++b) {
      const int n = in.pages_per_row[b];
      const int k = std::clamp(static_cast<int>(std::ceil(share * n)), detail::forced_pages(n, in.sink_pages, in.local_pages), n);
      for (int h = 0; h < in.kv_heads; ++h) out.rules[b * in.kv_heads + h] = SegmentRule{k, 0.0f, 1};
    }
  }
  double share() const noexcept { return share_; }

 private:
  double share_;
};
static_assert(BudgetSelector<FixedBudget>);

}  // namespace hattn
