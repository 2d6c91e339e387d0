// Host side of the HBM page cache: allocation, the step's launch sequence and its events, and the
// rare host-side operations, which run through CacheModel on a downloaded copy of the device state
// so that the two share one implementation of budgets, pins and release.
#include "hattn/kv/device_kv_cache.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <limits>
#include <type_traits>

#include "hattn/core/cuda_check.hpp"
#include "hattn/kernels/cuda_gather.hpp"

namespace hattn {
namespace {

// Lookup blocks per segment at most: 64 x 256 entries covers a 128K-token sequence's 8192 pages
// per KV head at 100% budget with a block per 256 entries.
constexpr int kMaxLookupParts = 64;

template <class T>
void copy_to_host(std::vector<T>& dst, const T* src, std::size_t n) {
  dst.resize(n);
  if (n) HATTN_CUDA_CHECK(cudaMemcpy(dst.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
}

template <class T>
void copy_to_device(T* dst, const std::vector<T>& src) {
  if (!src.empty()) HATTN_CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

}  // namespace

DeviceKVCache::DeviceKVCache(const HostKVPool& pool, const DeviceKVCacheConfig& config) : pool_(pool), config_(config) {
  constexpr const char* where = "DeviceKVCache";
  detail::require(pool.memory_kind() == HostMemoryKind::kPinnedMapped, where, "pool memory", to_string(pool.memory_kind()),
                  "pinned-mapped (the gather reads pages from the GPU)");
  detail::require(config.max_batch > 0 && config.max_batch <= 128, where, "max_batch", config.max_batch, "in [1, 128]");
  detail::require(config.max_selected > 0, where, "max_selected", config.max_selected, "> 0");
  detail::require(config.layers > 0, where, "layers", config.layers, "> 0");
  detail::require(config.staging_blocks >= 0, where, "staging_blocks", config.staging_blocks, ">= 0");
  // The step kernels keep a byte per request in shared memory (its row in the call).
  detail::require(config.max_requests > 0 && config.max_requests <= 32768, where, "max_requests", config.max_requests,
                  "in [1, 32768]");
  const auto& layout = pool.layout();
  detail::require(pool.capacity_pages() <= std::numeric_limits<std::int32_t>::max(), where, "pool pages",
                  pool.capacity_pages(), "< 2^31");
  shape_ = CacheShape{.slots = config.slots,
                      .max_requests = config.max_requests,
                      .pool_pages = static_cast<std::int32_t>(pool.capacity_pages()),
                      .kv_heads = layout.kv_heads,
                      .block_bytes = static_cast<std::int64_t>(2 * layout.head_block_elems() * dtype_bytes(layout.dtype)),
                      .layers = config.layers};
  shape_.validate();

  auto alloc = [&](auto*& ptr, std::size_t count) {
    void* p = nullptr;
    HATTN_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(count, 1) * sizeof(*ptr)));
    allocations_.push_back(p);
    ptr = static_cast<std::remove_reference_t<decltype(ptr)>>(p);
  };
  const auto S = static_cast<std::size_t>(shape_.slots), R = static_cast<std::size_t>(shape_.max_requests);
  const auto B = static_cast<std::size_t>(config.max_batch), H = static_cast<std::size_t>(shape_.kv_heads);
  const auto N = static_cast<std::size_t>(config.max_selected);
  try {
    HATTN_CUDA_CHECK(cudaMalloc(&hbm_slots_, S * static_cast<std::size_t>(shape_.block_bytes)));
    auto& v = view_;
    alloc(v.slot_key, S), alloc(v.slot_request, S), alloc(v.slot_stamp, S), alloc(v.slot_pinned, S);
    alloc(v.slot_hit, S), alloc(v.free_ring, S), alloc(v.slot_of, static_cast<std::size_t>(shape_.keys()));
    alloc(v.budget, R), alloc(v.used, R), alloc(v.pinned, R), alloc(v.request_stats, R);
    alloc(v.step_stats, 1), alloc(v.scalars, 1);
    alloc(v.part_misses, B * H * kMaxLookupParts), alloc(v.part_start, B * H * kMaxLookupParts);
    alloc(v.part_base, B * H * kMaxLookupParts), alloc(v.miss_key, N);
    alloc(v.row_acc, B * 4), alloc(v.row_hist, B * kCacheEvictionClasses), alloc(v.row_info, B);
    alloc(v.row_plan, B), alloc(v.row_ticket, B);
    alloc(v.gather_page, N), alloc(v.gather_head, N), alloc(v.gather_slot, N), alloc(v.gather_key, N);
    alloc(phase_ns_, detail::kCachePhases);
    if (config.staging_blocks > 0) {
      auto& a = staging_;
      HATTN_CUDA_CHECK(cudaMalloc(&a.blocks, static_cast<std::size_t>(config.staging_blocks) *
                                                 static_cast<std::size_t>(shape_.block_bytes)));
      allocations_.push_back(a.blocks);
      alloc(a.key_of, static_cast<std::size_t>(config.staging_blocks));
      alloc(a.index_of, static_cast<std::size_t>(shape_.keys()));
      alloc(a.count, 1);
      HATTN_CUDA_CHECK(cudaMemset(a.count, 0, sizeof(std::int32_t)));
      a.capacity = config.staging_blocks;
    }
    v.slots = shape_.slots, v.max_requests = shape_.max_requests, v.max_batch = config.max_batch;
    v.kv_heads = shape_.kv_heads, v.max_selected = config.max_selected, v.max_parts = kMaxLookupParts;
    v.block_bytes = shape_.block_bytes;

    HATTN_CUDA_CHECK(cudaMemset(v.slot_of, 0xff, static_cast<std::size_t>(shape_.keys()) * sizeof(std::int32_t)));
    HATTN_CUDA_CHECK(cudaMemset(v.slot_hit, 0, S * sizeof(std::uint32_t)));  // call ids start at 1
    HATTN_CUDA_CHECK(cudaMemset(v.row_hist, 0, B * kCacheEvictionClasses * sizeof(std::int32_t)));
    HATTN_CUDA_CHECK(cudaMemset(v.row_acc, 0, B * 4 * sizeof(std::int32_t)));
    HATTN_CUDA_CHECK(cudaMemset(v.row_plan, 0, B * sizeof(*v.row_plan)));
    HATTN_CUDA_CHECK(cudaMemset(v.row_ticket, 0, B * sizeof(*v.row_ticket)));
    const std::vector<detail::DeviceRequestCounters> zero_stats(R);
    copy_to_device(v.request_stats, zero_stats);
    stats_at_resize_ = zero_stats;
    const CacheStepStats first{};
    HATTN_CUDA_CHECK(cudaMemcpy(v.step_stats, &first, sizeof(first), cudaMemcpyHostToDevice));
    const detail::CacheScalars scalars{};
    HATTN_CUDA_CHECK(cudaMemcpy(v.scalars, &scalars, sizeof(scalars), cudaMemcpyHostToDevice));
    upload_state(CacheState::empty(shape_));

    cudaStream_t s = nullptr;
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    own_stream_ = s;
    cudaEvent_t e = nullptr;
    HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    selected_ready_ = e;
    HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    side_done_ = e;
    HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    staged_ready_ = e;
    for (auto& t : timing_events_) {
      HATTN_CUDA_CHECK(cudaEventCreate(&e));
      t = e;
    }
  } catch (...) {
    destroy();
    throw;
  }
}

DeviceKVCache::~DeviceKVCache() { destroy(); }

void DeviceKVCache::destroy() noexcept {
  // Must not throw; outstanding work is waited for so nothing writes freed memory. A deferred gather
  // is dropped; the staging copy and the decode, on a caller's stream that may be gone by now, are
  // waited for device-wide.
  if (deferred_) cudaDeviceSynchronize();
  if (side_done_ && side_pending_) cudaEventSynchronize(side_done_);
  for (auto* t : timing_events_)
    if (t) cudaEventDestroy(t);
  if (selected_ready_) cudaEventDestroy(selected_ready_);
  if (side_done_) cudaEventDestroy(side_done_);
  if (staged_ready_) cudaEventDestroy(staged_ready_);
  if (own_stream_) cudaStreamDestroy(own_stream_);
  for (void* p : allocations_) cudaFree(p);
  if (hbm_slots_) cudaFree(hbm_slots_);
  allocations_.clear();
  hbm_slots_ = nullptr;
  own_stream_ = nullptr;
  selected_ready_ = side_done_ = staged_ready_ = nullptr;
  for (auto& t : timing_events_) t = nullptr;
}

void DeviceKVCache::upload_state(const CacheState& st) {
  auto& v = view_;
  copy_to_device(v.slot_key, st.slot_key);
  copy_to_device(v.slot_request, st.slot_request);
  copy_to_device(v.slot_stamp, st.slot_stamp);
  copy_to_device(v.slot_pinned, st.slot_pinned);
  copy_to_device(v.free_ring, st.free_stack);  // the ring restarts at its head 0
  copy_to_device(v.budget, st.budget);
  copy_to_device(v.used, st.used);
  copy_to_device(v.pinned, st.pinned);
  const std::int32_t ring[2] = {st.free_top, 0};
  static_assert(offsetof(detail::CacheScalars, free_head) == offsetof(detail::CacheScalars, free_count) + sizeof(std::int32_t));
  HATTN_CUDA_CHECK(cudaMemcpy(&v.scalars->free_count, ring, sizeof(ring), cudaMemcpyHostToDevice));
  // The state replaces everything, so nothing of an earlier call is left to commit (callers have
  // synchronised first; this keeps a stale push count from landing on the new ring).
  const std::int32_t zero = 0;
  HATTN_CUDA_CHECK(cudaMemcpy(&v.scalars->pushed, &zero, sizeof(zero), cudaMemcpyHostToDevice));
  HATTN_CUDA_CHECK(cudaMemcpy(&v.scalars->uncommitted_rows, &zero, sizeof(zero), cudaMemcpyHostToDevice));
}

CacheState DeviceKVCache::download_state() {
  synchronize();
  CacheState st;
  const auto S = static_cast<std::size_t>(shape_.slots), R = static_cast<std::size_t>(shape_.max_requests);
  copy_to_host(st.slot_key, view_.slot_key, S);
  copy_to_host(st.slot_request, view_.slot_request, S);
  copy_to_host(st.slot_stamp, view_.slot_stamp, S);
  copy_to_host(st.slot_pinned, view_.slot_pinned, S);
  std::vector<std::int32_t> ring;
  copy_to_host(ring, view_.free_ring, S);
  copy_to_host(st.budget, view_.budget, R);
  copy_to_host(st.used, view_.used, R);
  copy_to_host(st.pinned, view_.pinned, R);
  detail::CacheScalars sc{};
  HATTN_CUDA_CHECK(cudaMemcpy(&sc, view_.scalars, sizeof(sc), cudaMemcpyDeviceToHost));
  // Free slots as the model's stack: the ring's entries from its head.
  st.free_top = sc.free_count;
  st.free_stack.resize(S);
  for (std::size_t i = 0; i < S; ++i) st.free_stack[i] = ring[(static_cast<std::size_t>(sc.free_head) + i) % S];
  return st;
}

std::int32_t DeviceKVCache::eviction_shortfall() {
  synchronize();
  std::int32_t n = 0;
  HATTN_CUDA_CHECK(cudaMemcpy(&n, &view_.scalars->shortfall, sizeof(n), cudaMemcpyDeviceToHost));
  return n;
}

std::vector<std::int32_t> DeviceKVCache::download_slot_of() {
  synchronize();
  std::vector<std::int32_t> out;
  copy_to_host(out, view_.slot_of, static_cast<std::size_t>(shape_.keys()));
  return out;
}

void DeviceKVCache::check_error() {
  detail::CacheScalars sc{};
  HATTN_CUDA_CHECK(cudaMemcpy(&sc, view_.scalars, sizeof(sc), cudaMemcpyDeviceToHost));
  if (sc.error == 0) return;
  const int zero = 0;
  HATTN_CUDA_CHECK(cudaMemcpy(&view_.scalars->error, &zero, sizeof(zero), cudaMemcpyHostToDevice));
  if (sc.error == 1)
    throw InvalidArgument(detail::concat("DeviceKVCache::step: request_of_row[", sc.error_row, "] must be an open request in [0, ",
                                         shape_.max_requests, ") (got ", sc.error_value, "); the row was skipped"));
  throw Error("DeviceKVCache::step: the free slots ran dry (budgets summed past the pool); blocks were not admitted");
}

void DeviceKVCache::synchronize() {
  admit_staged(deferred_compute_);
  if (side_pending_) {
    HATTN_CUDA_CHECK(cudaEventSynchronize(side_done_));
    side_pending_ = false;
  }
  // The latest call's ring pushes (and any shortfall) are otherwise committed by the next call's
  // plan: before the host reads the state, commit them now.
  if (commit_pending_) {
    detail::launch_cache_commit(view_, own_stream_);
    commit_pending_ = false;
  }
  HATTN_CUDA_CHECK(cudaStreamSynchronize(own_stream_));
  check_error();
}

template <class Op>
void DeviceKVCache::control(std::int32_t request, Op&& op) {
  CacheModel model(shape_, download_state(), last_clock_);
  const CacheState before = model.state();
  std::vector<BlockFill> fills = op(model);  // throws before anything on the device changed
  const CacheState& after = model.state();

  std::vector<BlockKey> keys;
  std::vector<std::int32_t> values;
  for (std::int32_t s = 0; s < shape_.slots; ++s)
    if (before.slot_key[s] >= 0 && before.slot_key[s] != after.slot_key[s]) {
      keys.push_back(before.slot_key[s]);
      values.push_back(-1);
    }
  upload_state(after);
  // Counters of what the operation evicted or gathered, added to the request's lifetime ones.
  if (request >= 0) {
    detail::DeviceRequestCounters rc{};
    HATTN_CUDA_CHECK(cudaMemcpy(&rc, view_.request_stats + request, sizeof(rc), cudaMemcpyDeviceToHost));
    rc.counters += model.request_stats(request).counters;
    HATTN_CUDA_CHECK(cudaMemcpy(view_.request_stats + request, &rc, sizeof(rc), cudaMemcpyHostToDevice));
  }
  const auto n_clear = keys.size();
  std::vector<std::int32_t> pages, heads, slots;
  for (const auto& f : fills) {
    keys.push_back(f.key);
    values.push_back(f.slot);
    pages.push_back(f.key / shape_.kv_heads);
    heads.push_back(f.key % shape_.kv_heads);
    slots.push_back(f.slot);
  }
  if (keys.empty()) return;
  // One scratch allocation per operation: these calls are rare and may synchronise.
  const auto n = keys.size();
  void* raw = nullptr;
  HATTN_CUDA_CHECK(cudaMalloc(&raw, (2 * n + 3 * pages.size() + 1) * sizeof(std::int32_t)));
  auto* scratch = static_cast<std::int32_t*>(raw);
  auto fail_safe = [&](auto&& fn) {
    try {
      fn();
    } catch (...) {
      cudaFree(scratch);
      throw;
    }
  };
  fail_safe([&] {
    HATTN_CUDA_CHECK(cudaMemcpy(scratch, keys.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    HATTN_CUDA_CHECK(cudaMemcpy(scratch + n, values.data(), n * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    detail::launch_cache_scatter(view_.slot_of, scratch, scratch + n, static_cast<int>(n_clear), own_stream_);
    if (!pages.empty()) {
      auto* dp = scratch + 2 * n;
      const auto m = pages.size();
      HATTN_CUDA_CHECK(cudaMemcpy(dp, pages.data(), m * sizeof(std::int32_t), cudaMemcpyHostToDevice));
      HATTN_CUDA_CHECK(cudaMemcpy(dp + m, heads.data(), m * sizeof(std::int32_t), cudaMemcpyHostToDevice));
      HATTN_CUDA_CHECK(cudaMemcpy(dp + 2 * m, slots.data(), m * sizeof(std::int32_t), cudaMemcpyHostToDevice));
      const auto& layout = pool_.layout();
      // Each block is published by the gather once it is copied.
      cuda::GatherParams g{.host_pages = pool_.pages_base(), .hbm_slots = hbm_slots_, .page_ids = dp, .heads = dp + m,
                           .slots = dp + 2 * m, .count = nullptr, .n = static_cast<int>(m), .kv_heads = layout.kv_heads,
                           .page_size = layout.page_size, .head_dim = layout.head_dim, .dtype = layout.dtype,
                           .slot_of = view_.slot_of, .keys = scratch + n_clear};
      cuda::launch_gather_pages(g, own_stream_);
    }
    HATTN_CUDA_CHECK(cudaStreamSynchronize(own_stream_));
  });
  HATTN_CUDA_CHECK(cudaFree(scratch));
}

void DeviceKVCache::open_request(std::int32_t request, std::int32_t budget_slots) {
  control(-1, [&](CacheModel& m) {
    m.open_request(request, budget_slots);
    return std::vector<BlockFill>{};
  });
  const detail::DeviceRequestCounters zero{};
  HATTN_CUDA_CHECK(cudaMemcpy(view_.request_stats + request, &zero, sizeof(zero), cudaMemcpyHostToDevice));
  stats_at_resize_[static_cast<std::size_t>(request)] = zero;
}

void DeviceKVCache::set_budget(std::int32_t request, std::int32_t budget_slots) {
  control(request, [&](CacheModel& m) {
    m.set_budget(request, budget_slots);
    return std::vector<BlockFill>{};
  });
}

std::vector<std::int32_t> DeviceKVCache::resize_budgets(const BudgetPolicy& policy) {
  synchronize();
  const auto R = static_cast<std::size_t>(shape_.max_requests);
  std::vector<detail::DeviceRequestCounters> now;
  copy_to_host(now, view_.request_stats, R);
  const CacheState st = download_state();
  std::vector<std::int32_t> open;
  std::vector<RequestDemand> demands;
  for (std::size_t r = 0; r < R; ++r) {
    if (st.budget[r] < 0) continue;
    const auto& a = now[r].counters;
    const auto& b = stats_at_resize_[r].counters;
    const auto steps = now[r].steps - stats_at_resize_[r].steps;
    const auto hits = a.hits - b.hits, misses = a.misses - b.misses, bypass = a.bypass - b.bypass;
    RequestDemand d{.blocks_per_step = steps > 0 ? static_cast<double>(hits + misses + bypass) / static_cast<double>(steps) : 0.0,
                    .hit_rate = hits + misses > 0 ? static_cast<double>(hits) / static_cast<double>(hits + misses) : 1.0,
                    .pinned_slots = st.pinned[r]};
    open.push_back(static_cast<std::int32_t>(r));
    demands.push_back(d);
  }
  const auto planned = plan_budgets(demands, shape_.slots, policy);
  control(-1, [&](CacheModel& m) {
    for (int pass = 0; pass < 2; ++pass)  // shrinks first, so the sum never passes the pool
      for (std::size_t i = 0; i < open.size(); ++i) {
        const bool shrink = planned[i] < m.state().budget[open[i]];
        if (shrink == (pass == 0)) m.set_budget(open[i], planned[i]);
      }
    return std::vector<BlockFill>{};
  });
  stats_at_resize_ = now;
  std::vector<std::int32_t> out(R, -1);
  for (std::size_t i = 0; i < open.size(); ++i) out[static_cast<std::size_t>(open[i])] = planned[i];
  return out;
}

namespace {
std::vector<BlockKey> keys_of(std::span<const PageId> pages, int kv_heads) {
  std::vector<BlockKey> keys;
  keys.reserve(pages.size() * static_cast<std::size_t>(kv_heads));
  for (auto p : pages)
    for (int h = 0; h < kv_heads; ++h) keys.push_back(p * kv_heads + h);
  return keys;
}
}  // namespace

void DeviceKVCache::pin(std::int32_t request, std::span<const PageId> pages) {
  for (auto p : pages)
    detail::require(p >= 0 && p < shape_.pool_pages, "DeviceKVCache::pin", "page", p, "a page id of the pool");
  const auto keys = keys_of(pages, shape_.kv_heads);
  control(request, [&](CacheModel& m) { return m.pin(request, keys); });
}

void DeviceKVCache::unpin(std::int32_t request, std::span<const PageId> pages) {
  for (auto p : pages)
    detail::require(p >= 0 && p < shape_.pool_pages, "DeviceKVCache::unpin", "page", p, "a page id of the pool");
  const auto keys = keys_of(pages, shape_.kv_heads);
  control(request, [&](CacheModel& m) {
    m.unpin(request, keys);
    return std::vector<BlockFill>{};
  });
}

void DeviceKVCache::invalidate(std::int32_t request, std::span<const PageId> pages) {
  for (auto p : pages)
    detail::require(p >= 0 && p < shape_.pool_pages, "DeviceKVCache::invalidate", "page", p, "a page id of the pool");
  const auto keys = keys_of(pages, shape_.kv_heads);
  control(request, [&](CacheModel& m) {
    m.invalidate(request, keys);
    return std::vector<BlockFill>{};
  });
}

void DeviceKVCache::release(std::int32_t request) {
  control(-1, [&](CacheModel& m) {
    m.release(request);
    return std::vector<BlockFill>{};
  });
}

void DeviceKVCache::step(const CacheStepParams& p, cuda::Stream compute, cuda::Stream side) {
  constexpr const char* where = "DeviceKVCache::step";
  detail::require(p.layer >= 0 && p.layer < config_.layers, where, "layer", p.layer,
                  "in [0, layers = ", config_.layers, ")");
  detail::require(p.batch >= 0 && p.batch <= config_.max_batch, where, "batch", p.batch,
                  "in [0, max_batch = ", config_.max_batch, "]");
  detail::require(p.kv_heads == shape_.kv_heads, where, "kv_heads", p.kv_heads,
                  "the pool's ", shape_.kv_heads);
  detail::require(p.step <= (std::numeric_limits<std::uint32_t>::max() - 1) / static_cast<std::uint32_t>(config_.layers) - 1,
                  where, "step", p.step, "small enough for a 32-bit stamp clock");
  const std::uint32_t now = shape_.clock(p.step, p.layer);
  detail::require(now >= last_clock_, where, "(step, layer)",
                  [&] { return detail::concat("(", p.step, ", ", p.layer, ")"); }, "not before the last call (clock ",
                  last_clock_, ")");
  detail::require(p.selected_capacity >= 0 && p.selected_capacity <= config_.max_selected, where, "selected_capacity",
                  p.selected_capacity, "in [0, max_selected = ", config_.max_selected, "]");
  if (p.batch > 0)
    detail::require(p.page_table && p.page_indptr && p.selected && p.selected_offset && p.selected_count && p.request_of_row,
                    where, "device arrays", "a null pointer", "all set");
  detail::require(!p.staged || staging_.enabled(), where, "staged", "true", "only with staging_blocks > 0");
  if (side == compute) side = own_stream_;  // the overlap needs two streams
  last_clock_ = now;
  admit_staged(deferred_compute_);  // a staged call before this one whose caller did not
  if (p.batch == 0) return;

  // The previous call's evictions and gathers must be finished before this layer's decode reads slot_of.
  if (side_pending_) HATTN_CUDA_CHECK(cudaStreamWaitEvent(compute, side_done_, 0));
  HATTN_CUDA_CHECK(cudaEventRecord(selected_ready_, compute));
  HATTN_CUDA_CHECK(cudaStreamWaitEvent(side, selected_ready_, 0));

  if (++call_id_ == 0) {  // after 2^32 calls: slot_hit may hold any id, clear it before reusing them
    HATTN_CUDA_CHECK(cudaMemsetAsync(view_.slot_hit, 0, static_cast<std::size_t>(shape_.slots) * sizeof(std::uint32_t),
                                     side));
    call_id_ = 1;
  }
  const int segments = p.batch * shape_.kv_heads;
  detail::CacheCallArgs a{.page_table = p.page_table, .page_indptr = p.page_indptr, .selected = p.selected,
                                .selected_offset = p.selected_offset, .selected_count = p.selected_count,
                                .request_of_row = p.request_of_row, .batch = p.batch, .step = p.step, .now = now,
                                .age_width = cache_age_width(config_.layers), .call_id = call_id_,
                                .capacity = p.selected_capacity,
                                .parts = detail::cache_lookup_parts(p.selected_capacity, segments, view_.max_parts)};
  if (timing_ && phases_) {
    HATTN_CUDA_CHECK(cudaMemsetAsync(phase_ns_, 0, detail::kCachePhases * sizeof(*phase_ns_), side));
    for (int k = 0; k < detail::kCachePhases; ++k)
      if (detail::cache_phase_is_min(k)) HATTN_CUDA_CHECK(cudaMemsetAsync(phase_ns_ + k, 0xff, sizeof(*phase_ns_), side));
    a.phase_ns = phase_ns_;
  }
  if (timing_) HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[0], side));
  detail::launch_cache_lookup_plan(view_, a, side);
  // From here the device may hold uncommitted rows, even if a later launch of this call throws.
  commit_pending_ = true;
  // An event between the two kernels would cut their programmatic overlap: recorded only when asked.
  if (timing_ && per_stage_) HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[3], side));
  detail::launch_cache_evict_admit(view_, a, side);
  if (timing_) HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[1], side));
  timed_ = timing_;
  timed_per_stage_ = timing_ && per_stage_;
  timed_phases_ = timing_ && phases_;
  if (p.staged) {
    deferred_ = true;
    deferred_compute_ = compute;
    deferred_side_ = side;
    deferred_capacity_ = p.selected_capacity;
    // Until admit_staged(), side_done_ (which the next step() and wait_admission() wait for) marks
    // the maintenance. The staging and the decode the caller enqueues next read slot_of beside it:
    // until the gather no slot's bytes change, so a slot either of them finds still holds its
    // block, and one an eviction unmapped first is read from the staging area or the host.
    HATTN_CUDA_CHECK(cudaEventRecord(side_done_, side));
    side_pending_ = true;
  } else {
    launch_gather(side, p.selected_capacity, false);
  }
}

