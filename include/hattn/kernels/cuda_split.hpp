#pragma once
// The CPU/GPU split of one selection. The GPU selects every segment's pages over the whole sequence;
// then each row's CPU quota (its share of the row's selected blocks, all KV heads together) is filled
// with the blocks the HBM cache lacks first and only then with cached ones. The uncached part of the
// quota is spread over the row's heads in proportion to their uncached blocks, the cached part in
// proportion to their cached blocks (the floor of each head's exact part, plus one for each of the
// first heads, in head order, whose part is not whole, until the quota is met); within a head the CPU
// takes its uncached, then its cached blocks in ascending order. A block the CPU computes is read
// from host DRAM at its full bandwidth; the GPU keeps what it can read from HBM and reads the rest of
// the misses across PCIe. The selection does not depend on the split, so neither does the result.
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

struct SplitSelectionParams {
  /// Selected positions of segment s = b * kv_heads + h at selected[selected_offset[s] + i],
  /// i < selected_count[s], ascending (launch_select_pages' output).
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * kv_heads]
  const std::int32_t* selected_count = nullptr;   ///< [batch * kv_heads]
  const std::int32_t* page_table = nullptr;       ///< positions -> page ids, SparseDecodeParams convention
  const std::int32_t* page_indptr = nullptr;      ///< [batch + 1]
  /// [pool_pages * kv_heads] HBM slot of (page, head) or -1; null: no cache, every block is a miss.
  const std::int32_t* slot_of = nullptr;
  /// [batch] share in [0, 1] of each row's selected blocks the CPU computes (rounded to blocks; the
  /// CPU gets fewer when blocks it was to take changed state mid-split, see gpu_hits); kv_heads <= 256 with it;
  /// null: none (the kernel then only counts the cached blocks).
  const float* cpu_share = nullptr;
  int batch = 0, kv_heads = 0;
  /// The two parts, at the selection's offsets, each ascending. Unused (may be null) without cpu_share.
  std::int32_t* gpu_selected = nullptr;
  std::int32_t* gpu_count = nullptr;  ///< [batch * kv_heads]
  std::int32_t* cpu_selected = nullptr;
  std::int32_t* cpu_count = nullptr;  ///< [batch * kv_heads]
  /// [batch * kv_heads] blocks of the GPU's part that are cached (required; may be mapped host memory).
  /// It is the cache as this kernel saw it: an admission or eviction of an earlier call still in flight
  /// on the cache's side stream may change a block's state before the decode reads it (the decode
  /// reads the map again, so the result never depends on it).
  std::int32_t* gpu_hits = nullptr;
  /// Optional [batch * kv_heads] copy of the GPU's block counts (gpu_count, or selected_count without
  /// cpu_share), typically in mapped host memory: the host reads the step's counts without a copy.
  std::int32_t* gpu_blocks = nullptr;
  /// Optional, with cpu_share: q [batch * q_heads * head_dim] (fp32) copied to q_copy, typically mapped
  /// host memory for the CPU's part; each segment's block writes its group's rows, which saves the
  /// step a device-to-host copy behind the split.
  const float* q = nullptr;
  float* q_copy = nullptr;
  int q_heads = 0, head_dim = 0;
};

void launch_split_selection(const SplitSelectionParams& p, Stream stream);

}  // namespace hattn::cuda
