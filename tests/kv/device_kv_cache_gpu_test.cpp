// DeviceKVCache on the GPU against its host model, call by call: the same hits, misses, owners,
// budgets and statistics, every cached slot byte-equal to its host block, release freeing every slot.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>

#include "hattn/core/cuda_check.hpp"
#include "hattn/kernels/cuda_decode.hpp"
#include "hattn/kernels/cuda_gather.hpp"
#include "hattn/kv/device_kv_cache.hpp"

namespace hattn {
namespace {

bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define REQUIRE_DEVICE() \
  if (!have_device()) GTEST_SKIP() << "no CUDA device"

/// Device copies of one call's CSR arrays.
struct DeviceCall {
  std::vector<std::int32_t*> bufs;
  ~DeviceCall() {
    for (auto* p : bufs) cudaFree(p);
  }
  const std::int32_t* put(const std::vector<std::int32_t>& v) {
    void* raw = nullptr;
    HATTN_CUDA_CHECK(cudaMalloc(&raw, std::max<std::size_t>(v.size(), 1) * sizeof(std::int32_t)));
    auto* p = static_cast<std::int32_t*>(raw);
    if (!v.empty()) HATTN_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(std::int32_t), cudaMemcpyHostToDevice));
    bufs.push_back(p);
    return p;
  }
};

/// Random sequences over a real pinned pool: appends, selections, budgets, pins, releases.
class CacheHarness {
 public:
  static constexpr int kLayers = 2;
  static constexpr int kQueryHeads = 4;  // GQA group 2: the tensor-core kernel, which stages
  /// Staged admission: each call is followed by the staging of its misses (a small area, so some
  /// calls overflow it) and a decode that reads them there, then admit_staged() (or, on some
  /// calls, the next step() or synchronize() in its place).
  const bool staged;
  PageLayout layout{.page_size = 16, .kv_heads = 2, .head_dim = 64, .dtype = DType::kBFloat16};
  HostKVPool pool{layout, 6000 * (layout.page_bytes() + layout.summary_bytes())};
  DeviceKVCacheConfig config{.slots = 600, .max_requests = 16, .max_batch = 16, .max_selected = 8192, .layers = kLayers,
                             .staging_blocks = staged ? 48 : 0};
  DeviceKVCache cache{pool, config};
  CacheModel model{cache.shape(), CacheReplacement::kBucketedLru};
  std::mt19937_64 rng;
  cudaStream_t compute = nullptr, side = nullptr;
  /// Pass max_selected as the call's capacity: a segment's entries then spread over several
  /// lookup blocks, and a row's admissions are cut across their boundaries.
  bool full_capacity = false;
  /// Synchronise after each call. Off, the next call's plan commits this call's evictions on the
  /// device (CacheScalars::uncommitted_rows) instead of the host's commit in synchronize().
  bool sync_each_call = true;

  struct Seq {
    bool open = false;
    std::int64_t tokens = 0;
    std::vector<PageId> pages[kLayers];
  };
  std::vector<Seq> seqs;
  std::int64_t staged_blocks = 0;  ///< entries written in the staging area (staged mode)
  float* decode_buf = nullptr;     ///< q and partials of decode_staging()
  std::size_t decode_buf_floats = 0;

  explicit CacheHarness(std::uint64_t seed, bool staged_admission = false)
      : staged(staged_admission), rng(seed), seqs(static_cast<std::size_t>(config.max_requests)) {
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  }
  ~CacheHarness() {
    cudaStreamSynchronize(compute);
    cudaFree(decode_buf);
    cudaStreamDestroy(compute);
    cudaStreamDestroy(side);
  }

