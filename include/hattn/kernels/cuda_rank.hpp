#pragma once
// Per-segment ranking scores for selection (SegmentRule::rank): the score kernel writes the Quest bound
// and the mean-key estimate of every page; segments that rank by the blend get
// estimate + blend x (bound - estimate) written over their bound, so one selection launch serves a
// layer whose segments rank differently.
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Score buffers in the ScoreParams convention (hattn/kernels/cuda_score.hpp).
struct RankScoresParams {
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1]
  const std::int32_t* blended = nullptr;      ///< [batch * kv_heads]: nonzero = segment s ranks by the blend
  const float* estimate = nullptr;
  float* rank = nullptr;  ///< the bound on entry; the blend in flagged segments on return
  float blend = 0.0f;
  int batch = 0, kv_heads = 0;
};

void launch_rank_scores(const RankScoresParams& p, Stream stream);

}  // namespace hattn::cuda
