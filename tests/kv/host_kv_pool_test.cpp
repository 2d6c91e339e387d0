// HostKVPool: sizing, the all-or-nothing free list, thread safety, the memory kind it reports, and
// rejection of bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "hattn/kv/host_kv_pool.hpp"

namespace hattn {
namespace {

constexpr PageLayout kLayout{16, 2, 64, DType::kBFloat16};
constexpr std::size_t kPerPage = kLayout.page_bytes() + kLayout.summary_bytes();

template <class Fn>
std::string message_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no hattn::Error thrown";
  return {};
}

TEST(HostKVPool, SizesFromBytesAndCarvesOneArena) {
  HostKVPool pool(kLayout, 10 * kPerPage + kPerPage - 1, HostMemoryRequest::kAligned);
  EXPECT_EQ(pool.capacity_pages(), 10);
  EXPECT_EQ(pool.stats().capacity_pages, 10);
  EXPECT_EQ(pool.stats().used_pages, 0);
  EXPECT_EQ(pool.stats().page_bytes, static_cast<std::int64_t>(kLayout.page_bytes()));
  EXPECT_EQ(pool.layout(), kLayout);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(pool.pages_base()) % 4096, 0u);
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(pool.summaries_base()) % 4096, 0u);
  const std::vector<PageId> ids = pool.allocate(10);
  std::set<PageId> unique(ids.begin(), ids.end());
  EXPECT_EQ(unique.size(), 10u);
  for (PageId id : ids) {
    ASSERT_GE(id, 0);
    ASSERT_LT(id, 10);
    EXPECT_TRUE(pool.is_allocated(id));
    EXPECT_EQ(pool.page(id), pool.pages_base() + static_cast<std::size_t>(id) * kLayout.page_bytes());
    EXPECT_EQ(pool.summary(id), pool.summaries_base() + static_cast<std::size_t>(id) * kLayout.summary_bytes());
    // Whole page and summary writable (the sanitizer build catches an arena that is too small).
    std::memset(pool.page(id), id, kLayout.page_bytes());
    std::memset(pool.summary(id), id, kLayout.summary_bytes());
  }
  EXPECT_EQ(pool.stats().free_pages(), 0);
  pool.free(ids);
  EXPECT_EQ(pool.stats().used_pages, 0);
}

TEST(HostKVPool, ReportsWhichMemoryItUsesAndWhy) {
  HostKVPool aligned(kLayout, 4 * kPerPage, HostMemoryRequest::kAligned);
  EXPECT_EQ(aligned.memory_kind(), HostMemoryKind::kAligned);
  EXPECT_NE(aligned.memory_note().find("as requested"), std::string::npos) << aligned.memory_note();

  HostKVPool automatic(kLayout, 4 * kPerPage);
  EXPECT_FALSE(automatic.memory_note().empty());
#if HATTN_WITH_CUDA
  // With a GPU the pool is pinned and mapped; without one (CI) it says so and falls back.
  if (automatic.memory_kind() == HostMemoryKind::kAligned)
    EXPECT_NE(automatic.memory_note().find("aligned host memory"), std::string::npos) << automatic.memory_note();
  else
    EXPECT_NE(automatic.memory_note().find("pinned mapped"), std::string::npos) << automatic.memory_note();
#else
  EXPECT_EQ(automatic.memory_kind(), HostMemoryKind::kAligned);
  EXPECT_NE(automatic.memory_note().find("without CUDA"), std::string::npos) << automatic.memory_note();
#endif
  std::vector<PageId> ids = automatic.allocate(4);
  for (PageId id : ids) std::memset(automatic.page(id), 0x5a, kLayout.page_bytes());
  automatic.free(ids);
  EXPECT_STREQ(to_string(HostMemoryKind::kPinnedMapped), "pinned-mapped");
  EXPECT_STREQ(to_string(HostMemoryKind::kAligned), "aligned");
}

TEST(HostKVPool, ExhaustionTakesNothingAndSaysHowShort) {
  HostKVPool pool(kLayout, 5 * kPerPage, HostMemoryRequest::kAligned);
  const std::vector<PageId> three = pool.allocate(3);
  const std::string msg = message_of([&] { (void)pool.allocate(3); });
  EXPECT_NE(msg.find("HostKVPool::allocate: pool exhausted: need 3 pages, 2 free of 5"), std::string::npos) << msg;
  EXPECT_THROW((void)pool.allocate(3), OutOfCapacity);
  EXPECT_EQ(pool.stats().used_pages, 3) << "all or nothing";
  const std::vector<PageId> two = pool.allocate(2);
  EXPECT_EQ(pool.stats().free_pages(), 0);
  EXPECT_TRUE(pool.allocate(0).empty());
  pool.free(three);
  pool.free(two);
  EXPECT_EQ(pool.allocate(5).size(), 5u);
}