  int uni(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); }

  void scribble(PageId p, int from_token) {  // writes tokens [from_token, page_size) of every head
    auto* page = pool.page(p);
    const std::size_t e = dtype_bytes(layout.dtype);
    for (int h = 0; h < layout.kv_heads; ++h)
      for (int t = from_token; t < layout.page_size; ++t)
        for (std::size_t off : {layout.key_offset(h, t), layout.value_offset(h, t)})
          for (int d = 0; d < layout.head_dim * static_cast<int>(e); ++d)
            page[off * e + d] = static_cast<std::byte>(rng() & 0xff);
  }

  void append(int r, int n_tokens) {
    auto& s = seqs[r];
    for (int i = 0; i < n_tokens; ++i) {
      const int in_page = static_cast<int>(s.tokens % layout.page_size);
      for (int l = 0; l < kLayers; ++l) {
        if (in_page == 0) s.pages[l].push_back(pool.allocate(1)[0]);
        scribble(s.pages[l].back(), in_page);  // the last page is rewritten: it must never be cached
      }
      ++s.tokens;
    }
  }

  std::int64_t budgets() const {
    std::int64_t sum = 0;
    for (auto b : model.state().budget) sum += std::max(b, 0);
    return sum;
  }

  void open(int r, std::int32_t budget = -1, int tokens = -1) {
    const auto room = static_cast<std::int32_t>(config.slots - budgets());
    if (room <= 0) return;
    const auto b = std::min(room, budget >= 0 ? budget : 24 + uni(80));
    cache.open_request(r, b);
    model.open_request(r, b);
    seqs[r].open = true;
    append(r, tokens >= 0 ? tokens : 16 * (2 + uni(20)) + uni(16));
  }

  void release(int r) {
    cache.release(r);
    model.release(r);
    auto& s = seqs[r];
    for (auto& pages : s.pages) {
      pool.free(pages);
      pages.clear();
    }
    s = Seq{};
    const auto st = cache.download_state();
    for (std::int32_t i = 0; i < config.slots; ++i) ASSERT_NE(st.slot_request[i], r) << "slot " << i;
    ASSERT_EQ(st.used[r], 0);
  }

  /// One call for `layer` with a random batch; `bad_row` adds a row naming a closed request.
  void call(std::uint32_t t, int layer, bool bad_row = false) {
    std::vector<std::int32_t> page_table, indptr{0}, selected, offset, count, request_of_row;
    std::vector<CacheAccess> rows;
    std::vector<int> order;
    for (int r = 0; r < config.max_requests; ++r)
      if (seqs[r].open && uni(4) != 0) order.push_back(r);
    std::shuffle(order.begin(), order.end(), rng);
    int closed = -1;
    if (bad_row)
      for (int r = 0; r < config.max_requests; ++r)
        if (!seqs[r].open) closed = r;
    if (closed >= 0) order.insert(order.begin() + uni(static_cast<int>(order.size()) + 1), closed);
    for (int r : order) {
      const auto& pages = seqs[r].pages[layer];
      page_table.insert(page_table.end(), pages.begin(), pages.end());
      if (pages.empty()) page_table.push_back(0);  // the closed row: one dummy page
      indptr.push_back(static_cast<std::int32_t>(page_table.size()));
      request_of_row.push_back(r);
      const int n = std::max<int>(static_cast<int>(pages.size()), 1);
      CacheAccess row{.request = r, .keys = {}, .bypass = 0};
      for (int h = 0; h < layout.kv_heads; ++h) {
        offset.push_back(static_cast<std::int32_t>(selected.size()));
        for (int pos = 0; pos < n; ++pos) {
          const bool hot = pos < 2 || pos >= n - 2 || (pos * 5 + h + static_cast<int>(t) / 40) % 6 == 0;
          if (!(hot ? uni(5) != 0 : uni(12) == 0)) continue;
          selected.push_back(pos);
          if (pos == n - 1) ++row.bypass;
          else row.keys.push_back(pages[pos] * layout.kv_heads + h);
        }
        count.push_back(static_cast<std::int32_t>(selected.size()) - offset.back());
      }
      if (r != closed) rows.push_back(std::move(row));
    }
    DeviceCall d;
    CacheStepParams p{.page_table = d.put(page_table), .page_indptr = d.put(indptr), .selected = d.put(selected),
                      .selected_offset = d.put(offset), .selected_count = d.put(count),
                      .request_of_row = d.put(request_of_row), .batch = static_cast<int>(order.size()),
                      .kv_heads = layout.kv_heads, .layer = layer, .step = t,
                      .selected_capacity = full_capacity ? config.max_selected
                                                         : static_cast<std::int32_t>(selected.size()),
                      .staged = staged && closed < 0};
    cache.step(p, compute, side);
    if (p.staged && p.batch > 0) {
      std::vector<std::int32_t> seq_len;
      for (int r : order) seq_len.push_back(static_cast<std::int32_t>(seqs[r].tokens));
      decode_staging(p, d.put(seq_len), *std::max_element(count.begin(), count.end()));
    }
    model.step(t, layer, rows);
    if (closed >= 0) {
      EXPECT_THROW(cache.synchronize(), InvalidArgument);
    } else if (sync_each_call) {
      cache.synchronize();
    }
    HATTN_CUDA_CHECK(cudaStreamSynchronize(compute));
  }

  /// The staging and decode of a staged call's selection on `compute`, beside the call's maintenance;
  /// the output is not looked at (the decode tests check it), what was staged is, through the slots
  /// check().
  void decode_staging(const CacheStepParams& c, const std::int32_t* seq_len, int max_count) {
    const int rows = c.batch * kQueryHeads, splits = 2;
    const std::size_t q_floats = static_cast<std::size_t>(rows) * layout.head_dim;
    const std::size_t need = q_floats * (1 + splits) + static_cast<std::size_t>(rows) * splits;
    if (need > decode_buf_floats) {  // grown rarely: a cudaFree would synchronise the whole device
      HATTN_CUDA_CHECK(cudaStreamSynchronize(compute));
      HATTN_CUDA_CHECK(cudaFree(decode_buf));
      HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&decode_buf), 2 * need * sizeof(float)));
      decode_buf_floats = 2 * need;
    }
    float* buf = decode_buf;
    HATTN_CUDA_CHECK(cudaMemsetAsync(buf, 0, q_floats * sizeof(float), compute));
    cuda::SparseDecodeParams dp;
    dp.q = buf;
    dp.page_table = c.page_table;
    dp.page_indptr = c.page_indptr;
    dp.seq_len = seq_len;
    dp.selected = c.selected;
    dp.selected_offset = c.selected_offset;
    dp.selected_count = c.selected_count;
    dp.slot_of = cache.slot_of();
    dp.hbm_slots = cache.hbm_slots();
    dp.host_pages = pool.pages_base();
    dp.batch = c.batch;
    dp.q_heads = kQueryHeads;
    dp.kv_heads = layout.kv_heads;
    dp.head_dim = layout.head_dim;
    dp.page_size = layout.page_size;
    dp.dtype = layout.dtype;
    dp.scale = 0.125f;
    dp.splits = splits;
    dp.partial_out = buf + q_floats;
    dp.partial_lse = buf + q_floats * (1 + splits);
    dp.kernel = cuda::DecodeKernel::kTensorCores;
    dp.staging = cache.staging();
    cuda::launch_stage_blocks(cuda::stage_params_for(dp, max_count), compute);
    cuda::launch_sparse_decode(dp, compute);
    HATTN_CUDA_CHECK(cudaStreamSynchronize(compute));
    std::int32_t taken = 0;
    HATTN_CUDA_CHECK(cudaMemcpy(&taken, cache.staging().count, sizeof(taken), cudaMemcpyDeviceToHost));
    staged_blocks += std::min(taken, config.staging_blocks);  // entries past the capacity hold nothing
    if (uni(3) != 0) cache.admit_staged(compute);
  }

  /// The GPU state equals the model's (owners, stamps, budgets; slot numbers may differ) and every
  /// cached slot holds its host block byte for byte.
  void check(const char* when) {
    SCOPED_TRACE(when);
    const auto st = cache.download_state();
    ASSERT_NO_THROW(CacheModel(cache.shape(), st, model.last_clock()));  // one owner per slot, free stack, counts
    const auto& ms = model.state();
    EXPECT_EQ(st.budget, ms.budget);
    EXPECT_EQ(st.used, ms.used);
    EXPECT_EQ(st.pinned, ms.pinned);
    EXPECT_EQ(st.free_top, ms.free_top);
    std::map<BlockKey, std::tuple<std::int32_t, std::uint32_t, int>> gpu, host;
    for (std::int32_t s = 0; s < config.slots; ++s) {
      if (st.slot_key[s] >= 0) gpu[st.slot_key[s]] = {st.slot_request[s], st.slot_stamp[s], st.slot_pinned[s]};
      if (ms.slot_key[s] >= 0) host[ms.slot_key[s]] = {ms.slot_request[s], ms.slot_stamp[s], ms.slot_pinned[s]};
    }
    ASSERT_EQ(gpu, host);
    for (std::int32_t r = 0; r < config.max_requests; ++r) ASSERT_LE(st.used[r], std::max(st.budget[r], 0));

    const auto slot_of = cache.download_slot_of();
    std::int64_t mapped = 0;
    for (auto v : slot_of) mapped += v >= 0;
    ASSERT_EQ(mapped, static_cast<std::int64_t>(gpu.size()));
    const auto bytes = static_cast<std::size_t>(cache.shape().block_bytes);
    std::vector<std::byte> slots(static_cast<std::size_t>(config.slots) * bytes);
    HATTN_CUDA_CHECK(cudaMemcpy(slots.data(), cache.hbm_slots(), slots.size(), cudaMemcpyDeviceToHost));
    const std::size_t e = dtype_bytes(layout.dtype), half = bytes / 2;
    for (std::int32_t s = 0; s < config.slots; ++s) {
      const auto k = st.slot_key[s];
      if (k < 0) continue;
      ASSERT_EQ(slot_of[k], s);
      const PageId page = k / layout.kv_heads;
      const int h = k % layout.kv_heads;
      ASSERT_TRUE(pool.is_allocated(page));
      const auto* src = pool.page(page);
      ASSERT_EQ(std::memcmp(slots.data() + s * bytes, src + layout.key_offset(h, 0) * e, half), 0) << "K of slot " << s;
      ASSERT_EQ(std::memcmp(slots.data() + s * bytes + half, src + layout.value_offset(h, 0) * e, half), 0)
          << "V of slot " << s;
    }
    const auto gs = cache.step_stats();
    if (gs.step == model.step_stats().step) EXPECT_EQ(gs.counters, model.step_stats().counters);
  }
};

