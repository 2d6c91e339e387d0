// ThreadPool: every task runs exactly once, on a worker index in range; exceptions come back to the
// caller; concurrent callers are serialised; a call from inside a task runs inline; back-to-back
// short calls (the decode step's pattern) hand off correctly. Also the target of scripts/tsan.sh.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

#include "hattn/core/thread_pool.hpp"

namespace hattn {
namespace {

TEST(ThreadPool, SizeCountsTheCaller) {
  EXPECT_EQ(ThreadPool(1).size(), 1);
  EXPECT_EQ(ThreadPool(3).size(), 3);
  EXPECT_GE(ThreadPool(0).size(), 1);
}

TEST(ThreadPool, EveryTaskRunsOnceOnAValidWorker) {
  for (int threads : {1, 2, 4, 7}) {
    ThreadPool pool(threads);
    for (std::int64_t n : {0, 1, 3, 64, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      std::atomic<int> bad_worker{0};
      pool.parallel_for(n, [&](std::int64_t t, int w) {
        hits[static_cast<std::size_t>(t)].fetch_add(1);
        if (w < 0 || w >= pool.size()) bad_worker.fetch_add(1);
      });
      for (std::int64_t t = 0; t < n; ++t) ASSERT_EQ(hits[static_cast<std::size_t>(t)].load(), 1) << "task " << t;
      EXPECT_EQ(bad_worker.load(), 0);
    }
  }
}

TEST(ThreadPool, WorkersTakePartWhenTasksWait) {
  // Tasks that sleep cannot all run on the caller in the time it takes the others to start.
  ThreadPool pool(4);
  std::vector<std::atomic<int>> by_worker(4);
  pool.parallel_for(16, [&](std::int64_t, int w) {
    by_worker[static_cast<std::size_t>(w)].fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  });
  int used = 0;
  for (auto& c : by_worker) used += c.load() > 0;
  EXPECT_GE(used, 2);
}

TEST(ThreadPool, ResultsOfTasksAreVisibleAfterReturn) {
  ThreadPool pool(4);
  std::vector<std::int64_t> out(10000, -1);  // plain writes: the return must publish them
  for (int round = 0; round < 50; ++round) {
    pool.parallel_for(static_cast<std::int64_t>(out.size()), [&](std::int64_t t, int) { out[t] = t + round; });
    for (std::size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], static_cast<std::int64_t>(i) + round);
  }
}

TEST(ThreadPool, ExceptionIsRethrownAfterTasksStop) {
  ThreadPool pool(4);
  std::atomic<int> running{0};
  EXPECT_THROW(pool.parallel_for(100,
                                 [&](std::int64_t t, int) {
                                   running.fetch_add(1);
                                   if (t == 7) {
                                     running.fetch_sub(1);
                                     throw std::runtime_error("task 7 failed");
                                   }
                                   std::this_thread::sleep_for(std::chrono::microseconds(100));
                                   running.fetch_sub(1);
                                 }),
               std::runtime_error);
  EXPECT_EQ(running.load(), 0) << "a task was still running when parallel_for rethrew";
  // The pool stays usable.
  std::atomic<int> n{0};
  pool.parallel_for(10, [&](std::int64_t, int) { n.fetch_add(1); });
  EXPECT_EQ(n.load(), 10);
}

TEST(ThreadPool, ExceptionMessageIsTheTasks) {
  ThreadPool pool(3);
  try {
    pool.parallel_for(5, [](std::int64_t t, int) {
      if (t == 4) throw std::invalid_argument("bad task 4");
    });
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "bad task 4");
  }
}

TEST(ThreadPool, ConcurrentCallersAreSerialised) {
  ThreadPool pool(4);
  std::atomic<int> inside{0};
  std::atomic<int> overlap{0};
  std::atomic<std::int64_t> sum{0};
  auto caller = [&](int id) {
    for (int round = 0; round < 50; ++round) {
      pool.parallel_for(8, [&](std::int64_t t, int) {
        // Each call's tasks carry its caller id; two calls at once would show two ids inside.
        const int before = inside.fetch_add(1 << (id * 8));
        if ((before & ~(0xff << (id * 8))) != 0) overlap.fetch_add(1);
        sum.fetch_add(t);
        inside.fetch_sub(1 << (id * 8));
      });
    }
  };
  std::thread a(caller, 0), b(caller, 1), c(caller, 2);
  a.join();
  b.join();
  c.join();
  EXPECT_EQ(overlap.load(), 0);
  EXPECT_EQ(sum.load(), 3 * 50 * 28);
}

TEST(ThreadPool, NestedCallRunsInline) {
  ThreadPool pool(4);
  std::atomic<int> inner{0};
  std::atomic<int> mismatched{0};
  pool.parallel_for(8, [&](std::int64_t, int w) {
    pool.parallel_for(4, [&](std::int64_t, int w2) {
      inner.fetch_add(1);
      if (w2 != w) mismatched.fetch_add(1);
    });
  });
  EXPECT_EQ(inner.load(), 32);
  EXPECT_EQ(mismatched.load(), 0);
}

TEST(ThreadPool, ManyShortCallsBackToBack) {
  // The decode pattern: one small call per layer, thousands of times, with workers spinning between.
  ThreadPool pool(4);
  std::vector<int> slots(64, 0);
  for (int call = 0; call < 3000; ++call) {
    pool.parallel_for(64, [&](std::int64_t t, int) { slots[static_cast<std::size_t>(t)] += 1; });
  }
  for (int s : slots) ASSERT_EQ(s, 3000);
}

TEST(ThreadPool, WakesWorkersAfterTheySleep) {
  ThreadPool pool(3);
  pool.parallel_for(3, [](std::int64_t, int) {});
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past the spin: workers asleep
  std::vector<std::atomic<int>> by_worker(3);
  pool.parallel_for(12, [&](std::int64_t, int w) {
    by_worker[static_cast<std::size_t>(w)].fetch_add(1);
    std::this_thread::sleep_for(std::chrono::milliseconds(3));
  });
  int used = 0;
  for (auto& c : by_worker) used += c.load() > 0;
  EXPECT_GE(used, 2) << "sleeping workers were not woken";
}

TEST(ThreadPool, DestroysWhileWorkersSleepOrSpin) {
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(3);
    if (i % 2) pool.parallel_for(4, [](std::int64_t, int) {});
  }
  SUCCEED();
}

}  // namespace
}  // namespace hattn
