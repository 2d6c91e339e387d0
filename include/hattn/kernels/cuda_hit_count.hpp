#pragma once
// How many of each segment's selected blocks are in the HBM cache (for StepStats::hbm_hits).
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Arrays in the SparseDecodeParams convention (hattn/kernels/cuda_decode.hpp).
struct HitCountParams {
  const std::int32_t* page_table = nullptr;
  const std::int32_t* page_indptr = nullptr;
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;
  const std::int32_t* selected_count = nullptr;
  const std::int32_t* slot_of = nullptr;  ///< [pool_pages * kv_heads] HBM slot or -1
  int batch = 0, kv_heads = 0;
  std::int32_t* hits = nullptr;  ///< [batch * kv_heads]
};

void launch_count_hits(const HitCountParams& p, Stream stream);

}  // namespace hattn::cuda