/// Random opens, releases, budget changes, pins, appends and calls; the GPU checked after every
/// `check_every`-th call.
void run_stress(CacheHarness& hx, std::uint32_t steps, std::int64_t min_releases, int check_every = 1) {
  std::int64_t releases = 0, admitted = 0, hits = 0, evicted = 0, calls = 0;
  for (std::uint32_t t = 0; t < steps; ++t) {
    const int r = hx.uni(hx.config.max_requests);
    if (!hx.seqs[r].open) {
      if (hx.uni(2) == 0) hx.open(r);
    } else if (hx.uni(30) == 0) {
      hx.release(r);
      ++releases;
    } else if (hx.uni(15) == 0) {
      const auto others = hx.budgets() - hx.model.state().budget[r];
      const auto b = std::max<std::int64_t>(hx.model.state().pinned[r], hx.uni(120));
      if (b + others <= hx.config.slots) {
        hx.cache.set_budget(r, static_cast<std::int32_t>(b));
        hx.model.set_budget(r, static_cast<std::int32_t>(b));
      }
    } else if (hx.uni(10) == 0 && hx.seqs[r].pages[0].size() > 1) {
      const std::vector<PageId> sink{hx.seqs[r].pages[0][0]};  // complete: sequences start with >= 2 pages
      const std::vector<BlockKey> keys{sink[0] * 2, sink[0] * 2 + 1};
      const auto s = hx.model.slot_of(keys[0]);
      if (s >= 0 && hx.model.state().slot_pinned[s] && hx.model.state().slot_pinned[hx.model.slot_of(keys[1])]) {
        hx.cache.unpin(r, sink);
        hx.model.unpin(r, keys);
      } else if (hx.model.state().pinned[r] + 2 <= hx.model.state().budget[r]) {
        hx.cache.pin(r, sink);
        hx.model.pin(r, keys);
      }
    }
    for (int q = 0; q < hx.config.max_requests; ++q)
      if (hx.seqs[q].open && hx.uni(3) == 0) hx.append(q, 1 + hx.uni(6));
    for (int l = 0; l < CacheHarness::kLayers; ++l) {
      hx.call(t, l);
      admitted += hx.model.step_stats().counters.admitted;
      evicted += hx.model.step_stats().counters.evicted;
      if (++calls % check_every != 0) continue;
      hx.check("after a call");
      if (::testing::Test::HasFatalFailure() || ::testing::Test::HasFailure()) return;
    }
    hits += hx.model.step_stats().counters.hits;
  }
  EXPECT_GE(releases, min_releases);
  EXPECT_GT(admitted, steps * 2 / 3);
  EXPECT_GT(hits, steps * 2 / 3);
  EXPECT_GT(evicted, steps / 3);  // the eviction path ran
  for (int q = 0; q < hx.config.max_requests; ++q)
    if (hx.seqs[q].open) hx.release(q);
  const auto st = hx.cache.download_state();
  EXPECT_EQ(st.free_top, hx.config.slots);
  const auto slot_of = hx.cache.download_slot_of();
  EXPECT_TRUE(std::all_of(slot_of.begin(), slot_of.end(), [](auto v) { return v < 0; }));
}

