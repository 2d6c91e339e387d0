#pragma once
// What the HBM page cache (DeviceKVCache) and its host models share: the cache unit and its key,
// the age buckets of the bucketed LRU, the statistics, and the per-request budget rule.
//
// The cache unit is one (page, KV head) block: K then V of one head of one page, [2][page_size][dim].
// Page ids are global across sequences and layers, so key = page * kv_heads + head names a block
// uniquely and layers share one slot pool.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <span>
#include <vector>

#include "hattn/core/error.hpp"

#if defined(__CUDACC__)
#define HATTN_HOST_DEVICE __host__ __device__
#else
#define HATTN_HOST_DEVICE
#endif

namespace hattn {

/// Key of a (page, KV head) block: page * kv_heads + head, in [0, pool_pages * kv_heads).
using BlockKey = std::int32_t;

/// Number of age buckets of the bucketed LRU. Stamps are call clocks (one tick per layer call);
/// what the replacement looks at is the age (now - stamp) quantised into this bounded range, so
/// per-request histograms are small and victims are chosen by one threshold per request, in
/// parallel on the GPU.
inline constexpr int kCacheAgeBuckets = 64;
/// The first kCacheRecentBuckets buckets are split further by a hash of the block key into
/// kCacheSubBuckets parts, so that when the eviction threshold falls in a recent bucket (a tight
/// budget: the previous step's selection of a layer) only a sixteenth of it goes at once instead
/// of all of it, which would make that layer miss everything at its next call and cascade.
inline constexpr int kCacheRecentBuckets = 16;
inline constexpr int kCacheSubBuckets = 16;
/// Eviction classes: recent buckets x sub-buckets, then the older buckets whole. A larger class
/// is older and goes first; victims are every evictable block in the classes above a threshold.
inline constexpr int kCacheEvictionClasses =
    kCacheRecentBuckets * kCacheSubBuckets + (kCacheAgeBuckets - kCacheRecentBuckets);

/// Age bucket of a block last used `age` >= 1 ticks ago (age 0, this call, is never evicted).
/// Ages 1..16 get a bucket each; beyond that, 4 buckets per doubling, so the range covers ~65K
/// ticks. Bucket 63 holds everything older. A larger bucket means older.
HATTN_HOST_DEVICE constexpr int cache_age_bucket(std::uint32_t age) noexcept {
  const std::uint32_t a = age - 1;  // age >= 1
  if (a < 16) return static_cast<int>(a);
  int e = 31;
  while (((a >> e) & 1u) == 0) --e;  // floor(log2(a)) >= 4
  const int b = 16 + (e - 4) * 4 + static_cast<int>((a >> (e - 2)) & 3u);
  return b < kCacheAgeBuckets ? b : kCacheAgeBuckets - 1;
}

/// Ticks per age unit for `layers` layer calls a step: the 16 one-unit buckets then span about
/// two steps, where a tight budget puts its threshold.
HATTN_HOST_DEVICE constexpr std::uint32_t cache_age_width(int layers) noexcept {
  return static_cast<std::uint32_t>((layers + 7) / 8);
}

/// Eviction class of a block with key `key`, `age` >= 1 ticks old, at age width `width`.
HATTN_HOST_DEVICE constexpr int cache_eviction_class(std::uint32_t age, std::int32_t key, std::uint32_t width) noexcept {
  const int b = cache_age_bucket((age + width - 1) / width);
  if (b >= kCacheRecentBuckets) return kCacheRecentBuckets * kCacheSubBuckets + (b - kCacheRecentBuckets);
  const std::uint32_t mixed = static_cast<std::uint32_t>(key) * 0x9E3779B1u;  // Fibonacci hashing
  return b * kCacheSubBuckets + static_cast<int>(mixed >> 28);
}

/// Totals of one decode step (all layers of it), or of one request over its life.
struct CacheCounters {
  std::int64_t hits = 0;       ///< selected blocks found in HBM
  std::int64_t misses = 0;     ///< selected blocks read from the host pool
  std::int64_t bypass = 0;     ///< selected blocks of a sequence's last page (still being appended to, never cached)
  std::int64_t admitted = 0;   ///< blocks gathered into HBM after the step
  std::int64_t evicted = 0;    ///< blocks dropped to make room (whole age buckets)
  std::int64_t pcie_bytes = 0; ///< bytes gathered over PCIe for admissions (pins included)

