// The CPU/GPU split of a selection against a host model of its rule: per row the CPU takes
// round(share x the row's selected blocks), uncached ones first, spread over the heads in proportion
// to their uncached blocks (largest-floor rule: floors, then one more for the first inexact heads),
// then cached ones likewise; within a head uncached then cached, ascending; the GPU keeps the rest,
// ascending; the GPU's cached blocks are counted. Lists span several of the kernel's tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cuda_test_support.hpp"
#include "hattn/kernels/cuda_split.hpp"

namespace hattn {
namespace {

using test::DeviceBuffer;

struct SplitCase {
  int kv_heads = 3;
  std::vector<int> pages_per_row;   // [batch]
  std::vector<float> shares;        // [batch]
  double cached_share = 0.5;        // of the pool's (page, head) blocks
  std::vector<double> cached_share_of_head;  // [kv_heads], overrides cached_share where given
  double selected_share = 0.3;
  bool with_cache = true;
  bool with_share = true;
  unsigned seed = 1;
};

struct HostSplit {
  std::vector<std::vector<std::int32_t>> gpu, cpu;
  std::vector<int> gpu_hits;
};

void run_case(const SplitCase& c) {
  const int batch = static_cast<int>(c.pages_per_row.size());
  const int heads = c.kv_heads;
  std::mt19937 rng(c.seed);
  std::vector<std::int32_t> indptr{0}, table;
  for (int n : c.pages_per_row) indptr.push_back(indptr.back() + n);
  const int pool_pages = indptr.back() + 7;
  // Page ids shuffled over the pool, so a position's page says nothing about its residency.
  std::vector<std::int32_t> ids(static_cast<std::size_t>(pool_pages));
  for (int i = 0; i < pool_pages; ++i) ids[i] = i;
  std::shuffle(ids.begin(), ids.end(), rng);
  table.assign(ids.begin(), ids.begin() + indptr.back());
  std::bernoulli_distribution is_selected(c.selected_share);
  std::vector<std::int32_t> slot_of(static_cast<std::size_t>(pool_pages) * heads);
  for (std::size_t i = 0; i < slot_of.size(); ++i) {
    const std::size_t h = i % static_cast<std::size_t>(heads);
    std::bernoulli_distribution is_cached(c.cached_share_of_head.empty() ? c.cached_share : c.cached_share_of_head[h]);
    slot_of[i] = is_cached(rng) ? static_cast<std::int32_t>(i) : -1;
  }

  std::vector<std::int32_t> offset, count, selected;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      const int n = c.pages_per_row[b];
      offset.push_back(static_cast<std::int32_t>(selected.size()));
      int k = 0;
      for (int p = 0; p < n; ++p)
        if (is_selected(rng)) selected.push_back(p), ++k;
      count.push_back(k);
      selected.resize(offset.back() + static_cast<std::size_t>(n), -5);  // room for the whole row, as the engine has
    }

  auto resident = [&](int b, int h, std::int32_t pos) {
    return c.with_cache && slot_of[static_cast<std::size_t>(table[indptr[b] + pos]) * heads + h] >= 0;
  };
  // Per row: every head's uncached and cached counts, and each head's part of the row's quota.
  std::vector<int> cpu_misses_of(static_cast<std::size_t>(batch) * heads), cpu_hits_of(cpu_misses_of.size());
  for (int b = 0; b < batch; ++b) {
    std::vector<long long> miss(heads), hit(heads);
    long long total = 0;
    for (int h = 0; h < heads; ++h) {
      const int s = b * heads + h;
      for (int i = 0; i < count[s]; ++i) (resident(b, h, selected[offset[s] + i]) ? hit : miss)[h]++;
      total += count[s];
    }
    const float share = c.with_share ? c.shares[b] : 0.0f;
    const long long quota =
        std::clamp(static_cast<long long>(std::nearbyint(share * static_cast<float>(total))), 0LL, total);
    auto spread = [&](long long q, const std::vector<long long>& of, std::vector<int>& out) {
      long long sum = 0;
      for (long long v : of) sum += v;
      if (q >= sum) {
        for (int h = 0; h < heads; ++h) out[b * heads + h] = static_cast<int>(of[h]);
        return;
      }
      long long left = q;
      for (int h = 0; h < heads; ++h) left -= q * of[h] / sum;
      for (int h = 0; h < heads; ++h) {
        const bool extra = left > 0 && (q * of[h]) % sum != 0;
        left -= extra;
        out[b * heads + h] = static_cast<int>(q * of[h] / sum + extra);
      }
    };
    long long misses = 0;
    for (long long v : miss) misses += v;
    spread(std::min(quota, misses), miss, cpu_misses_of);
    spread(quota - std::min(quota, misses), hit, cpu_hits_of);
  }