TEST(DeviceKVCache, StressMatchesModelAndHostBytes) {
  REQUIRE_DEVICE();
  CacheHarness hx(20261123);
  run_stress(hx, 1500, 10);
}

// Staged admission: the misses come from the staging area's copies (or, past its capacity, from the
// host), and every cached slot still byte-equals its host block; calls
// run back to back, so the deferred gathers and the next call's maintenance interleave.
TEST(DeviceKVCache, StressWithStagedAdmission) {
  REQUIRE_DEVICE();
  CacheHarness hx(909, /*staged_admission=*/true);
  hx.sync_each_call = false;
  run_stress(hx, 600, 3, 2);
  EXPECT_GT(hx.staged_blocks, 600) << "blocks were staged";
  EXPECT_EQ(hx.cache.eviction_shortfall(), 0);
}

// Calls back to back between checks: most calls' evictions are committed by the next call's plan
// (ring count, use counts), the others by the host-side operations in between.
TEST(DeviceKVCache, StressCommitsOnTheDevice) {
  REQUIRE_DEVICE();
  CacheHarness hx(4242);
  hx.sync_each_call = false;
  run_stress(hx, 600, 3, 3);
  EXPECT_EQ(hx.cache.eviction_shortfall(), 0);
}

// The selection capacity of the call, not its count, sizes the lookup grid: with max_selected a
// segment's ~30 entries are split over up to 16 blocks, whose misses must still be admitted in
// segment, position order when a budget cuts them.
TEST(DeviceKVCache, StressWithManyLookupBlocksPerSegment) {
  REQUIRE_DEVICE();
  CacheHarness hx(77);
  hx.full_capacity = true;
  run_stress(hx, 400, 3);
}

