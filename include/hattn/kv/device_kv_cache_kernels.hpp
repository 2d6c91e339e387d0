#pragma once
// Launchers of the HBM page cache's step kernels (cuda/cache_kernels.cu), over a POD view of the
// device state. Internal to DeviceKVCache: the device twin of CacheModel::step, stage by stage.
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"
#include "hattn/kv/cache_policy.hpp"

namespace hattn::detail {

/// Lifetime counters of one request on the device.
struct DeviceRequestCounters {
  CacheCounters counters;
  std::int64_t steps = 0;
  std::uint32_t last_step = 0xffffffffu;  ///< no step yet
  std::uint32_t pad = 0;
};

/// Scalars the kernels share; `error` is the first bad row seen by a lookup (0 = none).
struct CacheScalars {
  std::int32_t free_top = 0;      ///< entries [0, free_top) of free_stack are free slots
  std::int32_t gather_count = 0;  ///< blocks admitted by the current call
  std::uint32_t blocks_done = 0;  ///< last-block detection of the plan kernel
  std::int32_t error = 0;         ///< 1: a row named a request that is not open; 2: free stack ran dry
  std::int32_t error_row = 0;
  std::int32_t error_value = 0;
};

/// Device arrays of a DeviceKVCache. Shapes in brackets; S = slots, R = max_requests,
/// B = max_batch, H = kv_heads, N = max_selected.
struct CacheDeviceView {
  BlockKey* slot_key = nullptr;           ///< [S] -1 = free
  std::int32_t* slot_request = nullptr;   ///< [S]
  std::uint32_t* slot_stamp = nullptr;    ///< [S]
  std::uint8_t* slot_pinned = nullptr;    ///< [S]
  std::int32_t* free_stack = nullptr;     ///< [S]
  std::int32_t* slot_of = nullptr;        ///< [pool_pages * H] slot or -1; what the decode kernel reads
  std::int32_t* budget = nullptr;         ///< [R] -1 = not open
  std::int32_t* used = nullptr;           ///< [R]
  std::int32_t* pinned = nullptr;         ///< [R]
  std::int32_t* row_of_request = nullptr; ///< [R] batch row during a call, else -1
  DeviceRequestCounters* request_stats = nullptr;  ///< [R]
  CacheStepStats* step_stats = nullptr;   ///< [1] totals of the latest step number
  CacheScalars* scalars = nullptr;        ///< [1]
  // Per-call workspace.
  std::int32_t* seg_hits = nullptr;       ///< [B * H]
  std::int32_t* seg_misses = nullptr;     ///< [B * H]
  std::int32_t* seg_bypass = nullptr;     ///< [B * H]
  BlockKey* miss_key = nullptr;           ///< [N] misses of segment s at [selected_offset[s], + seg_misses[s])
  std::int32_t* row_request = nullptr;    ///< [B] request of the row, -1 when the row is invalid
  std::int32_t* row_fresh = nullptr;      ///< [B] unpinned blocks of the row's request used this step
  std::int32_t* row_hist = nullptr;       ///< [B][kCacheEvictionClasses] evictable blocks per class
  std::int32_t* row_evict_from = nullptr; ///< [B] first evicted class (kCacheEvictionClasses = none)
  std::int32_t* row_quota = nullptr;      ///< [B] misses to admit
  std::int32_t* gather_page = nullptr;    ///< [N]
  std::int32_t* gather_head = nullptr;    ///< [N]
  std::int32_t* gather_slot = nullptr;    ///< [N]
  BlockKey* gather_key = nullptr;         ///< [N]
  std::int32_t slots = 0, max_requests = 0, max_batch = 0, kv_heads = 0, max_selected = 0;
  std::int64_t block_bytes = 0;
};

/// One call's inputs, device arrays in the SparseDecodeParams CSR convention.
struct CacheCallArgs {
  const std::int32_t* page_table = nullptr;
  const std::int32_t* page_indptr = nullptr;      ///< [batch + 1]
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * H]
  const std::int32_t* selected_count = nullptr;   ///< [batch * H]
  const std::int32_t* request_of_row = nullptr;   ///< [batch]
  int batch = 0;
  std::uint32_t step = 0;       ///< for statistics
  std::uint32_t now = 0;        ///< stamp clock of this call, CacheShape::clock(step, layer)
  std::uint32_t age_width = 1;  ///< cache_age_width(layers)
  int capacity = 0;             ///< entries of `selected`: a bound on this call's admissions
};

/// Stage 1: hits (stamps refreshed) and misses per segment, misses compacted per segment.
void launch_cache_lookup(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Stage 2: age histograms of the rows' requests over all slots, then (last block) per row the
/// admission quota, the eviction threshold bucket, the new use count and the statistics.
void launch_cache_plan(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Stage 3: evicts every evictable block of a row's request in buckets >= its threshold.
void launch_cache_evict(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Stage 4: claims slots for the first quota misses of each row and lists them for the gather.
void launch_cache_admit(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Stage 6 (after the gather): points slot_of at the gathered slots; clears the row map.
void launch_cache_publish(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// slot_of[keys[i]] = values[i] for i < n (host-side operations).
void launch_cache_scatter(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n,
                          cuda::Stream stream);

}  // namespace hattn::detail
