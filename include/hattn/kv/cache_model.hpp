#pragma once
// Host model of the HBM page cache: the same state and the same replacement rule as the GPU
// kernels of DeviceKVCache (bucketed LRU, per-request budgets), plus an exact LRU for comparison.
// Tests check the GPU against it step by step; the benchmark measures the bucketed rule's hit-rate
// gap against exact LRU with it; DeviceKVCache runs its rare host-side operations (budgets, pins,
// release) through it on a downloaded copy of the device state.
#include <cstdint>
#include <span>
#include <unordered_map>
#include <vector>

#include "hattn/kv/cache_policy.hpp"

namespace hattn {

/// Sizes of a cache: its slots, the requests it can serve and the key space of the host pool.
struct CacheShape {
  std::int32_t slots = 0;         ///< HBM slots, one (page, KV head) block each
  std::int32_t max_requests = 0;  ///< request indices are [0, max_requests)
  std::int32_t pool_pages = 0;    ///< HostKVPool capacity; keys are [0, pool_pages * kv_heads)
  int kv_heads = 0;
  std::int64_t block_bytes = 0;   ///< bytes of one block, K and V: 2 * page_size * head_dim * elem
  int layers = 1;                 ///< layers calling the cache once each per step, in ascending order

  /// Stamp clock of a call: one tick per layer call, so recency inside a step follows layer order
  /// as exact LRU sees it; with step stamps, a tight budget at layer l would evict whole age buckets
  /// holding the previous step's blocks of layers not yet called, and those would cascade.
  std::uint32_t clock(std::uint32_t step, int layer) const noexcept {
    return step * static_cast<std::uint32_t>(layers) + static_cast<std::uint32_t>(layer);
  }

  std::int64_t keys() const noexcept { return static_cast<std::int64_t>(pool_pages) * kv_heads; }
  /// Throws InvalidArgument naming the first bad field.
  void validate() const;
};

/// The state the GPU keeps, array for array (free slot -> key -1, request -1). A request with
/// budget -1 is not open.
struct CacheState {
  std::vector<BlockKey> slot_key;           ///< [slots]
  std::vector<std::int32_t> slot_request;   ///< [slots] owner
  std::vector<std::uint32_t> slot_stamp;    ///< [slots] step of last use
  std::vector<std::uint8_t> slot_pinned;    ///< [slots] 1 = never evicted
  std::vector<std::int32_t> free_stack;     ///< [slots]; entries [0, free_top) are free slots
  std::int32_t free_top = 0;
  std::vector<std::int32_t> budget;         ///< [max_requests] slots, -1 = not open
  std::vector<std::int32_t> used;           ///< [max_requests]
  std::vector<std::int32_t> pinned;         ///< [max_requests]

  /// An empty cache: every slot free, no request open.
  static CacheState empty(const CacheShape& shape);
};

enum class CacheReplacement : std::uint8_t {
  kBucketedLru,  ///< what the GPU runs: age buckets, victims a whole bucket at a time
  kExactLru,     ///< reference: least recently used block first, one at a time
};

/// What one batch row looks up in one call: its request and its selected blocks in the order the
/// kernels see them (segment h = 0..kv_heads-1, then ascending page position), each key once.
struct CacheAccess {
  std::int32_t request = 0;
  std::vector<BlockKey> keys;
  std::int64_t bypass = 0;  ///< selected blocks of the sequence's last page, counted but never cached
};

/// A block placed in a slot that must be gathered from the host pool.
struct BlockFill {
  BlockKey key = -1;
  std::int32_t slot = -1;
  friend constexpr bool operator==(const BlockFill&, const BlockFill&) = default;
};

/// The cache as a host data structure. Every operation validates all its input before it changes
/// anything, so a thrown InvalidArgument / OutOfCapacity leaves the model as it was.
class CacheModel {
 public:
  CacheModel(const CacheShape& shape, CacheReplacement replacement);
  /// Adopts a state (from the GPU) whose latest call had clock `last_clock` (CacheShape::clock).
  /// Bucketed LRU only: the exact LRU's order is not in the state.
  CacheModel(const CacheShape& shape, CacheState state, std::uint32_t last_clock);

  /// Opens request `request` with `budget_slots`. Throws when it is open already, out of range, or
  /// the budgets would sum to more than the pool.
  void open_request(std::int32_t request, std::int32_t budget_slots);
  /// Resizes a budget; a shrink evicts at once (oldest age buckets first). Throws for a closed
  /// request, a budget above the pool, budgets summing to more than the pool, or below the pinned count.
  void set_budget(std::int32_t request, std::int32_t budget_slots);
  /// Pins blocks (sinks, local window) of `request`: cached ones are marked, others take a slot
  /// (evicting if the budget is full) and are returned for a gather. Throws OutOfCapacity when the
  /// pins would exceed the budget.
  std::vector<BlockFill> pin(std::int32_t request, std::span<const BlockKey> keys);
  /// Unpins blocks; each must be pinned by `request`.
  void unpin(std::int32_t request, std::span<const BlockKey> keys);
  /// Drops the cached blocks among `keys` that `request` owns (pinned too); others are ignored.
  void invalidate(std::int32_t request, std::span<const BlockKey> keys);
  /// Drops every block of `request` and closes it.
  void release(std::int32_t request);

  /// The call of `layer` in step `step`: counts hits and misses of every row, refreshes the stamps
  /// of hits, evicts and admits misses within each request's budget. Returns the admitted blocks
  /// (to be gathered). Calls must not go back in (step, layer) order.
  std::vector<BlockFill> step(std::uint32_t step, int layer, std::span<const CacheAccess> rows);

  std::int32_t slot_of(BlockKey key) const;
  const CacheState& state() const noexcept { return state_; }
  const CacheShape& shape() const noexcept { return shape_; }
  CacheReplacement replacement() const noexcept { return replacement_; }
  std::uint32_t last_clock() const noexcept { return last_clock_; }
  bool is_open(std::int32_t request) const;
  RequestCacheStats request_stats(std::int32_t request) const;
  /// Totals of the latest step number seen.
  const CacheStepStats& step_stats() const noexcept { return step_stats_; }

  /// Throws Error describing the first broken invariant: one owner per slot, map and slots agree,
  /// the free stack holds exactly the free slots, use and pins counted right, budgets hold.
  void check_invariants() const;

 private:
  void check_request(std::int32_t request, const char* where) const;
  void check_key(BlockKey key, const char* where) const;
  void take_slot(std::int32_t slot, std::int32_t request, BlockKey key, std::uint32_t stamp);
  void drop_slot(std::int32_t slot);
  /// Evicts at least `need` unpinned blocks of `request` not used at step `now`; returns how many.
  std::int64_t evict(std::int32_t request, std::int64_t need, std::uint32_t now);
  void rebuild_index();

  CacheShape shape_;
  CacheReplacement replacement_;
  CacheState state_;
  std::unordered_map<BlockKey, std::int32_t> slot_of_;
  std::vector<std::vector<std::int32_t>> owned_;  // [request] slots
  std::vector<std::int32_t> owned_pos_;           // [slot] index in owned_[owner]
  std::vector<std::uint64_t> recency_;            // [slot] exact LRU clock
  std::uint64_t clock_ = 0;
  std::uint32_t last_clock_ = 0;
  std::vector<RequestCacheStats> request_stats_;
  std::vector<std::uint32_t> request_last_step_;  // kNoStep before the first lookup
  CacheStepStats step_stats_;
};

}  // namespace hattn