  HostSplit want;
  for (int s = 0; s < batch * heads; ++s) {
    const int b = s / heads, h = s % heads;
    const int n = count[s];
    const int cpu_misses = cpu_misses_of[s], cpu_hits = cpu_hits_of[s];
    std::vector<std::int32_t> g, cp;
    int seen_miss = 0, seen_hit = 0, hits_gpu = 0;
    for (int i = 0; i < n; ++i) {
      const std::int32_t pos = selected[offset[s] + i];
      const bool r = resident(b, h, pos);
      const bool to_cpu = r ? seen_hit++ < cpu_hits : seen_miss++ < cpu_misses;
      if (to_cpu) cp.push_back(pos);
      else g.push_back(pos), hits_gpu += r;
    }
    want.gpu.push_back(g);
    want.cpu.push_back(cp);
    want.gpu_hits.push_back(hits_gpu);
  }

  const std::size_t segments = static_cast<std::size_t>(batch) * heads;
  DeviceBuffer<std::int32_t> d_sel(selected), d_off(offset), d_count(count), d_table(table), d_indptr(indptr),
      d_slot(slot_of), d_gpu(selected.size()), d_gpu_count(segments), d_cpu(selected.size()),
      d_cpu_count(segments), d_hits(segments), d_blocks(segments);
  DeviceBuffer<float> d_share(c.shares);
  // q of two query heads per KV head, dim 8: the split copies each segment's group rows for the CPU.
  const int q_heads = 2 * heads, dim = 8;
  std::vector<float> q(static_cast<std::size_t>(batch) * q_heads * dim);
  for (std::size_t i = 0; i < q.size(); ++i) q[i] = static_cast<float>(i) * 0.5f - 3.0f;
  DeviceBuffer<float> d_q(q), d_q_copy(q.size());
  cuda::SplitSelectionParams p;
  p.selected = d_sel.get();
  p.selected_offset = d_off.get();
  p.selected_count = d_count.get();
  p.page_table = d_table.get();
  p.page_indptr = d_indptr.get();
  p.slot_of = c.with_cache ? d_slot.get() : nullptr;
  p.batch = batch;
  p.kv_heads = heads;
  p.gpu_hits = d_hits.get();
  p.gpu_blocks = d_blocks.get();
  if (c.with_share) {
    p.cpu_share = d_share.get();
    p.gpu_selected = d_gpu.get();
    p.gpu_count = d_gpu_count.get();
    p.cpu_selected = d_cpu.get();
    p.cpu_count = d_cpu_count.get();
    p.q = d_q.get();
    p.q_copy = d_q_copy.get();
    p.q_heads = q_heads;
    p.head_dim = dim;
  }
  cuda::launch_split_selection(p, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto gpu = d_gpu.download(), cpu = d_cpu.download();
  const auto gpu_count = d_gpu_count.download(), cpu_count = d_cpu_count.download(), hits = d_hits.download();
  const auto blocks = d_blocks.download();
  if (c.with_share && !q.empty()) EXPECT_EQ(d_q_copy.download(), q);
  for (std::size_t s = 0; s < segments; ++s) {
    EXPECT_EQ(hits[s], want.gpu_hits[s]) << "segment " << s;
    EXPECT_EQ(blocks[s], c.with_share ? static_cast<int>(want.gpu[s].size()) : count[s]) << "segment " << s;
    if (!c.with_share) continue;
    ASSERT_EQ(gpu_count[s], static_cast<int>(want.gpu[s].size())) << "segment " << s;
    ASSERT_EQ(cpu_count[s], static_cast<int>(want.cpu[s].size())) << "segment " << s;
    EXPECT_TRUE(std::equal(want.gpu[s].begin(), want.gpu[s].end(), gpu.begin() + offset[s])) << "segment " << s;
    EXPECT_TRUE(std::equal(want.cpu[s].begin(), want.cpu[s].end(), cpu.begin() + offset[s])) << "segment " << s;
  }
}

TEST(CudaSplit, CpuTakesUncachedBlocksFirstAcrossTiles) {
  HATTN_REQUIRE_CUDA_DEVICE();
  for (double cached : {0.0, 0.3, 0.9, 1.0}) {
    SplitCase c;
    c.pages_per_row = {9000, 1, 0, 2500};
    c.shares = {0.4f, 1.0f, 0.5f, 0.05f};
    c.cached_share = cached;
    c.seed = static_cast<unsigned>(cached * 100) + 3;
    run_case(c);
  }
}

// Heads whose caches hold very different shares of their blocks, as a decode step sees them (local
// heads hit, a clustered head that changed topic misses): the row's uncached blocks go to the CPU
// wherever they are (at 0.3 and 0.9 the quota exceeds the row's misses, and the model leaves the GPU
// none of them; at 0.02 and 0.1 the heads share the uncached quota by their misses).
TEST(CudaSplit, TheRowsQuotaFollowsTheUncachedBlocksAcrossHeads) {
  HATTN_REQUIRE_CUDA_DEVICE();
  for (float share : {0.02f, 0.1f, 0.3f, 0.9f}) {
    SplitCase c;
    c.kv_heads = 8;
    c.pages_per_row = {8192, 2048, 5};
    c.shares = {share, share, 1.0f};
    c.selected_share = 0.05;
    c.cached_share_of_head = {1.0, 0.99, 0.95, 0.9, 0.6, 0.2, 0.97, 1.0};
    c.seed = static_cast<unsigned>(share * 1000);
    run_case(c);
  }
}

// The kernel's bounds: a CPU part that ends exactly where a tile of the segment ends (it leaves each
// tile through shared memory), one just past it, and the most KV heads a share allows (one thread
// per head spreads the quota).
TEST(CudaSplit, TileBoundariesAndTheMostKvHeads) {
  HATTN_REQUIRE_CUDA_DEVICE();
  for (float share : {0.5f, 0.5f + 1.0f / 4096}) {
    SplitCase c;
    c.kv_heads = 1;
    c.pages_per_row = {4096};
    c.shares = {share};
    c.selected_share = 1.0;
    c.with_cache = false;
    run_case(c);
  }
  SplitCase c;
  c.kv_heads = 256;
  c.pages_per_row = {300, 41};
  c.shares = {0.37f, 0.9f};
  c.cached_share = 0.6;
  c.seed = 11;
  run_case(c);
}

// The launcher's checks run before any device work, so this one needs no GPU: a CPU share with more
// KV heads than the kernel's shared per-head counts hold is named, not launched.
TEST(CudaSplit, NamesMoreKvHeadsThanTheRowCountsHoldWithAShare) {
  std::int32_t ints[4] = {};
  float share = 0.5f;
  cuda::SplitSelectionParams p;
  p.selected = p.selected_offset = p.selected_count = p.page_table = p.page_indptr = ints;
  p.gpu_hits = p.gpu_selected = p.gpu_count = p.cpu_selected = p.cpu_count = ints;
  p.cpu_share = &share;
  p.batch = 1;
  p.kv_heads = 257;
  test::expect_named([&] { cuda::launch_split_selection(p, nullptr); }, "kv_heads", "257");
}

TEST(CudaSplit, WholeAndEmptySharesAndDenseSelections) {
  HATTN_REQUIRE_CUDA_DEVICE();
  SplitCase c;
  c.pages_per_row = {5000, 300};
  c.shares = {1.0f, 0.0f};
  c.selected_share = 1.0;
  run_case(c);
}

TEST(CudaSplit, WithoutACacheTheCpuTakesTheEarliestPositions) {
  HATTN_REQUIRE_CUDA_DEVICE();
  SplitCase c;
  c.pages_per_row = {4000, 700};
  c.shares = {0.25f, 0.7f};
  c.with_cache = false;
  run_case(c);
}

TEST(CudaSplit, WithoutSharesItOnlyCountsTheCachedBlocks) {
  HATTN_REQUIRE_CUDA_DEVICE();
  SplitCase c;
  c.pages_per_row = {3000, 64};
  c.shares = {0.0f, 0.0f};
  c.with_share = false;
  run_case(c);
}

}  // namespace
}  // namespace hattn
