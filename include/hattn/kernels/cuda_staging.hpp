#pragma once
// Staged admission (DeviceKVCache, docs/architecture.md): before the decode, the selected blocks
// that the HBM cache lacks are copied at PCIe speed into a staging area in HBM, where the decode
// reads them; after the decode the cache admits them from there (an HBM copy) instead of reading
// them across PCIe again. Meanwhile the cache's maintenance (lookup, eviction) runs beside both, so
// neither waits for it. The cache owns the area and empties it after each admission.
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

struct StagingArea {
  void* blocks = nullptr;            ///< [capacity][2][page_size][head_dim]: K then V, as an HBM slot
  std::int32_t* key_of = nullptr;    ///< [capacity] block key (page * kv_heads + head) of each entry
  /// [pool_pages * kv_heads] entry of a key; only an entry below min(*count, capacity) whose key_of
  /// names the key is meant (stale values from earlier steps are never cleared).
  std::int32_t* index_of = nullptr;
  /// Entries taken since the last reset. May pass `capacity`: entries past it are not written, and
  /// their blocks are read and admitted from the host as without staging.
  std::int32_t* count = nullptr;
  std::int32_t capacity = 0;  ///< 0: no staging

  bool enabled() const noexcept { return capacity > 0; }
  /// Every pointer set, as an enabled area needs.
  bool complete() const noexcept { return blocks && key_of && index_of && count; }
};

/// A selection in the SparseDecodeParams convention (include/hattn/kernels/cuda_decode.hpp) whose
/// blocks not in HBM slots are to be staged.
struct StageParams {
  const std::int32_t* page_table = nullptr;
  const std::int32_t* page_indptr = nullptr;      ///< [batch + 1]
  const std::int32_t* seq_len = nullptr;          ///< [batch] tokens
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * kv_heads]
  const std::int32_t* selected_count = nullptr;   ///< [batch * kv_heads]
  const std::int32_t* slot_of = nullptr;          ///< [pool_pages * kv_heads] or nullptr (nothing cached)
  const void* host_pages = nullptr;               ///< pool page arena (mapped, UVA), PageLayout HND
  int batch = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  DType dtype = DType::kBFloat16;
  std::int32_t max_count = 0;  ///< host bound on every selected_count (sizes the grid)
  StagingArea staging;
};

/// Copies every selected full page's block that has no HBM slot into the staging area (partial
/// pages, still being written, are left to the host). Two launches: one lists the blocks and takes
/// their entries, the gather kernel copies them.
void launch_stage_blocks(const StageParams& p, Stream stream);

}  // namespace hattn::cuda
