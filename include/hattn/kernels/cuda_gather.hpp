#pragma once
// Copies (page, KV head) blocks of the pinned host pool into HBM slots at PCIe speed, one kernel for
// a whole list (one cudaMemcpyAsync per 4 KB block reaches only ~1.4 GB/s; a gather kernel ~50 GB/s).
// The grid is small and persistent (kGatherDefaultBlocks blocks loop over the list): PCIe, not the
// SMs, bounds it, and a grid sized by the list would crowd out the decode it overlaps.
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cuda_staging.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Blocks of the gather grid unless GatherParams::max_blocks says otherwise: 32 blocks x 256 threads
/// keep ~1 MB of PCIe reads in flight, above what an H100's x16 Gen5 link needs (~55 GB/s x 2 us).
inline constexpr int kGatherDefaultBlocks = 32;

struct GatherParams {
  const void* host_pages = nullptr;      ///< pool page arena (mapped, UVA), PageLayout HND
  void* hbm_slots = nullptr;             ///< [slots][2][page_size][head_dim]
  const std::int32_t* page_ids = nullptr;  ///< [n] device; nullptr: keys[e] / kv_heads
  const std::int32_t* heads = nullptr;     ///< [n] KV head of each block; nullptr: keys[e] % kv_heads
  /// [n] destination slot; a negative slot skips the entry. nullptr: entry e goes to slot e.
  const std::int32_t* slots = nullptr;
  const std::int32_t* count = nullptr;     ///< nullptr, or a device count <= n (set by an earlier kernel)
  int n = 0;
  int kv_heads = 0, page_size = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;
  /// Optional publication: once entry e is in HBM (and visible device-wide), slot_of[keys[e]] =
  /// slots[e], so a reader that sees the slot sees its bytes. Null: nothing is published.
  std::int32_t* slot_of = nullptr;
  const std::int32_t* keys = nullptr;  ///< [n] block keys (page * kv_heads + head); needed by slot_of and staging
  int max_blocks = 0;                  ///< grid size bound; 0: kGatherDefaultBlocks
  /// Where enabled (needs `keys`): an entry whose key is in the staging area is copied from there
  /// (HBM) instead of the host pool.
  StagingArea staging;
};

void launch_gather_pages(const GatherParams& p, Stream stream);

}  // namespace hattn::cuda