// Budgets larger than any working set: no row ever evicts, the eviction scan is skipped, hits are
// still restamped (the model comparison checks stamps) and admissions take slots from the ring.
TEST(DeviceKVCache, MaintenanceWithoutEvictions) {
  REQUIRE_DEVICE();
  CacheHarness hx(31);
  for (int r = 0; r < 3; ++r) hx.open(r, 190, 16 * 20);
  std::int64_t hits = 0, admitted = 0;
  for (std::uint32_t t = 0; t < 60; ++t) {
    for (int r = 0; r < 3; ++r) hx.append(r, hx.uni(3));
    for (int l = 0; l < CacheHarness::kLayers; ++l) {
      hx.call(t, l);
      hx.check("after a call without eviction");
      if (HasFatalFailure() || HasFailure()) return;
      ASSERT_EQ(hx.model.step_stats().counters.evicted, 0);
      hits += hx.model.step_stats().counters.hits;
      admitted += hx.model.step_stats().counters.admitted;
    }
  }
  EXPECT_GT(hits, 500);
  EXPECT_GT(admitted, 50);
  EXPECT_EQ(hx.cache.step_stats().counters.evicted, 0);
}

// The persistent gather with a grid far smaller than the list (2 blocks, thousands of blocks to
// copy), a device count below n, skipped entries, and publication of exactly the copied entries.
TEST(DeviceKVCache, GatherSmallGridManyPagesPublishes) {
  REQUIRE_DEVICE();
  for (const auto& lay : {PageLayout{.page_size = 16, .kv_heads = 2, .head_dim = 64, .dtype = DType::kBFloat16},
                          PageLayout{.page_size = 64, .kv_heads = 4, .head_dim = 256, .dtype = DType::kBFloat16}}) {
    SCOPED_TRACE(lay.page_size);
    constexpr int kPages = 160;
    HostKVPool pool(lay, kPages * (lay.page_bytes() + lay.summary_bytes()));
    const auto ids = pool.allocate(kPages);
    std::mt19937_64 rng(lay.page_size);
    for (auto id : ids) {
      auto* page = pool.page(id);
      for (std::size_t i = 0; i < lay.page_bytes(); ++i) page[i] = static_cast<std::byte>(rng() & 0xff);
    }
    const int n = kPages * lay.kv_heads;
    const int counted = n - 13;
    std::vector<std::int32_t> pages, heads, slots, keys;
    std::vector<int> order(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);  // destination slots in random order
    for (int e = 0; e < n; ++e) {
      pages.push_back(ids[e / lay.kv_heads]);
      heads.push_back(e % lay.kv_heads);
      keys.push_back(ids[e / lay.kv_heads] * lay.kv_heads + e % lay.kv_heads);
      slots.push_back(e % 7 == 3 ? -1 : order[e]);
    }
    DeviceCall d;
    const auto bytes = static_cast<std::size_t>(2 * lay.head_block_elems() * dtype_bytes(lay.dtype));
    void* hbm = nullptr;
    HATTN_CUDA_CHECK(cudaMalloc(&hbm, bytes * n));
    HATTN_CUDA_CHECK(cudaMemset(hbm, 0xff, bytes * n));
    const std::int32_t* d_count = d.put({counted});
    auto* slot_of = const_cast<std::int32_t*>(d.put(std::vector<std::int32_t>(static_cast<std::size_t>(pool.capacity_pages()) * lay.kv_heads, -1)));
    const cuda::GatherParams g{.host_pages = pool.pages_base(), .hbm_slots = hbm, .page_ids = d.put(pages),
                               .heads = d.put(heads), .slots = d.put(slots), .count = d_count, .n = n,
                               .kv_heads = lay.kv_heads, .page_size = lay.page_size, .head_dim = lay.head_dim,
                               .dtype = lay.dtype, .slot_of = slot_of, .keys = d.put(keys), .max_blocks = 2};
    cuda::launch_gather_pages(g, nullptr);
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<std::byte> got(bytes * n);
    HATTN_CUDA_CHECK(cudaMemcpy(got.data(), hbm, got.size(), cudaMemcpyDeviceToHost));
    std::vector<std::int32_t> published(static_cast<std::size_t>(pool.capacity_pages()) * lay.kv_heads);
    HATTN_CUDA_CHECK(cudaMemcpy(published.data(), slot_of, published.size() * sizeof(std::int32_t), cudaMemcpyDeviceToHost));
    cudaFree(hbm);
    const std::size_t e_bytes = dtype_bytes(lay.dtype), half = bytes / 2;
    int copied_count = 0;
    for (int e = 0; e < n; ++e) {
      const bool copied = slots[e] >= 0 && e < counted;
      copied_count += copied;
      ASSERT_EQ(published[keys[e]], copied ? slots[e] : -1) << "entry " << e;
      const std::byte* dst = got.data() + static_cast<std::size_t>(order[e]) * bytes;
      const std::byte* src = pool.page(pages[e]);
      const bool same = std::memcmp(dst, src + lay.key_offset(heads[e], 0) * e_bytes, half) == 0 &&
                        std::memcmp(dst + half, src + lay.value_offset(heads[e], 0) * e_bytes, half) == 0;
      ASSERT_EQ(same, copied) << "entry " << e;
      if (!copied) ASSERT_EQ(static_cast<unsigned>(dst[0]), 0xffu) << "entry " << e << " was written";
    }
    EXPECT_GT(copied_count, n / 2);
  }
}