  double hit_rate() const noexcept {
    const auto n = hits + misses;
    return n > 0 ? static_cast<double>(hits) / static_cast<double>(n) : 0.0;
  }
  CacheCounters& operator+=(const CacheCounters& o) noexcept {
    hits += o.hits, misses += o.misses, bypass += o.bypass;
    admitted += o.admitted, evicted += o.evicted, pcie_bytes += o.pcie_bytes;
    return *this;
  }
  friend constexpr bool operator==(const CacheCounters&, const CacheCounters&) = default;
};

inline std::ostream& operator<<(std::ostream& os, const CacheCounters& c) {
  return os << "{hits=" << c.hits << ", misses=" << c.misses << ", bypass=" << c.bypass
            << ", admitted=" << c.admitted << ", evicted=" << c.evicted << ", pcie_bytes=" << c.pcie_bytes << "}";
}

/// Statistics of one step (summed over the layers that called the cache with that step number).
struct CacheStepStats {
  std::uint32_t step = 0;
  CacheCounters counters;
};

/// Statistics of one request: lifetime counters, the steps it took part in, its budget and use.
struct RequestCacheStats {
  CacheCounters counters;
  std::int64_t steps = 0;        ///< distinct step numbers in which the request was looked up
  std::int32_t budget_slots = 0; ///< HBM slots the request may hold
  std::int32_t used_slots = 0;   ///< HBM slots it holds now (pinned included)
  std::int32_t pinned_slots = 0;
};

/// How budgets follow the working set (SPIN: keep what a step needs plus a buffer of ~4-5x that).
struct BudgetPolicy {
  double working_set_multiple = 4.5;  ///< budget = blocks a step selects x this
  double low_hit_rate = 0.8;          ///< below this, a request gets `boost` x more
  double boost = 1.5;
  std::int32_t min_slots = 16;        ///< floor per request (sinks and local window of a few heads)
  friend constexpr bool operator==(const BudgetPolicy&, const BudgetPolicy&) = default;
};

inline std::ostream& operator<<(std::ostream& os, const BudgetPolicy& p) {
  return os << "{working_set_multiple=" << p.working_set_multiple << ", low_hit_rate=" << p.low_hit_rate
            << ", boost=" << p.boost << ", min_slots=" << p.min_slots << "}";
}

/// What a request showed since the last resize.
struct RequestDemand {
  double blocks_per_step = 0;  ///< selected blocks per step, all layers and KV heads
  double hit_rate = 1;
  std::int32_t pinned_slots = 0;  ///< a budget never goes below what is pinned
};

/// Budgets for `demands` that sum to at most `slots`: working set x multiple (x boost when the hit
/// rate is low), at least min_slots and the pinned count; scaled down proportionally above the
/// pinned floor when the pool is oversubscribed. Throws InvalidArgument when the pinned blocks
/// alone exceed the pool.
inline std::vector<std::int32_t> plan_budgets(std::span<const RequestDemand> demands, std::int64_t slots,
                                              const BudgetPolicy& policy) {
  detail::require(policy.working_set_multiple >= 1, "plan_budgets", "working_set_multiple",
                  policy.working_set_multiple, ">= 1");
  std::vector<double> want(demands.size());
  std::int64_t floor_sum = 0;
  for (std::size_t i = 0; i < demands.size(); ++i) {
    const auto& d = demands[i];
    double w = std::ceil(d.blocks_per_step * policy.working_set_multiple *
                         (d.hit_rate < policy.low_hit_rate ? policy.boost : 1.0));
    w = std::max({w, static_cast<double>(policy.min_slots), static_cast<double>(d.pinned_slots)});
    want[i] = w;
    floor_sum += d.pinned_slots;
  }
  detail::require(floor_sum <= slots, "plan_budgets", "pinned slots of all requests", floor_sum,
                  "<= slots of the pool");
  double total = 0;
  for (double w : want) total += w;
  std::vector<std::int32_t> out(demands.size());
  if (total <= static_cast<double>(slots)) {
    for (std::size_t i = 0; i < want.size(); ++i) out[i] = static_cast<std::int32_t>(want[i]);
    return out;
  }
  // Oversubscribed: every request keeps its pinned blocks and shares the rest in proportion to
  // what it asked for above them.
  double above = 0;
  for (std::size_t i = 0; i < want.size(); ++i) above += want[i] - demands[i].pinned_slots;
  const double room = static_cast<double>(slots - floor_sum);
  for (std::size_t i = 0; i < want.size(); ++i)
    out[i] = demands[i].pinned_slots +
             static_cast<std::int32_t>(std::floor((want[i] - demands[i].pinned_slots) * room / above));
  return out;
}

}  // namespace hattn
