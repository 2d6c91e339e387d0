#pragma once
// A segment's selection under its SegmentRule on the CPU, the one definition the CPU backend and the
// accuracy harness share: top-k or the mass rule over the whole page table (or, with two-level
// scoring, over the pages of the groups whose coarse scores rank highest), then, for a granularity
// of g > 1 pages, the aligned runs of g pages around the chosen ones.
#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kv/page_summary.hpp"
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

/// The rule's positions (ascending) among n = upper.size() entries whose first sink_pages and last
/// local_pages are forced, ranked as rule.rank says, affording one entry per run of g pages beyond
/// the forced ones; no widening.
inline void select_ranked(std::span<const float> upper, std::span<const float> estimate, const SegmentRule& rule,
                          int sink_pages, int local_pages, int g, std::vector<std::int32_t>& out) {
  const int n = static_cast<int>(upper.size());
  const int forced = forced_pages(n, sink_pages, local_pages);
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
}

/// Positions (ascending) `rule` selects from scores over n = upper.size() pages, ranked as rule.rank
/// says. With widening, the
/// budget counts pages after widening: the rule picks one page per run it may afford (the forced
/// pages aside), so coarse heads stay near their budget instead of multiplying it by g.
inline void select_by_rule(std::span<const float> upper, std::span<const float> estimate, const SegmentRule& rule,
                           int sink_pages, int local_pages, bool widen, std::vector<std::int32_t>& out) {
  const int g = widen ? std::max(1, rule.granularity_pages) : 1;
  select_ranked(upper, estimate, rule, sink_pages, local_pages, g, out);
  widen_to_runs(out, g, static_cast<int>(upper.size()));
}

/// Two-level scoring's first level (Config::coarse_keep), as the GPU backend keeps groups: the page
/// positions (ascending) of the kept_summary_groups() groups that rank highest by their coarse scores
/// (cpu_score_groups' group_upper / group_estimate, ranked as rule.rank says; the sink and local
/// groups forced) in a segment of `pages` pages; every position when it keeps every group.
inline std::vector<std::int32_t> kept_group_pages(std::span<const float> group_upper,
                                                  std::span<const float> group_estimate, const SegmentRule& rule,
                                                  double coarse_keep, int pages, int sink_pages, int local_pages) {
  const int groups = summary_groups(pages);
  const int keep = kept_summary_groups(pages, rule.budget_pages, coarse_keep, sink_pages, local_pages);
  std::vector<std::int32_t> kept;
  if (keep >= groups) {
    kept.resize(static_cast<std::size_t>(groups));
    for (int g = 0; g < groups; ++g) kept[static_cast<std::size_t>(g)] = g;
  } else {
    std::vector<float> group_rank(group_upper.begin(), group_upper.end());
    if (rule.rank == PageRank::kBlend)
      for (std::size_t i = 0; i < group_rank.size(); ++i)
        group_rank[i] = group_estimate[i] + kRankBlend * (group_upper[i] - group_estimate[i]);
    cpu_select_top_k(group_rank, keep, summary_groups(sink_pages), max_groups_spanned(local_pages), 0, groups, kept);
  }
  std::vector<std::int32_t> position;
  for (std::int32_t grp : kept)
    for (int i = grp * kPagesPerSummaryGroup; i < std::min(pages, (grp + 1) * kPagesPerSummaryGroup); ++i)
      position.push_back(i);
  return position;
}

/// The second level: the rule of select_by_rule over candidate pages alone (`position` ascending, from
/// kept_group_pages; cand_upper / cand_estimate their page scores), as page positions of a segment of
/// `pages` pages. The candidates' first sink_pages and last local_pages are the segment's own (the
/// sink and local groups are kept), so the forced pages stay forced.
inline void select_among_candidates(std::span<const std::int32_t> position, std::span<const float> cand_upper,
                                    std::span<const float> cand_estimate, const SegmentRule& rule, int pages,
                                    int sink_pages, int local_pages, bool widen, std::vector<std::int32_t>& out) {
  const int g = widen ? std::max(1, rule.granularity_pages) : 1;
  select_ranked(cand_upper, cand_estimate, rule, sink_pages, local_pages, g, out);
  for (std::int32_t& p : out) p = position[static_cast<std::size_t>(p)];
  widen_to_runs(out, g, pages);
}

/// Both levels from the scores of every page (the accuracy harness's replay): the same positions the
/// engine selects scoring only the candidates.
inline void select_two_level(std::span<const float> group_upper, std::span<const float> group_estimate,
                             std::span<const float> upper, std::span<const float> estimate, const SegmentRule& rule,
                             double coarse_keep, int sink_pages, int local_pages, bool widen,
                             std::vector<std::int32_t>& out) {
  const int n = static_cast<int>(upper.size());
  const auto position = kept_group_pages(group_upper, group_estimate, rule, coarse_keep, n, sink_pages, local_pages);
  std::vector<float> cand_upper, cand_estimate;
  for (std::int32_t i : position) {
    cand_upper.push_back(upper[static_cast<std::size_t>(i)]);
    cand_estimate.push_back(estimate[static_cast<std::size_t>(i)]);
  }
  select_among_candidates(position, cand_upper, cand_estimate, rule, n, sink_pages, local_pages, widen, out);
}

}  // namespace hattn::detail