void DeviceKVCache::launch_gather(cuda::Stream side, std::int32_t capacity, bool staged) {
  const auto& layout = pool_.layout();
  cuda::GatherParams g{.host_pages = pool_.pages_base(), .hbm_slots = hbm_slots_, .page_ids = view_.gather_page,
                       .heads = view_.gather_head, .slots = view_.gather_slot, .count = &view_.scalars->gather_count,
                       .n = capacity, .kv_heads = layout.kv_heads, .page_size = layout.page_size,
                       .head_dim = layout.head_dim, .dtype = layout.dtype, .slot_of = view_.slot_of,
                       .keys = view_.gather_key};
  if (staged) g.staging = staging_;
  // timed_, not timing_: a deferred gather belongs to the step() that set it.
  if (timed_) HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[4], side));
  cuda::launch_gather_pages(g, side);
  // Emptied after every staged gather, so the next staging (which waits for side_done_ through the
  // next step()) starts from entry 0.
  if (staged) HATTN_CUDA_CHECK(cudaMemsetAsync(staging_.count, 0, sizeof(std::int32_t), side));
  if (timed_) HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[2], side));
  HATTN_CUDA_CHECK(cudaEventRecord(side_done_, side));
  side_pending_ = true;
}

void DeviceKVCache::admit_staged(cuda::Stream compute_stream) {
  if (!deferred_) return;
  deferred_ = false;
  HATTN_CUDA_CHECK(cudaEventRecord(staged_ready_, compute_stream));
  HATTN_CUDA_CHECK(cudaStreamWaitEvent(deferred_side_, staged_ready_, 0));
  launch_gather(deferred_side_, deferred_capacity_, true);
}

