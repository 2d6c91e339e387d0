#pragma once
// Launchers of the HBM page cache's step kernels (cuda/cache_kernels.cu), over a POD view of the
// device state. Internal to DeviceKVCache: the device twin of CacheModel::step in two kernels
// (lookup + histograms + plan, then eviction + claims), the gather publishing what it copied.
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
  std::int32_t free_count = 0;    ///< free slots: free_ring[(free_head + i) % slots], i < free_count
  std::int32_t free_head = 0;
  std::int32_t gather_count = 0;  ///< blocks admitted by the current call
  std::uint32_t blocks_done = 0;  ///< last-block detection of the lookup-plan kernel
  std::int32_t error = 0;         ///< 1: a row named a request that is not open; 2: free slots ran dry
  std::int32_t error_row = 0;
  std::int32_t error_value = 0;
  // Set by the plan for the eviction-claim kernel of the same call.
  std::int32_t pops = 0;       ///< slots taken from the ring head
  std::int32_t pop_head = 0;   ///< ring position of the first of them
  std::int32_t push_tail = 0;  ///< ring position where evicted slots not reused are appended
  std::int32_t any_evict = 0;  ///< some row evicts: the eviction scan runs
  // Written by the eviction-claim kernel. The plan leaves free_count at (count - pops); the slots
  // pushed are appended through `pushed` and added to free_count by the commit, so the ring count
  // is what was written, never what was planned (a row that finds fewer victims than its plan used
  // to leave planned-but-unwritten ring entries and a count one too high).
  std::int32_t pushed = 0;         ///< slots appended at push_tail by the latest call
  std::int32_t shortfall = 0;      ///< victims planned but not found, summed over calls (0 = healthy)
  /// Rows of the latest call whose evictions are not committed yet (0 = none). The commit (ring
  /// count += pushed; use counts and counters of rows that found fewer victims than planned) runs
  /// at the start of the next call's plan, or from DeviceKVCache::synchronize() before the host
  /// reads anything: the eviction kernel then ends with its stores, without a last-block count.
  std::int32_t uncommitted_rows = 0;
};

/// Per-row values the lookup copies for the plan, so that the plan's loads are one round trip.
struct CacheRowInfo {
  std::int32_t request = -1;  ///< -1: the row names no open request
  std::int32_t budget = 0;
  std::int32_t pinned = 0;
  std::int32_t used = 0;
};

/// Per-row plan written by the lookup-plan kernel's last block.
struct CacheRowPlan {
  std::int32_t request = -1;     ///< -1: the row is skipped
  std::int32_t evict_from = 0;   ///< first evicted class (kCacheEvictionClasses = none)
  std::int32_t quota = 0;        ///< misses to admit (ranks [0, quota) in segment, position order)
  std::int32_t evicted = 0;      ///< blocks the eviction takes (exactly the classes >= evict_from)
  std::int32_t admit_base = 0;   ///< first gather entry of the row
  std::int32_t pop_base = 0;     ///< first ring pop of the row: ranks [evicted, quota) take ring slots
};

