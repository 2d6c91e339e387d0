// Two-level scoring (hattn/kernels/cuda_two_level.hpp): the four launches, built from one
// description so that the engine, the benchmark and the tests run the same pipeline.
#include "hattn/core/error.hpp"
#include "hattn/kernels/cuda_two_level.hpp"
#include "hattn/kv/page_summary.hpp"

namespace hattn::cuda {

TwoLevelStages two_level_stages(const TwoLevelScoreParams& p) {
  constexpr const char* kWhere = "two_level_stages";
  const ScoreParams& sp = p.pages;
  hattn::detail::require(sp.kept_groups == nullptr && sp.position_of == nullptr && sp.candidates == 0, kWhere,
                         "pages.kept_groups/position_of/candidates", "set", "unset (they come from the group level)");
  hattn::detail::require(p.group_table && p.group_indptr && p.group_summaries && p.group_upper && p.group_budget &&
                             p.kept && p.kept_count && p.position_of,
                         kWhere, "pointers", "null", "all set (first_group and group_estimate may be null)");
  hattn::detail::require(sp.blended == nullptr || p.group_estimate != nullptr, kWhere, "group_estimate", "null",
                         "set where pages.blended ranks by the blend");
  hattn::detail::require(p.sink_pages >= 0, kWhere, "sink_pages", p.sink_pages, ">= 0");
  hattn::detail::require(p.local_pages >= 0, kWhere, "local_pages", p.local_pages, ">= 0");
  TwoLevelStages t;

  GroupSummaryParams& g = t.rebuild;
  g.summaries = sp.summaries;
  g.page_table = sp.page_table;
  g.page_indptr = sp.page_indptr;
  g.seq_len = sp.seq_len;
  g.group_table = p.group_table;
  g.group_indptr = p.group_indptr;
  g.first_group = p.first_group;
  g.batch = sp.batch;
  g.kv_heads = sp.kv_heads;
  g.head_dim = sp.head_dim;
  g.page_size = sp.page_size;
  g.dtype = sp.dtype;
  g.group_summaries = p.group_summaries;

  // The coarse pass is the page launch over the group summaries: groups as pages of 16x the tokens.
  ScoreParams& c = t.coarse;
  c = sp;
  c.summaries = p.group_summaries;
  c.dtype = DType::kFloat32;
  c.page_table = p.group_table;
  c.page_indptr = p.group_indptr;
  c.page_size = sp.page_size * kPagesPerSummaryGroup;
  c.upper = p.group_upper;
  c.estimate = sp.blended ? p.group_estimate : nullptr;

  SelectParams& k = t.keep;
  k.scores = p.group_upper;
  k.page_indptr = p.group_indptr;
  k.batch = sp.batch;
  k.kv_heads = sp.kv_heads;
  k.budget_pages = p.group_budget;
  k.sink_pages = summary_groups(p.sink_pages);
  k.local_pages = max_groups_spanned(p.local_pages);
  k.selected = p.kept;
  k.selected_count = p.kept_count;
  k.max_entries = p.max_groups;
  k.inputs_ready = sp.inputs_ready;

  ScoreParams& f = t.fine;
  f = sp;
  f.kept_groups = p.kept;
  f.kept_count = p.kept_count;
  f.group_indptr = p.group_indptr;
  f.candidates = p.candidates;
  f.position_of = p.position_of;
  return t;
}

void launch_score_two_level(const TwoLevelScoreParams& p, Stream stream) {
  if (p.pages.batch == 0) return;
  const TwoLevelStages t = two_level_stages(p);
  if (p.rebuild_groups) launch_build_group_summaries(t.rebuild, stream);
  launch_score_pages(t.coarse, stream);
  launch_select_pages(t.keep, stream);
  launch_score_pages(t.fine, stream);
}

}  // namespace hattn::cuda