TEST(DeviceKVCache, BadInputIsReportedAndLeavesCacheConsistent) {
  REQUIRE_DEVICE();
  CacheHarness hx(5);
  for (int r = 0; r < 4; ++r) hx.open(r);
  hx.call(0, 0);
  hx.call(1, 1, /*bad_row=*/true);  // the closed request's row is skipped, the error reported
  hx.check("after a bad row");
  hx.call(2, 0);
  hx.check("after the next call");
  CacheStepParams p{.batch = 1, .kv_heads = 2, .layer = CacheHarness::kLayers, .step = 3};
  EXPECT_THROW(hx.cache.step(p, hx.compute, hx.side), InvalidArgument);  // layer out of range
  p.layer = 0;
  p.kv_heads = 3;
  EXPECT_THROW(hx.cache.step(p, hx.compute, hx.side), InvalidArgument);
  EXPECT_THROW(hx.cache.set_budget(0, hx.config.slots + 1), InvalidArgument);  // larger than the pool
  EXPECT_THROW(hx.cache.set_budget(9, 4), InvalidArgument);                  // not open
  EXPECT_THROW(hx.cache.release(12), InvalidArgument);
  EXPECT_THROW(hx.cache.request_stats(99), InvalidArgument);
  hx.check("after rejected calls");
}

