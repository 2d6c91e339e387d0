#pragma once
// Replays a selection trace through a CacheModel, the way the decode loop calls the cache (one call
// per layer per step, every request a batch row), to compare replacement rules on hit rate.
#include <cmath>
#include <concepts>
#include <cstdint>
#include <unordered_set>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/kv/cache_model.hpp"
#include "hattn/kv/cache_trace.hpp"

namespace hattn {

struct CacheReplayResult {
  CacheCounters counters;       ///< over the measured steps (after warm-up)
  std::int32_t budget_slots = 0;  ///< per request
  double blocks_per_step = 0;   ///< selected blocks per request per step, all layers and heads
  /// Measured lookups of blocks no earlier step (warm-up included) had selected: misses that no
  /// replacement rule avoids, only a larger warm-up or a prefetch.
  std::int64_t first_touches = 0;
  /// first_touches over the measured lookups (hits + misses): the floor of the miss rate.
  double first_touch_share() const noexcept {
    const auto n = counters.hits + counters.misses;
    return n > 0 ? static_cast<double>(first_touches) / static_cast<double>(n) : 0.0;
  }
};

/// Key of the block of (request, layer, page position, head) in a replay: every (request, layer)
/// gets `max_pages` consecutive page ids.
inline BlockKey replay_key(int layers, int kv_heads, int max_pages, int request, int layer, int pos, int head) {
  const std::int64_t page = (static_cast<std::int64_t>(request) * layers + layer) * max_pages + pos;
  return static_cast<BlockKey>(page * kv_heads + head);
}

/// A selection trace replay() can run: per step, the ascending page positions each (request,
/// layer, KV head) selects. SelectionTrace (synthetic) and the head zoo's trace (eval/zoo) are two.
template <class T>
concept ReplayableTrace = requires(T& t, const T& c, int i) {
  { c.requests() } -> std::convertible_to<int>;
  { c.layers() } -> std::convertible_to<int>;
  { c.kv_heads() } -> std::convertible_to<int>;
  { c.pages(i) } -> std::convertible_to<int>;
  { c.selected(i, i, i) } -> std::convertible_to<const std::vector<int>&>;
  t.advance();
};

/// What replay() passes its observer for every measured lookup (after the warm-up steps).
struct ReplayLookup {
  int request, layer, head, position;
  bool first_touch;  // no earlier step (warm-up included) selected this block
};

/// replay()'s default observer: counts stay in CacheReplayResult only.
struct NoReplayObserver {
  void operator()(const ReplayLookup&) const noexcept {}
};

/// Runs `steps` steps of `trace` from where it stands (the first `warmup` not counted), with every
/// request's budget set to `budget_multiple` x its selected blocks per step at the first step; no
/// sequence may grow past `max_pages` pages during the replay. `observe(const ReplayLookup&)`, if
/// given, sees every measured lookup, so a caller can break the counts down without a second replay.
template <ReplayableTrace Trace, std::invocable<const ReplayLookup&> Observer = NoReplayObserver>
CacheReplayResult replay(Trace& trace, CacheReplacement replacement, int steps, int warmup, double budget_multiple,
                         int max_pages, Observer observe = {}) {
  const int requests = trace.requests(), layers = trace.layers(), kv_heads = trace.kv_heads();
  double blocks = 0;
  for (int r = 0; r < requests; ++r)
    for (int l = 0; l < layers; ++l)
      for (int h = 0; h < kv_heads; ++h) blocks += static_cast<double>(trace.selected(r, l, h).size());
  blocks /= requests;
  const auto budget = static_cast<std::int32_t>(std::ceil(blocks * budget_multiple));

  CacheShape shape{.slots = budget * requests, .max_requests = requests, .pool_pages = requests * layers * max_pages,
                   .kv_heads = kv_heads, .block_bytes = 1, .layers = layers};
  CacheModel model(shape, replacement);
  for (int r = 0; r < requests; ++r) model.open_request(r, budget);

  CacheReplayResult out{.counters = {}, .budget_slots = budget, .blocks_per_step = blocks};
  std::unordered_set<BlockKey> seen;
  std::vector<CacheAccess> rows(static_cast<std::size_t>(requests));
  for (int t = 0; t < steps; ++t) {
    for (int l = 0; l < layers; ++l) {
      for (int r = 0; r < requests; ++r) {
        auto& row = rows[static_cast<std::size_t>(r)];
        row.request = r;
        row.keys.clear();
        row.bypass = 0;
        const int last = trace.pages(r) - 1;
        detail::require(last < max_pages, "replay", "pages of a sequence", last + 1, "<= max_pages");
        for (int h = 0; h < kv_heads; ++h)
          for (int pos : trace.selected(r, l, h)) {
            if (pos == last) {  // still being appended to: never cached
              ++row.bypass;
              continue;
            }
            const BlockKey key = replay_key(layers, kv_heads, max_pages, r, l, pos, h);
            row.keys.push_back(key);
            const bool first_touch = seen.insert(key).second;
            if (t < warmup) continue;
            out.first_touches += first_touch;
            observe(ReplayLookup{r, l, h, pos, first_touch});
          }
      }
      model.step(static_cast<std::uint32_t>(t), l, rows);
    }
    if (t >= warmup) out.counters += model.step_stats().counters;
    trace.advance();
  }
  return out;
}

/// replay() over a fresh SelectionTrace of `cfg`.
inline CacheReplayResult replay_trace(const SelectionTraceConfig& cfg, CacheReplacement replacement, int steps,
                                      int warmup, double budget_multiple) {
  SelectionTrace trace(cfg);
  return replay(trace, replacement, steps, warmup, budget_multiple, cfg.start_pages + steps / cfg.page_size + 2);
}

}  // namespace hattn
