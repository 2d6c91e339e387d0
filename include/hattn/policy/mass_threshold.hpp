#pragma once
// PSA: pages are added by descending estimated mass until the estimated attention mass passes a
// threshold, so the budget adapts per token, head and layer. A cap bounds the worst case.
#include <algorithm>
#include <cmath>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class MassThreshold {
 public:
  /// threshold in (0, 1]; max_share caps the pages of a head (1 = no cap).
  explicit MassThreshold(float threshold = 0.95f, double max_share = 0.25) : threshold_(threshold), max_share_(max_share) {
    detail::require(threshold > 0 && threshold <= 1, "MassThreshold", "threshold", threshold, "in (0, 1]");
    detail::require(max_share > 0 && max_share <= 1, "MassThreshold", "max_share", max_share, "in (0, 1]");
  }
  void select(const SelectInputs& in, SelectOutputs& out) {
    for (std::size_t b = 0; b < in.pages_per_row.size(); ++b) {
      const int n = in.pages_per_row[b];
      const int cap = std::clamp(static_cast<int>(std::ceil(max_share_ * n)),
                                 detail::forced_pages(n, in.sink_pages, in.local_pages), n);
      for (int h = 0; h < in.kv_heads; ++h) out.rules[b * in.kv_heads + h] = SegmentRule{cap, threshold_, 1};
    }
  }

 private:
  float threshold_;
  double max_share_;
};
static_assert(BudgetSelector<MassThreshold>);

}  // namespace hattn
