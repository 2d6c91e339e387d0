#pragma once
// Two-level scoring on the GPU (SPIN's coarse level, DESIGN.md step 1): the groups of
// kPagesPerSummaryGroup pages are scored from their summaries first, the best groups of each
// (request, KV head) segment are kept, and only their pages are scored. One description of the
// pipeline serves the engine, the benchmark and the tests; `two_level_stages` spells it out as the
// four launches it runs, for callers that time or inspect a stage alone.
#include <cstdint>

#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

struct TwoLevelScoreParams {
  /// The fine pass, set as for a one-pass launch_score_pages over the pages (q, page summaries and
  /// tables, shapes, blend), except that `upper` / `estimate` hold batch * kv_heads * candidates
  /// entries (candidate segments) and the kept_groups .. position_of fields are left unset: they come
  /// from the fields below.
  ScoreParams pages;
  /// The group level: group ids of request b at group_table[group_indptr[b] ..), and the fp32 group
  /// summaries they index (GroupSummaryParams).
  const std::int32_t* group_table = nullptr;
  const std::int32_t* group_indptr = nullptr;
  float* group_summaries = nullptr;
  /// Rebuild the group summaries from groups >= first_group[b] (nullptr: all) before scoring; false
  /// when they are current (a benchmark that built them once).
  bool rebuild_groups = true;
  const std::int32_t* first_group = nullptr;
  /// Coarse scores, [batch * kv_heads] group segments (as ScoreParams lays out pages); the estimate
  /// is needed only where pages.blended ranks groups by the blend.
  float* group_upper = nullptr;
  float* group_estimate = nullptr;
  /// Groups kept per segment, the sink and local groups included ([batch * kv_heads], device); the
  /// sink and local groups are those holding the first `sink_pages` and last `local_pages` pages.
  const std::int32_t* group_budget = nullptr;
  int sink_pages = 1, local_pages = 1;
  /// The longest group segment (SelectParams::max_entries; 0 = unknown, the general kernel).
  int max_groups = 0;
  std::int32_t* kept = nullptr;        ///< out, group positions at the group segments' offsets
  std::int32_t* kept_count = nullptr;  ///< out, [batch * kv_heads]
  /// Entries per candidate segment: at least the largest group budget x kPagesPerSummaryGroup.
  int candidates = 0;
  std::int32_t* position_of = nullptr;  ///< out, [batch * kv_heads * candidates] (ScoreParams::position_of)
  /// Profiling, fused kernel only (launch_select_two_level): %globaltimer ns at its phases, indexed
  /// by TwoLevelMark, reduced over blocks (earliest or latest, as named); the caller sets the
  /// earliest marks to ~0 and the latest to 0 before the launch. nullptr: off.
  unsigned long long* phase_ns = nullptr;
};

enum TwoLevelMark : int {
  kTwoLevelEarliestStart,        ///< first block running (before its wait on the coarse scores)
  kTwoLevelLatestWaited,         ///< last block past its wait: the coarse pass done
  kTwoLevelLatestKept,           ///< last block done keeping groups
  kTwoLevelLatestScored,         ///< last block done scoring its candidates
  kTwoLevelLatestSelectLoaded,   ///< last selecting block done loading the scores
  kTwoLevelLatestSelected,       ///< last selection written
  kTwoLevelMarks
};

/// The four launches of two-level scoring, in stream order: the group summaries' rebuild, the coarse
/// scores, the group selection, the fine scores of the kept groups' pages.
struct TwoLevelStages {
  GroupSummaryParams rebuild;
  ScoreParams coarse;
  SelectParams keep;
  ScoreParams fine;
};

TwoLevelStages two_level_stages(const TwoLevelScoreParams& p);

/// Runs the stages (the rebuild only where p.rebuild_groups). The candidates' scores land in
/// p.pages.upper / estimate; select among them with SelectParams::position_of = p.position_of and
/// candidates = p.candidates.
void launch_score_two_level(const TwoLevelScoreParams& p, Stream stream);

/// Bounds of the fused two-level selection (launch_select_two_level): groups of a request and
/// candidates of a segment, each staged in one block's shared memory.
inline constexpr int kFusedMaxGroups = 4096;
inline constexpr int kFusedMaxCandidates = 8192;

/// Two-level scoring and the selection among its candidates: what launch_score_two_level followed by
/// launch_select_pages(select) computes, the same positions, scores and kept groups. `select` is that
/// selection's description (scores = p.pages.upper, position_of = p.position_of, candidates =
/// p.candidates, the same batch, heads and page_indptr). Where it is a top-k (mass_threshold 0) with
/// a workspace (select_workspace_bytes, zeroed once) and p.max_groups <= kFusedMaxGroups,
/// p.candidates <= kFusedMaxCandidates, it runs as two kernels after the optional rebuild: the coarse
/// scores, then one kernel in which every block of a (request, KV head) segment keeps the groups, scores
/// its share of their pages, and the last block of the segment to finish selects the pages. Otherwise
/// it runs the staged launches.
void launch_select_two_level(const TwoLevelScoreParams& p, const SelectParams& select, Stream stream);

/// Whether launch_select_two_level(p, select) runs the fused kernel (true) or the staged launches.
bool select_two_level_fuses(const TwoLevelScoreParams& p, const SelectParams& select);

}  // namespace hattn::cuda