void DeviceKVCache::wait_admission(cuda::Stream compute_stream) {
  if (side_pending_)
    HATTN_CUDA_CHECK(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(compute_stream), side_done_, 0));
}

CacheStepTiming DeviceKVCache::last_timing() {
  synchronize();
  if (!timed_) return {};
  float a = 0, b = 0, c = 0;
  HATTN_CUDA_CHECK(cudaEventElapsedTime(&a, timing_events_[0], timing_events_[1]));
  HATTN_CUDA_CHECK(cudaEventElapsedTime(&b, timing_events_[4], timing_events_[2]));
  if (timed_per_stage_) HATTN_CUDA_CHECK(cudaEventElapsedTime(&c, timing_events_[0], timing_events_[3]));
  CacheStepTiming t{.maintenance_us = 1000.0f * a, .gather_us = 1000.0f * b, .lookup_plan_us = 1000.0f * c,
                    .evict_admit_us = timed_per_stage_ ? 1000.0f * (a - c) : 0.0f};
  if (timed_phases_) {
    unsigned long long ns[detail::kCachePhases] = {};
    HATTN_CUDA_CHECK(cudaMemcpy(ns, phase_ns_, sizeof(ns), cudaMemcpyDeviceToHost));
    // Marks are relative to stage 1's first block (ns[0]); without it, none means anything.
    const auto unset = [](unsigned long long v) { return v == 0 || v == ~0ull; };
    for (int k = 0; k < detail::kCachePhases; ++k)
      t.phase_us[k] = unset(ns[k]) || unset(ns[0]) ? -1.0f
                                                   : static_cast<float>(static_cast<double>(ns[k] - ns[0]) * 1e-3);
  }
  return t;
}

