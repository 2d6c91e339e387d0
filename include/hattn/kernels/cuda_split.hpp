#pragma once
// The CPU/GPU split of one selection: the GPU selects every segment's pages over the whole sequence,
// then the pages inside each request's CPU range go to the CPU and the rest stay on the GPU. The
// selection does not depend on the split, so neither does the result.
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

struct SplitSelectionParams {
  /// Selected positions of segment s = b * kv_heads + h at selected[selected_offset[s] + i],
  /// i < selected_count[s], ascending (launch_select_pages' output).
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * kv_heads]
  const std::int32_t* selected_count = nullptr;   ///< [batch * kv_heads]
  const std::int32_t* cpu_begin = nullptr;        ///< [batch] first position of the CPU range of row b
  const std::int32_t* cpu_end = nullptr;          ///< [batch] one past its last
  int batch = 0, kv_heads = 0;
  /// Positions outside the CPU range, at the same offsets, still ascending; gpu_count[s] of them.
  std::int32_t* gpu_selected = nullptr;
  std::int32_t* gpu_count = nullptr;  ///< [batch * kv_heads]
};

void launch_split_selection(const SplitSelectionParams& p, Stream stream);

}  // namespace hattn::cuda
