// The selection body every GPU top-k runs (cuda/detail/block_top_k.cuh), compiled for the host and
// run by a block of emulated threads: one std::thread per CUDA thread, a std::barrier for
// __syncthreads, per-warp exchanges for the shuffles. It checks the rule (forced, excluded and
// padded positions, ties to the lower entry, budgets below the forced count or above the entries)
// against a sort, and the barrier discipline as far as a host run can: a missing barrier shows as a
// wrong answer here, or as a race under ThreadSanitizer. It is not the device's memory model, so the
// GPU tests stay the judge of the kernels; this runs in CI, where there is no GPU.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <bit>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

// ---- the device built-ins block_top_k.cuh (and block_scan.cuh) use, for emulated threads
namespace hattn_emulated {

constexpr int kMaxWarps = 32;

struct Block {
  explicit Block(int threads) : sync(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_sync[w] = std::make_unique<std::barrier<>>(32);
  }
  std::barrier<> sync;
  std::unique_ptr<std::barrier<>> warp_sync[kMaxWarps];
  std::uint64_t exchange[kMaxWarps][32] = {};
};

inline thread_local Block* block = nullptr;
inline thread_local uint3 thread_index{};
inline thread_local uint3 block_dim{};

// Lane `lane` reads what lane `from(lane)` offered; two warp barriers keep rounds apart.
template <class V, class From>
V exchange(V v, From from) {
  static_assert(sizeof(V) <= sizeof(std::uint64_t));
  const int lane = static_cast<int>(thread_index.x % 32), warp = static_cast<int>(thread_index.x / 32);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(V));
  block->exchange[warp][lane] = bits;
  block->warp_sync[warp]->arrive_and_wait();
  const std::uint64_t got = block->exchange[warp][from(lane)];
  block->warp_sync[warp]->arrive_and_wait();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

}  // namespace hattn_emulated

