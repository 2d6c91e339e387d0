#pragma once
// The HBM page cache (DESIGN.md data model and step 7; SPIN's locality-aware KV manager, PSA's
// unified GPU memory): a fixed pool of slots in HBM shared by every sequence and layer, each slot
// one (page, KV head) block [2][page_size][head_dim] (K then V), so heads that select different
// pages do not drag each other's blocks in. Replacement is a bucketed LRU run by GPU kernels
// without host synchronisation; each request has a budget of slots that it never exceeds.
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/kernels/cuda_staging.hpp"
#include "hattn/kernels/cuda_stream.hpp"
#include "hattn/kv/cache_model.hpp"
#include "hattn/kv/cache_policy.hpp"
#include "hattn/kv/device_kv_cache_kernels.hpp"
#include "hattn/kv/host_kv_pool.hpp"

#if HATTN_WITH_CUDA

struct CUevent_st;

namespace hattn {

/// Sizes of a DeviceKVCache. Every number is fixed for the cache's life.
struct DeviceKVCacheConfig {
  std::int32_t slots = 0;            ///< HBM slots (one block each): slots x block_bytes of HBM
  std::int32_t max_requests = 256;   ///< request slot indices are [0, max_requests)
  int max_batch = 64;                ///< rows per step call, at most 128
  std::int32_t max_selected = 1 << 16;  ///< entries of `selected` per call (workspace)
  int layers = 1;                    ///< layers sharing the cache; step() checks its layer argument
  /// Blocks of the staging area (staging(), staged admission): up to this many misses per step()
  /// call are copied into HBM before the decode (launch_stage_blocks) and admitted from there
  /// instead of across PCIe again. 0: no staging.
  std::int32_t staging_blocks = 0;
};

/// One call of DeviceKVCache::step: the selection of one layer for a batch, device arrays in the
/// SparseDecodeParams convention (include/hattn/kernels/cuda_decode.hpp).
struct CacheStepParams {
  const std::int32_t* page_table = nullptr;   ///< page ids, row b at [page_indptr[b], page_indptr[b + 1])
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1]
  /// Selected page positions of segment s = b * kv_heads + h at selected[selected_offset[s] + i],
  /// i < selected_count[s], distinct within a segment.
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * kv_heads]
  const std::int32_t* selected_count = nullptr;   ///< [batch * kv_heads]
  const std::int32_t* request_of_row = nullptr;   ///< [batch] open request of each row, each at most once
  int batch = 0;
  int kv_heads = 0;
  int layer = 0;
  /// Decode step number, the same for every layer of a step; calls come in (step, layer) order.
  std::uint32_t step = 0;
  std::int32_t selected_capacity = 0;  ///< entries of `selected` (host value), <= max_selected
  /// Staged admission: the caller stages this selection's misses (cuda::launch_stage_blocks into
  /// staging(), on compute_stream after this call) and its decode reads them there
  /// (SparseDecodeParams::staging), neither waiting for this call's maintenance; the gather of the
  /// misses into slots waits for admit_staged(), after the decode, and copies the staged ones in HBM.
  bool staged = false;
};

/// Device times of the last step() call when timing is on (events on the side stream).
struct CacheStepTiming {
  float maintenance_us = 0;  ///< lookup, histograms, plan, eviction and claims
  float gather_us = 0;       ///< the gather of admitted blocks (PCIe, or HBM for staged ones), each published once copied
  float lookup_plan_us = 0;  ///< per-stage split of maintenance_us (only with set_timing(true, true))
  float evict_admit_us = 0;
  /// Phase marks (only with set_timing(true, false, true)), us after stage 1's first block
  /// started: [detail::kCachePhases], see detail::CachePhase.
  float phase_us[detail::kCachePhases] = {};
};

/// See the file comment. Host-side operations (open, budgets, pins, invalidate, release, stats)
/// wait for the cache's GPU work and may block; step() never does.
class DeviceKVCache {
 public:
  /// `pool` must be pinned and mapped (the gather reads it from the GPU) and outlive the cache.
  DeviceKVCache(const HostKVPool& pool, const DeviceKVCacheConfig& config);
  ~DeviceKVCache();
  DeviceKVCache(const DeviceKVCache&) = delete;
  DeviceKVCache& operator=(const DeviceKVCache&) = delete;

  void open_request(std::int32_t request, std::int32_t budget_slots);
  /// Resizes a budget; a shrink evicts at once. Throws InvalidArgument for a closed request, a
  /// budget larger than the pool, budgets summing past the pool, or fewer slots than pinned blocks.
  void set_budget(std::int32_t request, std::int32_t budget_slots);
  /// Sets every open request's budget from what it showed since the last resize (plan_budgets):
  /// its selected blocks per step x the policy's multiple. Returns the budgets [max_requests] (-1 closed).
  std::vector<std::int32_t> resize_budgets(const BudgetPolicy& policy);
  /// Pins every KV head's block of `pages` (sinks, local window: complete pages only) for `request`;
  /// blocks not cached are gathered now. Throws OutOfCapacity past the budget.
  void pin(std::int32_t request, std::span<const PageId> pages);
  void unpin(std::int32_t request, std::span<const PageId> pages);
  /// Drops the cached blocks of `pages` that `request` owns (pages about to be freed or rewritten).
  void invalidate(std::int32_t request, std::span<const PageId> pages);
  /// Drops every block of `request` and closes it; its slots are free when this returns.
  void release(std::int32_t request);

