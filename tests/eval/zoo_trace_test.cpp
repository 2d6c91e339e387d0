// The zoo's selection trace: the top-k rule's shape, determinism, needles found, and a cache replay
// over it (bucketed LRU against exact LRU, and no more misses avoided than there were repeats).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/kv/cache_replay.hpp"
#include "zoo/zoo_trace.hpp"

namespace hattn::zoo {
namespace {

static_assert(ReplayableTrace<ZooSelectionTrace>);
static_assert(ReplayableTrace<SelectionTrace>);

ZooTraceConfig small_config(int max_steps = 24) {
  ZooTraceConfig c;
  c.zoo.model = llama3_8b_shape();
  c.zoo.layers = {2, 16};
  c.zoo.context_tokens = 8192;
  c.zoo.seed = 11;
  c.budget = 0.05;
  c.max_steps = max_steps;
  return c;
}

TEST(ZooSelectionTrace, TopKOfEveryHeadWithSinkAndWindow) {
  ZooSelectionTrace trace(small_config());
  for (int step = 0; step < 20; ++step) {
    const int n = trace.pages(0);
    EXPECT_EQ(n, (8192 + step + 1 + 15) / 16);  // the prompt and tokens 0..step
    const int k = static_cast<int>(std::ceil(0.05 * n));
    for (int l = 0; l < trace.layers(); ++l)
      for (int h = 0; h < trace.kv_heads(); ++h) {
        const auto& s = trace.selected(0, l, h);
        ASSERT_GE(static_cast<int>(s.size()), k) << "layer " << l << " head " << h;
        ASSERT_LE(static_cast<int>(s.size()), k + 2);
        EXPECT_TRUE(std::is_sorted(s.begin(), s.end()));
        EXPECT_EQ(std::adjacent_find(s.begin(), s.end()), s.end());
        EXPECT_EQ(s.front(), 0);
        EXPECT_EQ(s.back(), n - 1);
      }
    trace.advance();
  }
}

TEST(ZooSelectionTrace, SameConfigSameSelections) {
  ZooSelectionTrace a(small_config()), b(small_config());
  for (int step = 0; step < 5; ++step) {
    for (int l = 0; l < a.layers(); ++l)
      for (int h = 0; h < a.kv_heads(); ++h) ASSERT_EQ(a.selected(0, l, h), b.selected(0, l, h));
    a.advance();
    b.advance();
  }
}

TEST(ZooSelectionTrace, RetrievalHeadsSelectTheirTargetNeedle) {
  const ZooTraceConfig c = small_config();
  ZooSelectionTrace trace(c);
  const HeadZoo zoo(c.zoo, c.max_steps + 1);
  int checked = 0;
  for (int step = 0; step < 8; ++step) {
    for (int l = 0; l < trace.layers(); ++l)
      for (int h = 0; h < trace.kv_heads(); ++h) {
        if (zoo.kind(l, h) != HeadKind::kRetrieval) continue;
        const auto& s = trace.selected(0, l, h);
        for (const Span& t : zoo.targets(l, h, step)) {
          const int first = static_cast<int>(t.begin / 16), last = static_cast<int>((t.begin + t.length - 1) / 16);
          bool found = false;
          for (int p = first; p <= last; ++p) found = found || std::binary_search(s.begin(), s.end(), p);
          EXPECT_TRUE(found) << "step " << step << " layer " << l << " head " << h << " needle at " << t.begin;
          ++checked;
        }
      }
    trace.advance();
  }
  EXPECT_GT(checked, 0) << "the zoo layers chosen hold no retrieval head";
}

TEST(ZooSelectionTrace, ReplayBucketedLruNearExactAndFirstTouchesBoundTheHits) {
  for (double multiple : {1.5, 4.0}) {
    ZooSelectionTrace a(small_config()), b(small_config());
    const int max_pages = a.pages(0) + 4;
    const auto exact = replay(a, CacheReplacement::kExactLru, 24, 6, multiple, max_pages);
    const auto bucketed = replay(b, CacheReplacement::kBucketedLru, 24, 6, multiple, max_pages);
    const double gap = 100.0 * (exact.counters.hit_rate() - bucketed.counters.hit_rate());
    EXPECT_LE(gap, 2.0) << "multiple " << multiple << ": exact " << exact.counters.hit_rate() << " bucketed "
                        << bucketed.counters.hit_rate();
    EXPECT_GT(exact.counters.hits, 0);
    // A block no earlier step selected cannot be a hit under either rule.
    EXPECT_LE(exact.first_touches, exact.counters.misses);
    EXPECT_LE(bucketed.first_touches, bucketed.counters.misses);
    EXPECT_EQ(exact.first_touches, bucketed.first_touches);
    EXPECT_GT(exact.first_touches, 0);
  }
}

TEST(ZooSelectionTrace, RejectsBadConfigAndStepsPastTheEnd) {
  ZooTraceConfig c = small_config(2);
  c.budget = 0.0;
  EXPECT_THROW(ZooSelectionTrace{c}, InvalidArgument);
  c = small_config(1);
  ZooSelectionTrace trace(c);
  trace.advance();
  EXPECT_THROW(trace.advance(), InvalidArgument);
  EXPECT_THROW(trace.selected(0, 2, 0), InvalidArgument);
  EXPECT_THROW(trace.selected(1, 0, 0), InvalidArgument);
}

}  // namespace
}  // namespace hattn::zoo
