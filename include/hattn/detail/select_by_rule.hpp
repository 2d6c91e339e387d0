#pragma once
// A segment's selection under its SegmentRule on the CPU, the one definition the CPU backend and the
// accuracy harness share: top-k or the mass rule over the whole page table, then, for a granularity
// of g > 1 pages, the aligned runs of g pages around the chosen ones.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/kernels/cpu_select.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn::detail {

/// Widens each selected position to its aligned run of `g` positions inside [0, n); ascending.
inline void widen_to_runs(std::vector<std::int32_t>& positions, int g, int n) {
  if (g <= 1 || positions.empty()) return;
  std::vector<std::int32_t> wide;
  wide.reserve(positions.size() * static_cast<std::size_t>(g));
  for (std::int32_t p : positions) {
    const int run = p / g * g;
    for (int i = run; i < std::min(run + g, n); ++i) wide.push_back(i);
  }
  std::sort(wide.begin(), wide.end());
  wide.erase(std::unique(wide.begin(), wide.end()), wide.end());
  positions.swap(wide);
}

/// Positions (ascending) `rule` selects from scores over n = upper.size() pages, ranked as rule.rank
/// says. With widening, the
/// budget counts pages after widening: the rule picks one page per run it may afford (the forced
/// pages aside), so coarse heads stay near their budget instead of multiplying it by g.
inline void select_by_rule(std::span<const float> upper, std::span<const float> estimate, const SegmentRule& rule,
                           int sink_pages, int local_pages, bool widen, std::vector<std::int32_t>& out) {
  const int n = static_cast<int>(upper.size());
  const int forced = forced_pages(n, sink_pages, local_pages);
  const int g = widen ? std::max(1, rule.granularity_pages) : 1;
  // Pages beyond the forced ones, in runs of g.
  const int extra = (std::max(0, rule.budget_pages - forced) + g - 1) / g;
  std::vector<float> blend;
  if (rule.rank == PageRank::kBlend) {
    blend.resize(upper.size());
    for (std::size_t i = 0; i < blend.size(); ++i) blend[i] = estimate[i] + kRankBlend * (upper[i] - estimate[i]);
  }
  const std::span<const float> rank = rule.rank == PageRank::kBlend ? std::span<const float>(blend) : upper;
  if (rule.mass_threshold > 0)
    cpu_select_mass(rank, estimate, rule.mass_threshold, extra, sink_pages, local_pages, 0, n, out);
  else
    cpu_select_top_k(rank, forced + extra, sink_pages, local_pages, 0, n, out);
  widen_to_runs(out, g, n);
}

}  // namespace hattn::detail