// hattn-bench's gpu_dense at 1/8 scale (it once aborted on the H100 with "free_top 140253 with 135167
// occupied" at its first resize: the ring counted one slot more than were free): one request, 4 layers,
// every page selected every call, a pool 1.05x the blocks and a budget of half of it, so each call
// evicts about a layer and admits one (pops and pushes in the same call), over a pool of 34 stage-2
// blocks, calls back to back without a host wait. The state must equal the model's at every check
// and no plan may name more victims than the slots hold (eviction_shortfall).
TEST(DeviceKVCache, DenseSweepBackToBackOverManyBlocks) {
  REQUIRE_DEVICE();
  constexpr int kLayers = 4, kPages = 1024;  // complete pages per layer; one more is being appended
  const PageLayout layout{.page_size = 16, .kv_heads = 8, .head_dim = 64, .dtype = DType::kBFloat16};
  const int H = layout.kv_heads;
  HostKVPool pool(layout, static_cast<std::size_t>(kLayers) * (kPages + 1) * (layout.page_bytes() + layout.summary_bytes()));
  const auto slots = static_cast<std::int32_t>(1.05 * kLayers * (kPages + 1) * H);
  const DeviceKVCacheConfig config{.slots = slots, .max_requests = 1, .max_batch = 1, .max_selected = 16384,
                                   .layers = kLayers};
  ASSERT_GE(slots, 16 * 1024);  // many blocks in the slot kernels (1024 slots each)
  DeviceKVCache cache(pool, config);
  CacheModel model(cache.shape(), CacheReplacement::kBucketedLru);
  cache.open_request(0, slots / 2);
  model.open_request(0, slots / 2);
  cudaStream_t compute = nullptr, side = nullptr;
  HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&compute, cudaStreamNonBlocking));
  HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&side, cudaStreamNonBlocking));
  DeviceCall d;
  std::vector<CacheStepParams> params;
  std::vector<CacheAccess> access;
  for (int l = 0; l < kLayers; ++l) {
    const auto pages = pool.allocate(kPages + 1);
    std::vector<std::int32_t> selected, offset, count;
    CacheAccess row{.request = 0, .keys = {}, .bypass = H};
    for (int h = 0; h < H; ++h) {
      offset.push_back(static_cast<std::int32_t>(selected.size()));
      for (int pos = 0; pos <= kPages; ++pos) {
        selected.push_back(pos);
        if (pos < kPages) row.keys.push_back(pages[pos] * H + h);
      }
      count.push_back(kPages + 1);
    }
    params.push_back({.page_table = d.put(std::vector<std::int32_t>(pages.begin(), pages.end())),
                      .page_indptr = d.put({0, kPages + 1}), .selected = d.put(selected),
                      .selected_offset = d.put(offset), .selected_count = d.put(count), .request_of_row = d.put({0}),
                      .batch = 1, .kv_heads = H, .layer = l, .step = 0,
                      .selected_capacity = static_cast<std::int32_t>(selected.size())});
    access.push_back(std::move(row));
  }
  auto check = [&](std::uint32_t t) {
    SCOPED_TRACE(::testing::Message() << "after step " << t);
    const auto st = cache.download_state();
    ASSERT_NO_THROW(CacheModel(cache.shape(), st, model.last_clock()));
    EXPECT_EQ(cache.eviction_shortfall(), 0);
    EXPECT_EQ(st.free_top, model.state().free_top);
    EXPECT_EQ(st.used, model.state().used);
    const auto slot_of = cache.download_slot_of();
    std::int64_t mapped = 0;
    for (auto v : slot_of) mapped += v >= 0;
    std::int64_t occupied = 0;
    for (std::int32_t s = 0; s < slots; ++s)
      if (st.slot_key[s] >= 0) {
        ++occupied;
        ASSERT_EQ(slot_of[st.slot_key[s]], s) << "slot " << s;
      }
    EXPECT_EQ(mapped, occupied);  // no stale entry pointing at a slot that holds another key
  };
  std::int64_t pops_and_evictions = 0;
  for (std::uint32_t t = 1; t <= 24; ++t) {
    for (int l = 0; l < kLayers; ++l) {
      params[l].step = t;
      cache.step(params[l], compute, side);
      cache.wait_admission(compute);  // Admission::kBeforeDecode order, no host wait
      model.step(t, l, std::span<const CacheAccess>(&access[l], 1));
      pops_and_evictions += model.step_stats().counters.evicted > 0;
    }
    if (t % 8 == 7) {
      check(t);
      if (HasFatalFailure()) break;
    }
  }
  EXPECT_GT(pops_and_evictions, 40);
  HATTN_CUDA_CHECK(cudaStreamSynchronize(compute));
  cudaStreamDestroy(compute);
  cudaStreamDestroy(side);
}

