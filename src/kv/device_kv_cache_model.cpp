// Host model of the HBM page cache; the GPU kernels in cuda/cache_kernels.cu implement the same
// step (tests compare them call by call), so a change here is a change there.
#include <algorithm>
#include <limits>
#include <numeric>
#include <unordered_set>

#include "hattn/kv/cache_model.hpp"

namespace hattn {
namespace {
constexpr std::uint32_t kNoStep = std::numeric_limits<std::uint32_t>::max();
}  // namespace

void CacheShape::validate() const {
  // <= 2^30: the device forms free-ring positions as a position below `slots` plus an offset of at
  // most `slots` (cuda/cache_kernels.cu, ring_at), which must not wrap an int.
  detail::require(slots > 0 && slots <= (1 << 30), "CacheShape", "slots", slots, "in [1, 2^30]");
  detail::require(max_requests > 0, "CacheShape", "max_requests", max_requests, "> 0");
  detail::require(pool_pages > 0, "CacheShape", "pool_pages", pool_pages, "> 0");
  detail::require(kv_heads > 0, "CacheShape", "kv_heads", kv_heads, "> 0");
  detail::require(keys() <= std::numeric_limits<BlockKey>::max(), "CacheShape", "pool_pages * kv_heads", keys(),
                  "< 2^31 (keys are 32-bit)");
  detail::require(block_bytes > 0, "CacheShape", "block_bytes", block_bytes, "> 0");
  detail::require(layers > 0, "CacheShape", "layers", layers, "> 0");
}

CacheState CacheState::empty(const CacheShape& shape) {
  CacheState s;
  const auto n = static_cast<std::size_t>(shape.slots);
  s.slot_key.assign(n, -1);
  s.slot_request.assign(n, -1);
  s.slot_stamp.assign(n, 0);
  s.slot_pinned.assign(n, 0);
  s.free_stack.resize(n);
  // Pops take the top, so the lowest slots are handed out first: easier to read in a debugger.
  for (std::size_t i = 0; i < n; ++i) s.free_stack[i] = static_cast<std::int32_t>(n - 1 - i);
  s.free_top = shape.slots;
  const auto r = static_cast<std::size_t>(shape.max_requests);
  s.budget.assign(r, -1);
  s.used.assign(r, 0);
  s.pinned.assign(r, 0);
  return s;
}

CacheModel::CacheModel(const CacheShape& shape, CacheReplacement replacement)
    : shape_(shape), replacement_(replacement) {
  shape_.validate();
  state_ = CacheState::empty(shape_);
  rebuild_index();
}

CacheModel::CacheModel(const CacheShape& shape, CacheState state, std::uint32_t last_clock)
    : shape_(shape), replacement_(CacheReplacement::kBucketedLru), state_(std::move(state)), last_clock_(last_clock) {
  shape_.validate();
  detail::require(state_.slot_key.size() == static_cast<std::size_t>(shape_.slots), "CacheModel", "state.slot_key.size()",
                  state_.slot_key.size(), "shape.slots");
  rebuild_index();
  check_invariants();
}

void CacheModel::rebuild_index() {
  slot_of_.clear();
  owned_.assign(static_cast<std::size_t>(shape_.max_requests), {});
  owned_pos_.assign(static_cast<std::size_t>(shape_.slots), -1);
  recency_.assign(static_cast<std::size_t>(shape_.slots), 0);
  for (std::int32_t s = 0; s < shape_.slots; ++s) {
    const auto key = state_.slot_key[s];
    if (key < 0) continue;
    slot_of_[key] = s;
    const auto r = state_.slot_request[s];
    if (r >= 0 && r < shape_.max_requests) {
      owned_pos_[s] = static_cast<std::int32_t>(owned_[r].size());
      owned_[r].push_back(s);
    }
  }
  if (request_stats_.empty()) {
    request_stats_.assign(static_cast<std::size_t>(shape_.max_requests), {});
    request_last_step_.assign(static_cast<std::size_t>(shape_.max_requests), kNoStep);
  }
}

bool CacheModel::is_open(std::int32_t request) const {
  return request >= 0 && request < shape_.max_requests && state_.budget[request] >= 0;
}

void CacheModel::check_request(std::int32_t request, const char* where) const {
  detail::require(request >= 0 && request < shape_.max_requests, where, "request", request,
                  "in [0, ", shape_.max_requests, ")");
  detail::require(state_.budget[request] >= 0, where, "request", request, "an open request");
}

void CacheModel::check_key(BlockKey key, const char* where) const {
  detail::require(key >= 0 && key < shape_.keys(), where, "key", key,
                  "in [0, pool_pages * kv_heads = ", shape_.keys(), ")");
}

std::int32_t CacheModel::slot_of(BlockKey key) const {
  const auto it = slot_of_.find(key);
  return it == slot_of_.end() ? -1 : it->second;
}

RequestCacheStats CacheModel::request_stats(std::int32_t request) const {
  detail::require(request >= 0 && request < shape_.max_requests, "CacheModel::request_stats", "request", request,
                  "in [0, max_requests)");
  RequestCacheStats out = request_stats_[request];
  out.budget_slots = std::max(state_.budget[request], 0);
  out.used_slots = state_.used[request];
  out.pinned_slots = state_.pinned[request];
  return out;
}

void CacheModel::take_slot(std::int32_t slot, std::int32_t request, BlockKey key, std::uint32_t stamp) {
  state_.slot_key[slot] = key;
  state_.slot_request[slot] = request;
  state_.slot_stamp[slot] = stamp;
  state_.slot_pinned[slot] = 0;
  recency_[slot] = ++clock_;
  slot_of_[key] = slot;
  owned_pos_[slot] = static_cast<std::int32_t>(owned_[request].size());
  owned_[request].push_back(slot);
  ++state_.used[request];
}

void CacheModel::drop_slot(std::int32_t slot) {
  const auto r = state_.slot_request[slot];
  auto& list = owned_[r];
  const auto pos = owned_pos_[slot];
  list[pos] = list.back();
  owned_pos_[list[pos]] = pos;
  list.pop_back();
  owned_pos_[slot] = -1;
  slot_of_.erase(state_.slot_key[slot]);
  --state_.used[r];
  if (state_.slot_pinned[slot]) --state_.pinned[r];
  state_.slot_key[slot] = -1;
  state_.slot_request[slot] = -1;
  state_.slot_pinned[slot] = 0;
  state_.free_stack[state_.free_top++] = slot;
}

std::int64_t CacheModel::evict(std::int32_t request, std::int64_t need, std::uint32_t now) {
  if (need <= 0) return 0;
  std::vector<std::int32_t> victims;
  const auto& list = owned_[request];
  if (replacement_ == CacheReplacement::kBucketedLru) {
    // The GPU rule: a histogram of eviction classes, then every block in the oldest classes that
    // together hold at least `need`; the last class goes whole, so this may evict a little more.
    const auto width = cache_age_width(shape_.layers);
    auto cls = [&](std::int32_t s) { return cache_eviction_class(now - state_.slot_stamp[s], state_.slot_key[s], width); };
    std::int64_t hist[kCacheEvictionClasses] = {};
    for (auto s : list)
      if (!state_.slot_pinned[s] && state_.slot_stamp[s] != now) ++hist[cls(s)];
    int from = kCacheEvictionClasses;
    std::int64_t acc = 0;
    while (acc < need && from > 0) acc += hist[--from];
    for (auto s : list)
      if (!state_.slot_pinned[s] && state_.slot_stamp[s] != now && cls(s) >= from) victims.push_back(s);
  } else {
    for (auto s : list)
      if (!state_.slot_pinned[s] && state_.slot_stamp[s] != now) victims.push_back(s);
    const auto n = std::min<std::int64_t>(need, static_cast<std::int64_t>(victims.size()));
    std::nth_element(victims.begin(), victims.begin() + (n > 0 ? n - 1 : 0), victims.end(),
                     [&](std::int32_t a, std::int32_t b) { return recency_[a] < recency_[b]; });
    victims.resize(static_cast<std::size_t>(n));
  }
  for (auto s : victims) drop_slot(s);
  request_stats_[request].counters.evicted += static_cast<std::int64_t>(victims.size());
  return static_cast<std::int64_t>(victims.size());
}

void CacheModel::open_request(std::int32_t request, std::int32_t budget_slots) {
  constexpr const char* where = "CacheModel::open_request";
  detail::require(request >= 0 && request < shape_.max_requests, where, "request", request,
                  "in [0, ", shape_.max_requests, ")");
  detail::require(state_.budget[request] < 0, where, "request", request, "a request that is not open");
  detail::require(budget_slots >= 0 && budget_slots <= shape_.slots, where, "budget_slots", budget_slots,
                  "in [0, slots = ", shape_.slots, "]");
  std::int64_t sum = budget_slots;
  for (auto b : state_.budget) sum += std::max(b, 0);
  detail::require(sum <= shape_.slots, where, "sum of budgets", sum, "<= slots = ", shape_.slots);
  state_.budget[request] = budget_slots;
  request_stats_[request] = {};
  request_last_step_[request] = kNoStep;
}

void CacheModel::set_budget(std::int32_t request, std::int32_t budget_slots) {
  constexpr const char* where = "CacheModel::set_budget";
  check_request(request, where);
  detail::require(budget_slots >= 0 && budget_slots <= shape_.slots, where, "budget_slots", budget_slots,
                  "in [0, slots = ", shape_.slots, "]");
  std::int64_t sum = budget_slots;
  for (std::int32_t r = 0; r < shape_.max_requests; ++r)
    if (r != request) sum += std::max(state_.budget[r], 0);
  detail::require(sum <= shape_.slots, where, "sum of budgets", sum, "<= slots = ", shape_.slots);
  detail::require(budget_slots >= state_.pinned[request], where, "budget_slots", budget_slots,
                  ">= pinned blocks of the request = ", state_.pinned[request]);
  state_.budget[request] = budget_slots;
  // Between steps every unpinned block is evictable: look from the step after the last one.
  evict(request, state_.used[request] - budget_slots, last_clock_ + 1);
}

std::vector<BlockFill> CacheModel::pin(std::int32_t request, std::span<const BlockKey> keys) {
  constexpr const char* where = "CacheModel::pin";
  check_request(request, where);
  std::unordered_set<BlockKey> seen;
  std::int64_t new_pins = 0, new_blocks = 0;
  for (auto k : keys) {
    check_key(k, where);
    detail::require(seen.insert(k).second, where, "keys", k, "each key once");
    const auto s = slot_of(k);
    detail::require(s < 0 || state_.slot_request[s] == request, where, "key", k, "a block not cached for another request");
    if (s < 0 || !state_.slot_pinned[s]) ++new_pins;
    if (s < 0) ++new_blocks;
  }
  if (state_.pinned[request] + new_pins > state_.budget[request])
    throw OutOfCapacity(detail::concat(where, ": ", state_.pinned[request] + new_pins, " pinned blocks of request ",
                                       request, " would exceed its budget of ", state_.budget[request], " slots"));
  // Room for the new blocks: evict unpinned ones that are not among the keys being pinned.
  for (auto k : keys)
    if (const auto s = slot_of(k); s >= 0 && !state_.slot_pinned[s]) {
      state_.slot_pinned[s] = 1;
      ++state_.pinned[request];
    }
  evict(request, state_.used[request] + new_blocks - state_.budget[request], last_clock_ + 1);
  std::vector<BlockFill> fills;
  for (auto k : keys) {
    if (slot_of(k) >= 0) continue;
    const auto s = state_.free_stack[--state_.free_top];
    take_slot(s, request, k, last_clock_);
    state_.slot_pinned[s] = 1;
    ++state_.pinned[request];
    fills.push_back({k, s});
  }
  request_stats_[request].counters.admitted += static_cast<std::int64_t>(fills.size());
  request_stats_[request].counters.pcie_bytes += static_cast<std::int64_t>(fills.size()) * shape_.block_bytes;
  return fills;
}

void CacheModel::unpin(std::int32_t request, std::span<const BlockKey> keys) {
  constexpr const char* where = "CacheModel::unpin";
  check_request(request, where);
  for (auto k : keys) {
    check_key(k, where);
    const auto s = slot_of(k);
    detail::require(s >= 0 && state_.slot_request[s] == request && state_.slot_pinned[s], where, "key", k,
                    "a block pinned by this request");
  }
  for (auto k : keys) {
    const auto s = slot_of(k);
    if (state_.slot_pinned[s]) {  // a key listed twice is unpinned once
      state_.slot_pinned[s] = 0;
      --state_.pinned[request];
    }
  }
}

void CacheModel::invalidate(std::int32_t request, std::span<const BlockKey> keys) {
  constexpr const char* where = "CacheModel::invalidate";
  check_request(request, where);
  for (auto k : keys) check_key(k, where);
  for (auto k : keys)
    if (const auto s = slot_of(k); s >= 0 && state_.slot_request[s] == request) drop_slot(s);
}

void CacheModel::release(std::int32_t request) {
  check_request(request, "CacheModel::release");
  while (!owned_[request].empty()) drop_slot(owned_[request].back());
  state_.budget[request] = -1;
}

std::vector<BlockFill> CacheModel::step(std::uint32_t t, int layer, std::span<const CacheAccess> rows) {
  constexpr const char* where = "CacheModel::step";
  detail::require(layer >= 0 && layer < shape_.layers, where, "layer", layer,
                  "in [0, layers = ", shape_.layers, ")");
  detail::require(t <= (std::numeric_limits<std::uint32_t>::max() - 1) / static_cast<std::uint32_t>(shape_.layers) - 1,
                  where, "step", t, "small enough for a 32-bit stamp clock");
  const std::uint32_t now = shape_.clock(t, layer);
  detail::require(now >= last_clock_, where, "(step, layer)", [&] { return detail::concat("(", t, ", ", layer, ")"); },
                  "not before the last call (clock ", last_clock_, ")");
  {
    std::unordered_set<std::int32_t> requests;
    std::unordered_set<BlockKey> keys;
    for (const auto& row : rows) {
      check_request(row.request, where);
      detail::require(requests.insert(row.request).second, where, "request", row.request, "in one row only");
      for (auto k : row.keys) {
        check_key(k, where);
        detail::require(keys.insert(k).second, where, "key", k, "selected once per call");
        const auto s = slot_of(k);
        detail::require(s < 0 || state_.slot_request[s] == row.request, where, "key", k,
                        "a block not cached for another request");
      }
    }
  }
  last_clock_ = now;
  if (step_stats_.step != t) step_stats_ = {t, {}};

  // Lookup of every row first, as the GPU does (one kernel for all rows before any eviction).
  std::vector<std::vector<BlockKey>> missed(rows.size());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto r = rows[i].request;
    auto& c = request_stats_[r].counters;
    for (auto k : rows[i].keys) {
      if (const auto s = slot_of(k); s >= 0) {
        state_.slot_stamp[s] = now;
        recency_[s] = ++clock_;
        ++c.hits;
      } else {
        missed[i].push_back(k);
      }
    }
    c.misses += static_cast<std::int64_t>(missed[i].size());
    c.bypass += rows[i].bypass;
    step_stats_.counters.hits += static_cast<std::int64_t>(rows[i].keys.size() - missed[i].size());
    step_stats_.counters.misses += static_cast<std::int64_t>(missed[i].size());
    step_stats_.counters.bypass += rows[i].bypass;
    if (request_last_step_[r] != t) {
      request_last_step_[r] = t;
      ++request_stats_[r].steps;
    }
  }

