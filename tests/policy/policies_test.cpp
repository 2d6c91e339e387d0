// The shipped policies on their own: the rules they set, the classes they infer, the feedback they keep.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include <numeric>
#include <vector>

#include "hattn/detail/select_by_rule.hpp"
#include "hattn/hybrid_attention.hpp"

namespace hattn {
namespace {

SelectInputs inputs(std::span<const int> pages, std::span<const HeadAdvice> advice, double budget = 0.05) {
  return SelectInputs{0, static_cast<int>(advice.size()), budget, 1, 2, pages, advice};
}

TEST(FixedBudget, TakesCeilShareClampedToForcedAndAll) {
  std::vector<int> pages{1000, 10, 2};
  std::vector<HeadAdvice> advice(2);
  std::vector<SegmentRule> rules(6);
  SelectOutputs out{rules};
  FixedBudget(0.05).select(inputs(pages, advice), out);
  EXPECT_EQ(rules[0].budget_pages, 50);
  EXPECT_EQ(rules[1].budget_pages, 50);
  EXPECT_EQ(rules[2].budget_pages, 3);  // ceil(0.5) = 1 < 3 forced (1 sink + 2 local)
  EXPECT_EQ(rules[4].budget_pages, 2);  // only 2 pages exist
  EXPECT_EQ(rules[0].mass_threshold, 0.0f);
  FixedBudget(0.0).select(inputs(pages, advice, 0.2), out);  // 0 = the config's average budget
  EXPECT_EQ(rules[0].budget_pages, 200);
}

TEST(FixedBudget, RejectsShareOutsideUnitInterval) {
  EXPECT_THROW(FixedBudget(1.5), InvalidArgument);
  EXPECT_THROW(FixedBudget(-0.1), InvalidArgument);
  try {
    FixedBudget bad(2.0);
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("share"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("2"), std::string::npos);
  }
}

TEST(MassThreshold, SetsThresholdAndCap) {
  std::vector<int> pages{400};
  std::vector<HeadAdvice> advice(3);
  std::vector<SegmentRule> rules(3);
  SelectOutputs out{rules};
  MassThreshold(0.9f, 0.25).select(inputs(pages, advice), out);
  for (const auto& r : rules) {
    EXPECT_EQ(r.budget_pages, 100);
    EXPECT_FLOAT_EQ(r.mass_threshold, 0.9f);
  }
  EXPECT_THROW(MassThreshold(0.0f), InvalidArgument);
  EXPECT_THROW(MassThreshold(0.9f, 0.0), InvalidArgument);
}

TEST(OutputAware, KeepsTheLayerWithinTheAverageBudgetWhenHeadsAskForMore) {
  std::vector<int> pages{1000};
  std::vector<HeadAdvice> advice(4);
  advice[0] = {HeadClass::kDiffuse, 0.5f, 4};
  advice[1] = {HeadClass::kRetrieval, 0.02f, 1};
  advice[2] = {HeadClass::kLocal, 0.003f, 1};
  advice[3] = {HeadClass::kUnknown, -1.0f, 1};
  std::vector<SegmentRule> rules(4);
  SelectOutputs out{rules};
  OutputAware().select(inputs(pages, advice, 0.05), out);
  int sum = 0;
  for (const auto& r : rules) sum += r.budget_pages;
  EXPECT_LE(sum, static_cast<int>(0.05 * 1000 * 4));  // whole pages by largest remainder: never above
  // The diffuse head needs most and gets most; the local head gets the least.
  EXPECT_GT(rules[0].budget_pages, rules[1].budget_pages);
  EXPECT_GT(rules[1].budget_pages, rules[2].budget_pages);
  EXPECT_EQ(rules[0].granularity_pages, 4);
  for (const auto& r : rules) {
    EXPECT_GE(r.budget_pages, 3);
    EXPECT_GT(r.mass_threshold, 0.0f);
    EXPECT_EQ(r.mass_threshold, rules[0].mass_threshold);  // one threshold per layer (the GPU's rule)
  }
  // Retrieval heads rank by the Quest bound, the others by the blend.
  EXPECT_EQ(rules[0].rank, PageRank::kBlend);
  EXPECT_EQ(rules[1].rank, PageRank::kBound);
  EXPECT_EQ(rules[2].rank, PageRank::kBlend);
  EXPECT_EQ(rules[3].rank, PageRank::kBlend);
}

// A needle that straddles a page boundary: most of it in one page (high estimate), its last tokens
// in the next, whose mean key dilutes them (estimate near the background) while its bound stays
// second. The mass rule used to stop right after the main page (its estimate is > 98% of the
// head's); OutputAware's rule for a retrieval head keeps the tail (hattn-eval --quick: 13 of 51
// needles were lost this way).
TEST(OutputAware, KeepsTheTailPageOfANeedleThatStraddlesPages) {
  const int n = 200;
  std::vector<float> upper(n, 5.0f), estimate(n, 0.0f);
  upper[100] = 25.0f, estimate[100] = 10.0f;  // the needle's main page: 99% of the estimated mass
  upper[101] = 20.0f, estimate[101] = 0.5f;   // its last tokens
  for (int i = 110; i < 130; ++i) estimate[i] = 1.0f;  // pages the blend ranks above the tail
  std::vector<int> pages{n};
  std::vector<HeadAdvice> advice(2, HeadAdvice{HeadClass::kRetrieval, 0.02f, 1});
  std::vector<SegmentRule> rules(2);
  SelectOutputs out{rules};
  OutputAware().select(inputs(pages, advice, 0.05), out);
  const auto selects = [&](const SegmentRule& r, int page) {
    std::vector<std::int32_t> sel;
    detail::select_by_rule(upper, estimate, r, 1, 2, /*widen=*/true, sel);
    return std::binary_search(sel.begin(), sel.end(), page);
  };
  ASSERT_LE(rules[0].budget_pages, 10);
  EXPECT_TRUE(selects(rules[0], 100));
  EXPECT_TRUE(selects(rules[0], 101));
  // The rule before: blend rank, threshold 0.98: the main page only.
  EXPECT_TRUE(selects(SegmentRule{rules[0].budget_pages, 0.98f, 1, PageRank::kBlend}, 100));
  EXPECT_FALSE(selects(SegmentRule{rules[0].budget_pages, 0.98f, 1, PageRank::kBlend}, 101));
}

TEST(OutputAware, SharesUnusedBudgetWhenHeadsNeedLess) {
  std::vector<int> pages{1000};
  std::vector<HeadAdvice> advice(2, HeadAdvice{HeadClass::kRetrieval, 0.001f, 1});
  std::vector<SegmentRule> rules(2);
  SelectOutputs out{rules};
  OutputAware().select(inputs(pages, advice, 0.05), out);
  EXPECT_GE(rules[0].budget_pages + rules[1].budget_pages, 99);  // the whole average budget is available
}

TEST(OnlineHeadProfile, ClassifiesFromWhatTheMassRuleNeeded) {
  OnlineHeadProfile p;
  EXPECT_EQ(p.advise(0, 0).head_class, HeadClass::kUnknown);
  for (int step = 0; step < 5; ++step) {
    p.observe({0, 0, 0, 1000, 3, 100, 3, true});    // forced pages carried the mass: local
    p.observe({0, 0, 1, 1000, 20, 100, 3, true});   // few pages: retrieval
    p.observe({0, 0, 2, 1000, 300, 400, 3, true});  // many pages: diffuse
  }
  EXPECT_EQ(p.advise(0, 0).head_class, HeadClass::kLocal);
  EXPECT_EQ(p.advise(0, 1).head_class, HeadClass::kRetrieval);
  EXPECT_NEAR(p.advise(0, 1).expected_share, 0.02f, 1e-3f);
  EXPECT_EQ(p.advise(0, 2).head_class, HeadClass::kDiffuse);
  EXPECT_GT(p.advise(0, 2).granularity_pages, 1);
  EXPECT_EQ(p.advise(1, 0).head_class, HeadClass::kUnknown);  // another layer learned nothing
}

TEST(OnlineHeadProfile, CappedCountsRaiseTheEstimate) {
  OnlineHeadProfile p;
  p.observe({0, 0, 0, 1000, 50, 100, 3, true});
  const float before = p.advise(0, 0).expected_share;
  p.observe({0, 0, 0, 1000, 100, 100, 3, true});  // hit the cap: needed at least this much
  EXPECT_GT(p.advise(0, 0).expected_share, before);
  p.observe({0, 0, 0, 1000, 100, 100, 3, false});  // top-k counts say nothing about need
  EXPECT_THROW(p.observe({-1, -1, 0, 1000, 1, 1, 1, true}), InvalidArgument);
}

TEST(HybridGenFeedback, MovesTheShareByItsFactorsAndResetsPerRequest) {
  HybridGenFeedback s;
  std::vector<SeqId> rows{7};
  std::vector<int> pages{100};
  std::vector<SegmentRule> rules(1, SegmentRule{10, 0, 1});
  std::vector<double> shares(1, -1.0);
  ScheduleOutputs out{shares};
  ScheduleInputs in{0, 1, 1, 2, true, 0.0, 8192, 768, rows, pages, rules};
  s.schedule(in, out);
  EXPECT_DOUBLE_EQ(shares[0], 0.5);
  s.feedback({rows, 10.0, 20.0, 5, 5});  // CPU faster: grow
  EXPECT_NEAR(s.cpu_share(7), 0.6, 1e-12);
  s.feedback({rows, 30.0, 20.0, 5, 5});  // CPU slower: shrink
  EXPECT_NEAR(s.cpu_share(7), 0.48, 1e-12);
  s.schedule(in, out);
  EXPECT_NEAR(shares[0], 0.48, 1e-12);
  s.reset(7);
  EXPECT_NEAR(s.cpu_share(7), 0.5, 1e-12);
  for (int i = 0; i < 100; ++i) s.feedback({rows, 1.0, 20.0, 5, 5});
  EXPECT_LE(s.cpu_share(7), 0.95);
}

// One 128K-token request, 8 KV heads, 410 pages (5%) selected per head; bf16 blocks of 16 x 128.
struct PriorityCase {
  std::vector<SeqId> rows{1};
  std::vector<int> pages{8192};
  std::vector<SegmentRule> rules = std::vector<SegmentRule>(8, SegmentRule{410, 0, 1});
  std::vector<double> shares = std::vector<double>(1, -1.0);
  ScheduleInputs inputs(double hit_rate, bool gpu = true) const {
    return ScheduleInputs{0, 8, 1, 2, gpu, hit_rate, 8192, 768, rows, pages, rules};
  }
  double share(Priority& s, double hit_rate, bool gpu = true) {
    ScheduleOutputs out{shares};
    s.schedule(inputs(hit_rate, gpu), out);
    return shares[0];
  }
};

TEST(Priority, GivesTheCpuNothingWhenTheGpuReadsFromHbm) {
  Priority s;
  PriorityCase c;
  EXPECT_EQ(c.share(s, 1.0), 0.0);
  const double cold = c.share(s, 0.0);
  EXPECT_GT(cold, 0.0);  // zero-copy reads are slower than the CPU's DRAM reads
  EXPECT_LT(cold, 1.0);
  // The CPU measured slower than predicted: it gets less next time.
  s.feedback({c.rows, 1e4, 10.0, 100, 100});
  EXPECT_LT(c.share(s, 0.0), cold);
  EXPECT_EQ(c.share(s, 0.0, /*gpu=*/false), 1.0);
}

TEST(Priority, IgnoresTimingsThatAreNotPositiveNumbers) {
  Priority s;
  PriorityCase c;
  const double cold = c.share(s, 0.0);
  s.feedback({c.rows, std::nan(""), std::nan(""), 100, 100});
  s.feedback({c.rows, -5.0, 0.0, 100, 100});
  EXPECT_EQ(s.cpu_correction(), 1.0);
  EXPECT_EQ(s.gpu_correction(), 1.0);
  EXPECT_EQ(c.share(s, 0.0), cold);
}

// From CostModel::gpu_only_hit_rate on, a warm cache's few misses are the GPU's.
TEST(Priority, LeavesAWarmCacheToTheGpu) {
  Priority s;
  PriorityCase c;
  EXPECT_GT(c.share(s, 0.3), 0.0);
  EXPECT_EQ(c.share(s, 0.5), 0.0);
  EXPECT_EQ(c.share(s, 0.85), 0.0);
  Priority::CostModel m;
  m.gpu_only_hit_rate = 1.01;  // never
  Priority always(m);
  EXPECT_GT(c.share(always, 0.85), 0.0);
}

// The CPU's share is filled with uncached blocks first: with most of the selection in HBM it takes
// no more than the misses, because the GPU reads its cached blocks ~60x faster than the CPU could.
TEST(Priority, TakesAtMostTheMissesWhenMostBlocksAreCached) {
  Priority s;
  PriorityCase c;
  const double cold = c.share(s, 0.0);
  double last = cold;
  for (double hit : {0.3, 0.6, 0.9}) {
    const double x = c.share(s, hit);
    EXPECT_LE(x, 1.0 - hit + 1e-12) << "hit rate " << hit;
    EXPECT_LE(x, last) << "hit rate " << hit;  // fewer misses, less for the CPU
    last = x;
  }
}

}  // namespace
}  // namespace hattn