TEST(DeviceKVCache, ResizeBudgetsFollowsWorkingSet) {
  REQUIRE_DEVICE();
  CacheHarness hx(9);
  for (int r = 0; r < 3; ++r) hx.open(r);
  for (std::uint32_t t = 0; t < 40; ++t)
    for (int l = 0; l < CacheHarness::kLayers; ++l) hx.call(t, l);
  const BudgetPolicy policy{.working_set_multiple = 2.0, .low_hit_rate = 0.0, .boost = 1.0, .min_slots = 8};
  std::vector<RequestCacheStats> before;
  for (int r = 0; r < 3; ++r) before.push_back(hx.cache.request_stats(r));
  const auto budgets = hx.cache.resize_budgets(policy);
  std::vector<double> want;
  double want_sum = 0;
  for (int r = 0; r < 3; ++r) {
    const auto& c = before[r].counters;
    const double per_step = static_cast<double>(c.hits + c.misses + c.bypass) / static_cast<double>(before[r].steps);
    want.push_back(std::max(std::ceil(2.0 * per_step), 8.0));
    want_sum += want.back();
  }
  std::int64_t sum = 0;
  for (int r = 0; r < 3; ++r) {
    if (want_sum <= hx.config.slots) EXPECT_EQ(budgets[r], static_cast<std::int32_t>(want[r])) << "request " << r;
    const auto st = hx.cache.request_stats(r);
    EXPECT_EQ(st.budget_slots, budgets[r]);
    EXPECT_LE(st.used_slots, st.budget_slots);
    sum += budgets[r];
  }
  EXPECT_LE(sum, hx.config.slots);
  EXPECT_EQ(budgets[5], -1);
}

}  // namespace
}  // namespace hattn