float DeviceKVCache::empty_stages_us(const CacheStepParams& p, cuda::Stream side) {
  synchronize();
  if (side == nullptr) side = own_stream_;
  const int segments = p.batch * shape_.kv_heads;
  const detail::CacheCallArgs a{.batch = p.batch,
                                .parts = detail::cache_lookup_parts(p.selected_capacity, segments, view_.max_parts)};
  // Held behind a short host function, as the benchmark holds step(), so launches do not gate.
  HATTN_CUDA_CHECK(cudaLaunchHostFunc(
      reinterpret_cast<cudaStream_t>(side), [](void*) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(300);
        while (std::chrono::steady_clock::now() < until) {
        }
      },
      nullptr));
  HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[0], side));
  detail::launch_cache_empty_stages(view_, a, side);
  HATTN_CUDA_CHECK(cudaEventRecord(timing_events_[1], side));
  HATTN_CUDA_CHECK(cudaEventSynchronize(timing_events_[1]));
  float ms = 0;
  HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, timing_events_[0], timing_events_[1]));
  timed_ = false;
  return 1000.0f * ms;
}

RequestCacheStats DeviceKVCache::request_stats(std::int32_t request) {
  detail::require(request >= 0 && request < shape_.max_requests, "DeviceKVCache::request_stats", "request", request,
                  "in [0, ", shape_.max_requests, ")");
  synchronize();
  detail::DeviceRequestCounters rc{};
  HATTN_CUDA_CHECK(cudaMemcpy(&rc, view_.request_stats + request, sizeof(rc), cudaMemcpyDeviceToHost));
  RequestCacheStats out{.counters = rc.counters, .steps = rc.steps};
  std::int32_t v[3] = {};
  HATTN_CUDA_CHECK(cudaMemcpy(&v[0], view_.budget + request, sizeof(std::int32_t), cudaMemcpyDeviceToHost));
  HATTN_CUDA_CHECK(cudaMemcpy(&v[1], view_.used + request, sizeof(std::int32_t), cudaMemcpyDeviceToHost));
  HATTN_CUDA_CHECK(cudaMemcpy(&v[2], view_.pinned + request, sizeof(std::int32_t), cudaMemcpyDeviceToHost));
  out.budget_slots = std::max(v[0], 0);
  out.used_slots = v[1];
  out.pinned_slots = v[2];
  return out;
}

CacheStepStats DeviceKVCache::step_stats() {
  synchronize();
  CacheStepStats s{};
  HATTN_CUDA_CHECK(cudaMemcpy(&s, view_.step_stats, sizeof(s), cudaMemcpyDeviceToHost));
  return s;
}

}  // namespace hattn