#define threadIdx (hattn_emulated::thread_index)
#define blockDim (hattn_emulated::block_dim)
inline void __syncthreads() { hattn_emulated::block->sync.arrive_and_wait(); }
template <class V>
V __shfl_xor_sync(unsigned, V v, int offset) {
  return hattn_emulated::exchange(v, [&](int lane) { return lane ^ offset; });
}
template <class V>
V __shfl_up_sync(unsigned, V v, int offset) {
  return hattn_emulated::exchange(v, [&](int lane) { return lane >= offset ? lane - offset : lane; });
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int __clz(int v) { return std::countl_zero(static_cast<std::uint32_t>(v)); }
inline int __popc(unsigned v) { return std::popcount(v); }
inline float __uint_as_float(std::uint32_t u) { return std::bit_cast<float>(u); }
inline std::uint32_t __float_as_uint(float f) { return std::bit_cast<std::uint32_t>(f); }
using std::max;
using std::min;

#include "../../cuda/detail/block_top_k.cuh"

#undef threadIdx
#undef blockDim

namespace hattn::test {
namespace {

using cuda::detail::block_top_k;
using cuda::detail::TopKRule;
using cuda::detail::TopKShared;

/// The rule spelled out: forced positions always, then the best `budget - forced` ranked entries
/// by key (ties to the lower entry); positions in entry order.
std::vector<std::int32_t> by_sort(const std::vector<std::uint32_t>& key, const std::vector<std::int32_t>& at,
                                  const TopKRule& rule) {
  const int n = static_cast<int>(key.size());
  auto allowed = [&](int q) { return q >= 0 && (q < rule.exclude_begin || q >= rule.exclude_end); };
  auto forced = [&](int q) { return allowed(q) && (q < rule.sink_end || q >= rule.local_begin); };
  std::vector<int> ranked;
  int n_forced = 0;
  for (int i = 0; i < n; ++i) {
    if (forced(at[i])) ++n_forced;
    else if (allowed(at[i])) ranked.push_back(i);
  }
  std::stable_sort(ranked.begin(), ranked.end(), [&](int a, int b) { return key[a] > key[b]; });
  std::vector<char> take(n, 0);
  const int take_ranked = std::min(std::max(rule.budget - n_forced, 0), static_cast<int>(ranked.size()));
  for (int j = 0; j < take_ranked; ++j) take[ranked[j]] = 1;
  std::vector<std::int32_t> out;
  for (int i = 0; i < n; ++i)
    if (take[i] || forced(at[i])) out.push_back(at[i]);
  return out;
}

/// Runs body(t, sh) on T emulated threads of one block, over a TopKShared that starts as garbage (as
/// shared memory does, not zeroed).
template <int T, class Body>
void run_block(Body body) {
  hattn_emulated::Block block(T);
  TopKShared<T> sh;
  std::memset(static_cast<void*>(&sh), 0xab, sizeof sh);
  std::vector<std::thread> threads;
  threads.reserve(T);
  for (int t = 0; t < T; ++t)
    threads.emplace_back([&, t] {
      hattn_emulated::block = &block;
      hattn_emulated::thread_index = uint3{static_cast<unsigned>(t), 0, 0};
      hattn_emulated::block_dim = uint3{static_cast<unsigned>(T), 1, 1};
      body(t, sh);
    });
  for (auto& th : threads) th.join();
}

/// Runs block_top_k<T> over the entries with T emulated threads; every thread's return value must
/// agree with the count written.
template <int T>
std::vector<std::int32_t> emulated(const std::vector<std::uint32_t>& key, const std::vector<std::int32_t>& at,
                                   const TopKRule& rule) {
  const int n = static_cast<int>(key.size());
  std::vector<std::int32_t> out(n + 1, -7);
  std::vector<int> returned(T, -1);
  run_block<T>([&](int t, TopKShared<T>& sh) {
    returned[t] = block_top_k<T>(key.data(), at.data(), n, rule, sh, out.data());
  });
  for (int t = 1; t < T; ++t) EXPECT_EQ(returned[t], returned[0]) << "thread " << t;
  EXPECT_EQ(out[n], -7) << "written past the entries";
  out.resize(std::max(returned[0], 0));
  return out;
}

struct Case {
  std::vector<std::uint32_t> key;
  std::vector<std::int32_t> at;
  TopKRule rule;
};

// Keys from a few hundred values (ties), a spread of floats' order keys, or all equal; positions
// in order or shuffled with padding (-1), as the candidate mode stages them.
Case random_case(std::mt19937& rng, int max_n) {
  Case c;
  const int n = rng() % 16 == 0 ? 0 : std::uniform_int_distribution<int>(1, max_n)(rng);
  const int kind = std::uniform_int_distribution<int>(0, 3)(rng);
  std::uniform_int_distribution<std::uint32_t> small(0, 300), any(0, 0xffffffffu);
  std::normal_distribution<float> normal(0.f, 3.f);
  for (int i = 0; i < n; ++i) {
    std::uint32_t k = 0;
    if (kind == 0) k = small(rng);
    else if (kind == 1) k = any(rng);
    else if (kind == 2) k = hattn::cuda::detail::order_key(normal(rng));
    else k = 0x9abcdef0u;
    c.key.push_back(k);
  }
  const int positions = n + n / 4;
  std::vector<std::int32_t> pos(positions);
  for (int i = 0; i < positions; ++i) pos[i] = i;
  const bool shuffled = rng() % 2 == 0;
  if (shuffled) std::shuffle(pos.begin(), pos.end(), rng);
  for (int i = 0; i < n; ++i) c.at.push_back(shuffled && rng() % 8 == 0 ? -1 : pos[i]);
  const int span = shuffled ? positions : n;
  c.rule.sink_end = std::uniform_int_distribution<int>(0, 3)(rng);
  c.rule.local_begin = std::max(span - std::uniform_int_distribution<int>(0, 4)(rng), 0);
  if (rng() % 3 == 0) {
    c.rule.exclude_begin = std::uniform_int_distribution<int>(0, span)(rng);
    c.rule.exclude_end = std::uniform_int_distribution<int>(c.rule.exclude_begin, span)(rng);
  }
  const int budget_kind = std::uniform_int_distribution<int>(0, 4)(rng);
  c.rule.budget = budget_kind == 0   ? 0
                  : budget_kind == 1 ? std::uniform_int_distribution<int>(0, 6)(rng)
                  : budget_kind == 2 ? n + 3
                                     : std::uniform_int_distribution<int>(0, n)(rng);
  return c;
}

template <int T>
void check_random(int cases, int max_n, unsigned seed) {
  std::mt19937 rng(seed);
  for (int i = 0; i < cases; ++i) {
    const Case c = random_case(rng, max_n);
    const auto want = by_sort(c.key, c.at, c.rule);
    const auto got = emulated<T>(c.key, c.at, c.rule);
    ASSERT_EQ(got, want) << "case " << i << ": n " << c.key.size() << ", budget " << c.rule.budget << ", sink_end "
                         << c.rule.sink_end << ", local_begin " << c.rule.local_begin << ", exclude ["
                         << c.rule.exclude_begin << ", " << c.rule.exclude_end << ")";
  }
}

TEST(BlockTopKEmulated, MatchesTheRuleAt256Threads) { check_random<256>(120, 3000, 11); }

// Up to the 32 entries a thread holds at 256 threads (the fused two-level kernel's candidates).
TEST(BlockTopKEmulated, MatchesTheRuleWithManyEntriesPerThread) { check_random<256>(12, 8192, 14); }

// The compact select kernel's large configuration, and more entries per thread than 256 threads hold.
TEST(BlockTopKEmulated, MatchesTheRuleAt1024Threads) { check_random<1024>(12, 16384, 12); }

// Two selections by one block in a row, sharing TopKShared, as the fused two-level kernel runs them
// (the groups, then the pages): the second must not see the first's histograms or counts.
TEST(BlockTopKEmulated, BackToBackCallsShareTheirScratch) {
  constexpr int T = 256;
  std::mt19937 rng(13);
  for (int i = 0; i < 20; ++i) {
    const Case a = random_case(rng, 1200), b = random_case(rng, 2500);
    std::vector<std::int32_t> out_a(a.key.size() + 1, -7), out_b(b.key.size() + 1, -7);
    std::vector<int> count_a(T, -1), count_b(T, -1);
    run_block<T>([&](int t, TopKShared<T>& sh) {
      count_a[t] = block_top_k<T>(a.key.data(), a.at.data(), static_cast<int>(a.key.size()), a.rule, sh, out_a.data());
      count_b[t] = block_top_k<T>(b.key.data(), b.at.data(), static_cast<int>(b.key.size()), b.rule, sh, out_b.data());
    });
    for (int t = 1; t < T; ++t) ASSERT_TRUE(count_a[t] == count_a[0] && count_b[t] == count_b[0]) << "thread " << t;
    EXPECT_EQ(out_a[a.key.size()], -7) << "first call wrote past its entries";
    EXPECT_EQ(out_b[b.key.size()], -7) << "second call wrote past its entries";
    out_a.resize(std::max(count_a[0], 0));
    out_b.resize(std::max(count_b[0], 0));
    ASSERT_EQ(out_a, by_sort(a.key, a.at, a.rule)) << "case " << i << ", first call";
    ASSERT_EQ(out_b, by_sort(b.key, b.at, b.rule)) << "case " << i << ", second call";
  }
}

}  // namespace
}  // namespace hattn::test