TEST(HostKVPool, FreeChecksEveryIdBeforeFreeingAny) {
  HostKVPool pool(kLayout, 6 * kPerPage, HostMemoryRequest::kAligned);
  std::vector<PageId> ids = pool.allocate(4);
  const PageId never = [&] {
    for (PageId p = 0; p < 6; ++p)
      if (!pool.is_allocated(p)) return p;
    return PageId{-1};
  }();
  std::string msg = message_of([&] { pool.free(std::vector<PageId>{ids[0], 6}); });
  EXPECT_NE(msg.find("HostKVPool::free: page id must be in [0, 6) (got 6)"), std::string::npos) << msg;
  msg = message_of([&] { pool.free(std::vector<PageId>{ids[1], -1}); });
  EXPECT_NE(msg.find("(got -1)"), std::string::npos) << msg;
  msg = message_of([&] { pool.free(std::vector<PageId>{ids[0], never}); });
  EXPECT_NE(msg.find("page id must be an allocated page (got " + std::to_string(never) + ")"), std::string::npos) << msg;
  msg = message_of([&] { pool.free(std::vector<PageId>{ids[2], ids[2]}); });
  EXPECT_NE(msg.find("listed once (got " + std::to_string(ids[2]) + ")"), std::string::npos) << msg;
  EXPECT_EQ(pool.stats().used_pages, 4) << "a rejected free frees nothing";
  for (PageId id : ids) EXPECT_TRUE(pool.is_allocated(id));

  pool.free(std::span<const PageId>(ids).first(2));
  msg = message_of([&] { pool.free(std::span<const PageId>(ids).first(1)); });  // double free
  EXPECT_NE(msg.find("an allocated page (got " + std::to_string(ids[0]) + ")"), std::string::npos) << msg;
  EXPECT_EQ(pool.stats().used_pages, 2);
  EXPECT_FALSE(pool.is_allocated(-1));
  EXPECT_FALSE(pool.is_allocated(6));
}

TEST(HostKVPool, RejectsBadLayoutsAndSizesNamingThem) {
  std::string msg = message_of([] { HostKVPool p(PageLayout{24, 2, 64, DType::kBFloat16}, 1 << 20); });
  EXPECT_NE(msg.find("page_size must be 16, 32 or 64 (got 24)"), std::string::npos) << msg;
  msg = message_of([] { HostKVPool p(PageLayout{16, 2, 96, DType::kBFloat16}, 1 << 20); });
  EXPECT_NE(msg.find("head_dim must be 64, 128 or 256 (got 96)"), std::string::npos) << msg;
  msg = message_of([] { HostKVPool p(PageLayout{16, 0, 64, DType::kBFloat16}, 1 << 20); });
  EXPECT_NE(msg.find("kv_heads must be > 0 (got 0)"), std::string::npos) << msg;
  msg = message_of([] { HostKVPool p(kLayout, kPerPage - 1); });
  EXPECT_NE(msg.find("pool_bytes must be >= one page plus its summary (" + std::to_string(kPerPage) +
                     " bytes) (got " + std::to_string(kPerPage - 1) + ")"),
            std::string::npos)
      << msg;
  HostKVPool pool(kLayout, 2 * kPerPage, HostMemoryRequest::kAligned);
  msg = message_of([&] { (void)pool.allocate(-2); });
  EXPECT_NE(msg.find("HostKVPool::allocate: n must be >= 0 (got -2)"), std::string::npos) << msg;
}

// Threads allocate and free at random, stamp their pages and check the stamps before freeing: a page
// handed to two owners at once, or a lost id, shows up as a wrong stamp or a wrong final count.
TEST(HostKVPool, AllocateAndFreeFromSeveralThreads) {
  constexpr int kCapacity = 16;  // one thread alone can want 21 pages: exhaustion happens in any interleaving
  HostKVPool pool(kLayout, kCapacity * kPerPage, HostMemoryRequest::kAligned);
  constexpr int kThreads = 6;
  std::atomic<std::int64_t> exhausted{0};
  std::atomic<int> bad_stamps{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(100 + t);
      std::vector<PageId> held;
      const auto stamp = static_cast<unsigned char>(t + 1);
      for (int step = 0; step < 3000; ++step) {
        if (held.size() < 16 && std::uniform_int_distribution<int>(0, 2)(rng) != 0) {
          try {
            const std::vector<PageId> got = pool.allocate(std::uniform_int_distribution<int>(1, 6)(rng));
            for (PageId id : got) std::memset(pool.page(id), stamp, 64);
            held.insert(held.end(), got.begin(), got.end());
          } catch (const OutOfCapacity&) {
            ++exhausted;  // expected: the pool is smaller than what the threads want
          }
        } else if (!held.empty()) {
          std::shuffle(held.begin(), held.end(), rng);
          const std::size_t n = std::uniform_int_distribution<std::size_t>(1, held.size())(rng);
          for (std::size_t i = 0; i < n; ++i)
            for (int b = 0; b < 64; ++b)
              if (static_cast<unsigned char>(pool.page(held[i])[b]) != stamp) ++bad_stamps;
          pool.free(std::span<const PageId>(held).first(n));
          held.erase(held.begin(), held.begin() + static_cast<std::ptrdiff_t>(n));
        }
      }
      pool.free(held);
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(bad_stamps.load(), 0) << "a page was owned by two threads at once";
  EXPECT_EQ(pool.stats().used_pages, 0);
  const std::vector<PageId> all = pool.allocate(kCapacity);
  EXPECT_EQ(std::set<PageId>(all.begin(), all.end()).size(), static_cast<std::size_t>(kCapacity))
      << "the free list holds every id exactly once";
  EXPECT_GT(exhausted.load(), 0) << "contention reached the exhaustion path";
}

}  // namespace
}  // namespace hattn
