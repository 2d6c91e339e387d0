#pragma once
// GPU page scoring from page summaries, for a ragged batch (DESIGN.md step 1).
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/kv/page_summary.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Scores live in one buffer of segments, one segment per (request b, KV head h), in the order
/// s = b * kv_heads + h; segment s starts at page_indptr[b] * kv_heads + h * n_b (n_b = pages of b)
/// and has n_b entries, one per page position. Selection outputs use the same offsets.
struct ScoreParams {
  const float* q = nullptr;              ///< [batch][q_heads][head_dim] fp32, device
  const void* summaries = nullptr;       ///< [pool_pages][kv_heads][3][head_dim] KV dtype (min, max, mean), device
  const std::int32_t* page_table = nullptr;   ///< page ids of request b at [page_indptr[b], page_indptr[b + 1])
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1]
  const std::int32_t* seq_len = nullptr;      ///< [batch] tokens
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  DType dtype = DType::kBFloat16;
  float scale = 0;
  /// Quest bound, max over the group's query heads (see cpu_score_pages); nullptr skips it and
  /// its min/max summary rows (a top-k step that ranks by the estimate reads a third less).
  float* upper = nullptr;
  /// Log estimated mass of the page (see cpu_score_pages); nullptr skips it and the mean row.
  float* estimate = nullptr;
  /// Optional [batch * kv_heads], nonzero where segment s ranks by the blend (PageRank::kBlend): its
  /// `upper` entries get estimate + blend x (bound - estimate) instead of the bound, so one selection
  /// launch serves a layer whose segments rank differently. Needs upper and estimate.
  const std::int32_t* blended = nullptr;
  float blend = 0.0f;

  /// Two-level scoring (SPIN's coarse level prunes groups of pages first). The coarse pass is this
  /// same launch over group summaries (launch_build_group_summaries): `summaries` the fp32 group
  /// summaries, `dtype` kFloat32, `page_table` / `page_indptr` the group table, `page_size` the tokens
  /// of a group. A selection over its scores (launch_select_pages, group positions) picks the groups
  /// to keep. The fine pass then sets the three fields below and scores only the pages of the kept
  /// groups: segment s = b * kv_heads + h gets `candidates` entries at s * candidates, the pages of its
  /// kept groups in ascending page position; `position_of` receives each entry's page position, -1 for
  /// padding (whose scores are -inf). Selecting over those entries with SelectParams::position_of
  /// yields page positions again.
  const std::int32_t* kept_groups = nullptr;   ///< group positions, at the group segments' offsets
  const std::int32_t* kept_count = nullptr;    ///< [batch * kv_heads] groups kept per segment
  const std::int32_t* group_indptr = nullptr;  ///< [batch + 1] groups of request b (its group segments)
  int candidates = 0;  ///< entries per segment, >= kept groups x kPagesPerSummaryGroup (else a device trap)
  std::int32_t* position_of = nullptr;  ///< out, [batch * kv_heads * candidates]
  /// The caller's inputs (q, page and group tables, indptrs, lengths) were complete before the first
  /// kernel of this chain of hattn launches began: a copy, a host function or an event wait comes
  /// before it, or a kernel that does not trigger programmatic dependents early. Then the kernel
  /// reads them while the kernel before it finishes (cuda/detail/pdl.cuh); false (the default) reads
  /// nothing before the kernel before it has completed. The engine sets it (its metadata copy heads
  /// every chain).
  bool inputs_ready = false;
};

void launch_score_pages(const ScoreParams& p, Stream stream);

/// Coarse summaries of groups of kPagesPerSummaryGroup pages, rebuilt on the device from the fine
/// ones: min of mins, max of maxes, token-weighted mean of means, fp32 [kv_heads][3][head_dim] per
/// group; the same numbers as compute_group_summary on the host. Group g of request b covers its pages
/// [16 g, 16 g + 16) and is stored at group_summaries[group_table[group_indptr[b] + g]].
struct GroupSummaryParams {
  const void* summaries = nullptr;            ///< fine, [pool_pages][kv_heads][3][head_dim] KV dtype, device
  const std::int32_t* page_table = nullptr;   ///< as in ScoreParams
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1]
  const std::int32_t* seq_len = nullptr;      ///< [batch] tokens
  const std::int32_t* group_table = nullptr;  ///< group summary ids of request b at [group_indptr[b], group_indptr[b + 1])
  const std::int32_t* group_indptr = nullptr; ///< [batch + 1]; request b has ceil(pages / 16) groups
  /// Optional [batch]: only groups >= first_group[b] are rebuilt (an append changes the tail only).
  const std::int32_t* first_group = nullptr;
  int batch = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  DType dtype = DType::kBFloat16;
  float* group_summaries = nullptr;  ///< out, [pool_groups][kv_heads][3][head_dim] fp32, device
};

void launch_build_group_summaries(const GroupSummaryParams& p, Stream stream);

}  // namespace hattn::cuda
