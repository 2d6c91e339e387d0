#pragma once
// GPU page scoring from page summaries, for a ragged batch (DESIGN.md step 1).
#include <cstdint>

#include "hattn/core/dtype.hpp"
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
};

void launch_score_pages(const ScoreParams& p, Stream stream);

}  // namespace hattn::cuda
