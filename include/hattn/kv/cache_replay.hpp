#pragma once
// Replays a SelectionTrace through a CacheModel, the way the decode loop calls the cache (one call
// per layer per step, every request a batch row), to compare replacement rules on hit rate.
#include <cmath>
#include <cstdint>
#include <vector>

#include "hattn/kv/cache_model.hpp"
#include "hattn/kv/cache_trace.hpp"

namespace hattn {

struct CacheReplayResult {
  CacheCounters counters;       ///< over the measured steps (after warm-up)
  std::int32_t budget_slots = 0;  ///< per request
  double blocks_per_step = 0;   ///< selected blocks per request per step, all layers and heads
};

/// Key of the block of (request, layer, page position, head) in a replay: every (request, layer)
/// gets `max_pages` consecutive page ids.
inline BlockKey replay_key(const SelectionTraceConfig& c, int max_pages, int request, int layer, int pos, int head) {
  const std::int64_t page = (static_cast<std::int64_t>(request) * c.layers + layer) * max_pages + pos;
  return static_cast<BlockKey>(page * c.kv_heads + head);
}

/// Runs `steps` steps of the trace (the first `warmup` not counted) with every request's budget set
/// to `budget_multiple` x its selected blocks per step at step 0.
inline CacheReplayResult replay_trace(const SelectionTraceConfig& cfg, CacheReplacement replacement, int steps,
                                      int warmup, double budget_multiple) {
  SelectionTrace trace(cfg);
  const int max_pages = cfg.start_pages + steps / cfg.page_size + 2;
  double blocks = 0;
  for (int r = 0; r < cfg.requests; ++r)
    for (int l = 0; l < cfg.layers; ++l)
      for (int h = 0; h < cfg.kv_heads; ++h) blocks += static_cast<double>(trace.selected(r, l, h).size());
  blocks /= cfg.requests;
  const auto budget = static_cast<std::int32_t>(std::ceil(blocks * budget_multiple));

  CacheShape shape{.slots = budget * cfg.requests, .max_requests = cfg.requests,
                   .pool_pages = cfg.requests * cfg.layers * max_pages, .kv_heads = cfg.kv_heads, .block_bytes = 1,
                   .layers = cfg.layers};
  CacheModel model(shape, replacement);
  for (int r = 0; r < cfg.requests; ++r) model.open_request(r, budget);

  CacheReplayResult out{.counters = {}, .budget_slots = budget, .blocks_per_step = blocks};
  std::vector<CacheAccess> rows(static_cast<std::size_t>(cfg.requests));
  for (int t = 0; t < steps; ++t) {
    for (int l = 0; l < cfg.layers; ++l) {
      for (int r = 0; r < cfg.requests; ++r) {
        auto& row = rows[static_cast<std::size_t>(r)];
        row.request = r;
        row.keys.clear();
        row.bypass = 0;
        const int last = trace.pages(r) - 1;
        for (int h = 0; h < cfg.kv_heads; ++h)
          for (int pos : trace.selected(r, l, h)) {
            if (pos == last) ++row.bypass;  // still being appended to: never cached
            else row.keys.push_back(replay_key(cfg, max_pages, r, l, pos, h));
          }
      }
      model.step(static_cast<std::uint32_t>(t), l, rows);
    }
    if (t >= warmup) out.counters += model.step_stats().counters;
    trace.advance();
  }
  return out;
}

}  // namespace hattn