  std::vector<BlockFill> fills;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const auto r = rows[i].request;
    std::int64_t fresh = 0;
    for (auto s : owned_[r]) fresh += !state_.slot_pinned[s] && state_.slot_stamp[s] == now;
    const std::int64_t budget = state_.budget[r];
    const std::int64_t room = budget - state_.pinned[r] - fresh;
    const auto admit = std::clamp<std::int64_t>(static_cast<std::int64_t>(missed[i].size()), 0, std::max<std::int64_t>(room, 0));
    const auto evicted = evict(r, state_.used[r] + admit - budget, now);
    for (std::int64_t j = 0; j < admit; ++j) {
      const auto s = state_.free_stack[--state_.free_top];
      take_slot(s, r, missed[i][j], now);
      fills.push_back({missed[i][j], s});
    }
    auto& c = request_stats_[r].counters;
    c.admitted += admit;
    c.pcie_bytes += admit * shape_.block_bytes;
    step_stats_.counters.admitted += admit;
    step_stats_.counters.evicted += evicted;
    step_stats_.counters.pcie_bytes += admit * shape_.block_bytes;
  }
  return fills;
}

void CacheModel::check_invariants() const {
  auto fail = [](auto&&... parts) { throw Error(detail::concat("CacheModel invariant: ", parts...)); };
  std::vector<std::int32_t> used(static_cast<std::size_t>(shape_.max_requests), 0);
  std::vector<std::int32_t> pinned(used.size(), 0);
  std::int64_t occupied = 0;
  for (std::int32_t s = 0; s < shape_.slots; ++s) {
    const auto k = state_.slot_key[s];
    const auto r = state_.slot_request[s];
    if (k < 0) {
      if (r != -1) fail("free slot ", s, " has owner ", r);
      continue;
    }
    ++occupied;
    if (r < 0 || r >= shape_.max_requests || state_.budget[r] < 0) fail("slot ", s, " owned by closed request ", r);
    if (slot_of(k) != s) fail("slot ", s, " holds key ", k, " but the map says ", slot_of(k));
    ++used[r];
    pinned[r] += state_.slot_pinned[s];
  }
  if (static_cast<std::int64_t>(slot_of_.size()) != occupied)
    fail("map has ", slot_of_.size(), " keys but ", occupied, " slots are occupied");
  if (state_.free_top != shape_.slots - occupied) {
    // Name the counter that drifted and by how much: the ring's count against the free slots, and
    // the use counts against the owned slots (a ring count too high with a use count too low is an
    // eviction that was planned but not made; a ring count too low is a slot popped twice).
    const std::int64_t free_slots = shape_.slots - occupied;
    const std::int64_t drift = state_.free_top - free_slots;
    std::int64_t used_sum = 0;
    for (std::int32_t r = 0; r < shape_.max_requests; ++r) used_sum += state_.used[r];
    fail("free_top ", state_.free_top, " with ", occupied, " occupied of ", shape_.slots, " slots: the free ring counts ",
         drift > 0 ? "+" : "", drift, " against the ", free_slots, " free slots; use counts sum to ", used_sum,
         " against ", occupied, " owned slots (", used_sum - occupied >= 0 ? "+" : "", used_sum - occupied, ")");
  }
  std::vector<std::uint8_t> on_stack(static_cast<std::size_t>(shape_.slots), 0);
  for (std::int32_t i = 0; i < state_.free_top; ++i) {
    const auto s = state_.free_stack[i];
    if (s < 0 || s >= shape_.slots || on_stack[s] || state_.slot_key[s] >= 0) fail("free stack entry ", i, " = ", s);
    on_stack[s] = 1;
  }
  std::int64_t budgets = 0;
  for (std::int32_t r = 0; r < shape_.max_requests; ++r) {
    if (used[r] != state_.used[r]) fail("request ", r, " uses ", used[r], " slots, counted ", state_.used[r]);
    if (pinned[r] != state_.pinned[r]) fail("request ", r, " pins ", pinned[r], ", counted ", state_.pinned[r]);
    if (used[r] > std::max(state_.budget[r], 0)) fail("request ", r, " uses ", used[r], " > budget ", state_.budget[r]);
    budgets += std::max(state_.budget[r], 0);
  }
  if (budgets > shape_.slots) fail("budgets sum to ", budgets, " > slots ", shape_.slots);
}

}  // namespace hattn