  /// One layer of one decode step, after selection, before that layer's decode on
  /// `compute_stream`: counts hits and misses, refreshes stamps, evicts whole age buckets and
  /// gathers the misses into claimed slots on `side_stream`, overlapped with the decode unless the
  /// caller makes the decode wait for it (wait_admission(), Admission::kBeforeDecode), or, with
  /// `staged`, defers that gather to admit_staged(). slot_of()
  /// points only at fully gathered slots, and the next step() makes `compute_stream` wait for this
  /// call's side work, so no decode reads a slot while it is rewritten. Enqueue order on
  /// compute_stream must be: selection, step(), decode. Throws InvalidArgument for host arguments
  /// (layer, batch, kv_heads, step, capacity) before enqueuing anything; a row naming a request
  /// that is not open is skipped on the device and reported by the next host-side call.
  void step(const CacheStepParams& params, cuda::Stream compute_stream, cuda::Stream side_stream);

  /// Staged admission (CacheStepParams::staged): the gather of the latest step()'s misses, on its
  /// side stream after the work enqueued on `compute_stream` so far (the staging and the decode),
  /// from the staging area where launch_stage_blocks copied them and from the host otherwise; then the area
  /// is emptied. The next step(), synchronize() or host-side operation runs it, after the work on
  /// that step's compute stream, if the caller has not. No-op when nothing is deferred.
  void admit_staged(cuda::Stream compute_stream);

  /// Makes `compute_stream` wait for the latest step()'s side work, so a decode enqueued after this
  /// reads that call's admitted misses from HBM instead of across PCIe beside their gather (each miss
  /// then crosses PCIe once; the decode starts after the gather). After a staged step() whose
  /// admit_staged() has not run, that side work is the maintenance only. No-op before the first step().
  void wait_admission(cuda::Stream compute_stream);

  /// Waits for the cache's GPU work; throws InvalidArgument if a step saw a bad row (then cleared).
  void synchronize();
  RequestCacheStats request_stats(std::int32_t request);
  /// Totals of the latest step number.
  CacheStepStats step_stats();
  /// Victims the step kernels planned but did not find, summed over all calls (synchronises). The
  /// kernels keep the ring count and use counts exact regardless; non-zero means a plan's histogram
  /// disagreed with the slots (a stale slot_of entry or a race) and is a bug to report.
  std::int32_t eviction_shortfall();
  /// Copy of the device state (for tests and tools).
  CacheState download_state();
  std::vector<std::int32_t> download_slot_of();
  /// `per_stage` adds an event between the two maintenance kernels, which costs their overlap;
  /// `phases` has the kernels record clock marks of their phases (a few atomics per block).
  void set_timing(bool on, bool per_stage = false, bool phases = false) noexcept {
    timing_ = on;
    per_stage_ = per_stage;
    phases_ = phases;
  }
  /// Times of the last step() (synchronises); zeros unless timing is on.
  CacheStepTiming last_timing();
  /// Device time of the step's two kernel launches with empty bodies for a call like `params`
  /// (same grids, same dependency), enqueued while `side_stream` is held: the floor under
  /// CacheStepTiming::maintenance_us. Synchronises; for benchmarks.
  float empty_stages_us(const CacheStepParams& params, cuda::Stream side_stream);

  /// [pool_pages * kv_heads] slot of (page, head) or -1, for SparseDecodeParams::slot_of.
  const std::int32_t* slot_of() const noexcept { return view_.slot_of; }
  /// [slots][2][page_size][head_dim], for SparseDecodeParams::hbm_slots.
  const void* hbm_slots() const noexcept { return hbm_slots_; }
  /// The staging area (capacity 0 without staging_blocks). Only launch_stage_blocks after a step()
  /// call with `staged` set may fill it, before that call's admit_staged().
  const cuda::StagingArea& staging() const noexcept { return staging_; }
  const CacheShape& shape() const noexcept { return shape_; }
  const DeviceKVCacheConfig& config() const noexcept { return config_; }

 private:
  template <class Op>
  void control(std::int32_t request, Op&& op);
  void upload_state(const CacheState& state);
  void check_error();
  void launch_gather(cuda::Stream side, std::int32_t capacity, bool staged);
  void destroy() noexcept;

  const HostKVPool& pool_;
  DeviceKVCacheConfig config_;
  CacheShape shape_;
  detail::CacheDeviceView view_{};
  void* hbm_slots_ = nullptr;
  std::vector<void*> allocations_;
  cuda::Stream own_stream_ = nullptr;
  CUevent_st* selected_ready_ = nullptr;
  CUevent_st* side_done_ = nullptr;
  CUevent_st* staged_ready_ = nullptr;  // the decode that read the staging area is done (admit_staged)
  CUevent_st* timing_events_[5] = {};   // maintenance start, end, gather end, stage split, gather start
  cuda::StagingArea staging_;
  // A staged step() whose gather admit_staged() has not enqueued yet, and where that gather goes.
  bool deferred_ = false;
  cuda::Stream deferred_compute_ = nullptr;
  cuda::Stream deferred_side_ = nullptr;
  std::int32_t deferred_capacity_ = 0;
  bool side_pending_ = false;
  bool commit_pending_ = false;  // a step ran since the last commit (detail::CacheScalars::uncommitted_rows)
  bool timing_ = false;
  bool timed_ = false;
  bool per_stage_ = false;
  bool timed_per_stage_ = false;
  bool phases_ = false;
  bool timed_phases_ = false;
  unsigned long long* phase_ns_ = nullptr;  // [detail::kCachePhases] on the device
  std::uint32_t call_id_ = 0;     // id of the latest step() call (slot_hit marks)
  std::uint32_t last_clock_ = 0;  // CacheShape::clock of the latest step() call
  std::vector<detail::DeviceRequestCounters> stats_at_resize_;
};

}  // namespace hattn

#endif  // HATTN_WITH_CUDA