/// Device arrays of a DeviceKVCache. Shapes in brackets; S = slots, R = max_requests,
/// B = max_batch, H = kv_heads, N = max_selected, P = B * H * max_parts lookup parts.
struct CacheDeviceView {
  BlockKey* slot_key = nullptr;           ///< [S] -1 = free
  std::int32_t* slot_request = nullptr;   ///< [S]
  std::uint32_t* slot_stamp = nullptr;    ///< [S]
  std::uint8_t* slot_pinned = nullptr;    ///< [S]
  /// [S] id of the last call that hit the slot: the lookup marks hits here instead of refreshing
  /// stamps, so the histogram scan running beside it reads stamps nobody writes; the eviction
  /// kernel refreshes the stamps.
  std::uint32_t* slot_hit = nullptr;
  std::int32_t* free_ring = nullptr;      ///< [S] see CacheScalars::free_head
  std::int32_t* slot_of = nullptr;        ///< [pool_pages * H] slot or -1; what the decode kernel reads
  std::int32_t* budget = nullptr;         ///< [R] -1 = not open
  std::int32_t* used = nullptr;           ///< [R]
  std::int32_t* pinned = nullptr;         ///< [R]
  DeviceRequestCounters* request_stats = nullptr;  ///< [R]
  CacheStepStats* step_stats = nullptr;   ///< [1] totals of the latest step number
  CacheScalars* scalars = nullptr;        ///< [1]
  // Per-call workspace.
  std::int32_t* part_misses = nullptr;    ///< [P] misses found by lookup part p = s * parts + x
  std::int32_t* part_start = nullptr;     ///< [P] exclusive prefix of part_misses over all parts
  std::int32_t* part_base = nullptr;      ///< [P] miss_key index of part p's first miss
  BlockKey* miss_key = nullptr;           ///< [N] misses of part p compacted from its first entry
  std::int32_t* row_acc = nullptr;        ///< [B][4] hits, misses, bypass, fresh (unpinned, stamp now)
  std::int32_t* row_hist = nullptr;       ///< [B][kCacheEvictionClasses] evictable blocks per class
  CacheRowInfo* row_info = nullptr;       ///< [B] written by the lookup, read by the plan
  CacheRowPlan* row_plan = nullptr;       ///< [B]
  std::int32_t* row_ticket = nullptr;     ///< [B] evictions claimed so far by the eviction kernel
  std::int32_t* gather_page = nullptr;    ///< [N] the gather list, written by the claims
  std::int32_t* gather_head = nullptr;    ///< [N]
  std::int32_t* gather_slot = nullptr;    ///< [N]
  BlockKey* gather_key = nullptr;         ///< [N]
  std::int32_t slots = 0, max_requests = 0, max_batch = 0, kv_heads = 0, max_selected = 0, max_parts = 0;
  std::int64_t block_bytes = 0;
};

/// Clock marks of one call's phases for profiling (global timer, ns), written when
/// CacheCallArgs::phase_ns is set: starts are the earliest block's, the rest the latest block's.
enum CachePhase : int {
  kPhaseLookupStart,  ///< min: first block of stage 1 running
  kPhaseLookupDone,   ///< max: lookup blocks done (before the last-block count)
  kPhaseScanDone,     ///< max: slot-scan blocks done
  kPhasePlanBegin,    ///< the last block starts planning
  kPhasePlanLoaded,   ///< the plan's loads are in and the previous call is committed
  kPhasePlanEnd,
  kPhaseEvictStart,   ///< min: first block of stage 2 running
  kPhaseEvictWaited,  ///< max: stage 2 blocks past the dependency wait
  kPhaseEvictDone,    ///< max: eviction and its claims done
  kPhaseClaimsDone,   ///< max: ring claims and resets done (the end of stage 2)
  kCachePhases
};
/// Marks taken as minimum (the others are maxima).
constexpr bool cache_phase_is_min(int p) noexcept { return p == kPhaseLookupStart || p == kPhaseEvictStart; }

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
  std::uint32_t call_id = 1;    ///< distinct for every call (never 0), marks hits in slot_hit
  int capacity = 0;             ///< entries of `selected`: a bound on this call's admissions
  int parts = 1;                ///< lookup blocks per segment, <= max_parts
  unsigned long long* phase_ns = nullptr;  ///< [kCachePhases] marks, or null (no profiling)
};

/// Lookup blocks per segment for a call: enough blocks to cover `capacity` entries over the
/// segments in chunks of a block's threads, at most `max_parts`.
int cache_lookup_parts(int capacity, int segments, int max_parts) noexcept;

/// Stage 1, one kernel: lookup (hits marked, misses compacted per part in order) beside a scan of
/// every slot building the rows' age histograms; the last block to finish commits the previous
/// call's evictions, plans every row (quota, eviction threshold, use count, statistics) and lays
/// out the claims of stage 2.
void launch_cache_lookup_plan(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Stage 2, one kernel: refreshes stamps of hits, evicts every evictable block of a row in classes
/// >= its threshold, hands evicted slots straight to the row's admissions (the rest from the ring)
/// and lists the admissions for the gather. Launched as a programmatic dependent of stage 1. Its
/// ring pushes and any shortfall are committed later (CacheScalars::uncommitted_rows).
void launch_cache_evict_admit(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// Commits the latest call's evictions if not done yet (one block); before the host reads state.
void launch_cache_commit(const CacheDeviceView& v, cuda::Stream stream);
/// The two stage kernels' launches with empty bodies (same grids, same programmatic dependency):
/// the latency floor of a step's maintenance, for benchmarks.
void launch_cache_empty_stages(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream);
/// slot_of[keys[i]] = values[i] for i < n (host-side operations).
void launch_cache_scatter(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n,
                          cuda::Stream stream);

}  // namespace hattn::detail
