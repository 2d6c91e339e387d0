#pragma once
// How a segment's rule is shared between the two sides: the forced pages (sinks and local window)
// stay with whoever holds them, the rest of the budget follows the share of pages each side holds.
#include <algorithm>
#include <cmath>

#include "hattn/policy/concepts.hpp"

namespace hattn::detail {

/// Pages of the rule's budget that the CPU gets for a range of `cpu_pages` out of `n` pages.
inline int cpu_budget(const SegmentRule& rule, int n, int forced, int cpu_pages) {
  if (cpu_pages <= 0) return 0;
  if (cpu_pages >= n) return rule.budget_pages;
  const int free_budget = std::max(0, rule.budget_pages - forced);
  const double share = static_cast<double>(cpu_pages) / std::max(1, n - forced);
  return std::clamp(static_cast<int>(std::lround(free_budget * share)), 0, cpu_pages);
}

/// The GPU keeps the rest, forced pages included.
inline int gpu_budget(const SegmentRule& rule, int n, int forced, int cpu_pages) {
  return std::max(0, rule.budget_pages - cpu_budget(rule, n, forced, cpu_pages));
}

}  // namespace hattn::detail
