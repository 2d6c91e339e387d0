// The accuracy metrics on hand-made cases, and the harness's exact side against reference::decode.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "hattn/reference/exact_attention.hpp"
#include "metrics.hpp"
#include "zoo/head_zoo.hpp"

namespace hattn::eval {
namespace {

const ModelShape kOneHead{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 64, .kv_dtype = DType::kBFloat16};

TEST(ExactLayer, TwoTokensByHand) {
  // q.k = 2 for token 0 and 0 for token 1 at scale 1: p0 = e^2 / (e^2 + 1).
  std::vector<bfloat16_t> k(2 * 64, to_bfloat16(0)), v(2 * 64, to_bfloat16(0));
  std::vector<float> q(64, 0.0f);
  q[0] = 1.0f;
  k[0] = to_bfloat16(2.0f);
  v[0] = to_bfloat16(1.0f);       // token 0 value: e_0
  v[64 + 1] = to_bfloat16(3.0f);  // token 1 value: 3 e_1
  const ExactLayer r = exact_layer(k, v, 2, kOneHead, q, 1.0, 1);
  const double p0 = std::exp(2.0) / (std::exp(2.0) + 1.0);
  EXPECT_NEAR(r.lse[0], std::log(std::exp(2.0) + 1.0), 1e-12);
  EXPECT_NEAR(r.page_mass[0], p0, 1e-12);
  EXPECT_NEAR(r.page_mass[1], 1 - p0, 1e-12);
  EXPECT_NEAR(r.out[0], p0, 1e-12);
  EXPECT_NEAR(r.out[1], 3 * (1 - p0), 1e-12);
  // Both tokens in one page: all the mass in it.
  const ExactLayer one = exact_layer(k, v, 2, kOneHead, q, 1.0, 16);
  ASSERT_EQ(one.pages, 1);
  EXPECT_NEAR(one.page_mass[0], 1.0, 1e-12);
}

TEST(ExactLayer, EqualsReferenceDecodeOnZooTokens) {
  zoo::ZooConfig c;
  c.model = zoo::llama3_8b_shape();
  c.layers = {0};
  c.context_tokens = 2048;
  const zoo::HeadZoo zoo(c);
  const ModelShape& shape = zoo.shape();
  const std::int64_t n = 2048 + 5;  // a partial last page
  std::vector<bfloat16_t> k(static_cast<std::size_t>(n) * 8 * 128), v(k.size());
  zoo.tokens(0, 0, n, k, v);
  std::vector<float> q(32 * 128);
  zoo.query(0, 4, q);
  const PageLayout l{16, 8, 128, DType::kBFloat16};
  PagedKVStore store(shape, 16, 200 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  store.append(seq, 0, TensorView::contiguous(k.data(), DType::kBFloat16, {n, 8, 128}),
               TensorView::contiguous(v.data(), DType::kBFloat16, {n, 8, 128}));
  const reference::Partial ref = reference::decode(store, seq, 0, q, zoo.scale());
  const ExactLayer mine = exact_layer(k, v, n, shape, q, zoo.scale(), 16, 2);
  ASSERT_EQ(mine.pages, 129);
  for (std::size_t i = 0; i < ref.out.size(); ++i) ASSERT_NEAR(mine.out[i], ref.out[i], 1e-9) << i;
  for (int h = 0; h < 32; ++h) {
    EXPECT_NEAR(mine.lse[h], ref.lse[h], 1e-9) << h;
    double total = 0;
    for (int p = 0; p < mine.pages; ++p) total += mine.page_mass[static_cast<std::size_t>(h) * mine.pages + p];
    EXPECT_NEAR(total, 1.0, 1e-9);
  }
  // Mass recall of a page subset equals exp(lse(subset) - lse(all)) from the reference.
  std::vector<reference::HeadSelection> sel(8);
  std::vector<std::int32_t> pages = {0, 3, 60, 127, 128};
  for (auto& s : sel) s.pages = pages;
  const reference::Partial part = reference::decode(store, seq, 0, q, zoo.scale(), &sel);
  for (int h = 0; h < 32; ++h) {
    const double recall = mass_recall(std::span<const double>(mine.page_mass).subspan(h * 129, 129), pages);
    EXPECT_NEAR(recall, std::exp(part.lse[h] - ref.lse[h]), 1e-9) << h;
    EXPECT_NEAR(lse_error_of_recall(recall), ref.lse[h] - part.lse[h], 1e-9) << h;
  }
}

TEST(Metrics, RelativeL2) {
  const std::vector<double> ref = {3, 4};
  EXPECT_DOUBLE_EQ(relative_l2(std::vector<float>{3, 4}, ref), 0.0);
  EXPECT_NEAR(relative_l2(std::vector<float>{3, 5}, ref), 1.0 / 5.0, 1e-12);
  EXPECT_DOUBLE_EQ(relative_l2(std::vector<float>{0, 0}, std::vector<double>{0, 0}), 0.0);
  EXPECT_TRUE(std::isinf(relative_l2(std::vector<float>{1, 0}, std::vector<double>{0, 0})));
  EXPECT_THROW(relative_l2(std::vector<float>{1}, ref), InvalidArgument);
}

TEST(Metrics, MassRecallAndLseError) {
  const std::vector<double> mass = {0.5, 0.25, 0.125, 0.125};
  EXPECT_DOUBLE_EQ(mass_recall(mass, std::vector<std::int32_t>{0, 2}), 0.625);
  EXPECT_DOUBLE_EQ(mass_recall(mass, std::vector<std::int32_t>{}), 0.0);
  EXPECT_THROW(mass_recall(mass, std::vector<std::int32_t>{4}), InvalidArgument);
  EXPECT_DOUBLE_EQ(lse_error_of_recall(1.0), 0.0);
  EXPECT_NEAR(lse_error_of_recall(0.5), std::log(2.0), 1e-15);
  EXPECT_TRUE(std::isinf(lse_error_of_recall(0.0)));
}

TEST(Metrics, NeedleHitNeedsEveryPageOfTheSpan) {
  const std::vector<std::int32_t> selected = {0, 4, 5, 9};
  EXPECT_TRUE(needle_hit(selected, 64, 16, 16));    // page 4 only
  EXPECT_TRUE(needle_hit(selected, 70, 20, 16));    // pages 4 and 5
  EXPECT_FALSE(needle_hit(selected, 90, 10, 16));   // pages 5 and 6: 6 missing
  EXPECT_FALSE(needle_hit(selected, 16, 1, 16));    // page 1
  EXPECT_TRUE(needle_hit(selected, 159, 1, 16));    // last token of page 9
}

TEST(Metrics, WidenToRuns) {
  std::vector<std::int32_t> p = {1, 9, 10};
  detail::widen_to_runs(p, 4, 11);
  EXPECT_EQ(p, (std::vector<std::int32_t>{0, 1, 2, 3, 8, 9, 10}));
  p = {2, 3};
  detail::widen_to_runs(p, 1, 4);
  EXPECT_EQ(p, (std::vector<std::int32_t>{2, 3}));
}

TEST(Metrics, WidenedSelectionsKeepTheirBudget) {
  // 64 pages, rising scores: the top pages are the last ones. Budget 12 with 1 sink and 1 local page:
  // 10 pages beyond the forced ones buy ceil(10 / 4) = 3 runs of 4.
  std::vector<float> upper(64), estimate(64);
  for (int i = 0; i < 64; ++i) upper[i] = estimate[i] = static_cast<float>(i);
  std::vector<std::int32_t> out;
  detail::select_by_rule(upper, estimate, SegmentRule{12, 0.0f, 4}, 1, 1, /*widen=*/true, out);
  // The sink widens to [0, 4); the local page 63 and the best pages 62, 61, 60 share the run [60, 64).
  // The widened selection stays within the budget (without the division it would take 5 runs, 20 pages).
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 1, 2, 3, 60, 61, 62, 63}));
  // Without widening the rule takes exactly its budget.
  detail::select_by_rule(upper, estimate, SegmentRule{12, 0.0f, 4}, 1, 1, /*widen=*/false, out);
  EXPECT_EQ(out.size(), 12u);
  EXPECT_EQ(out[1], 53);
}

TEST(Metrics, ReplaySelectionFindsTheHotPage) {
  // 8 pages of 16 tokens; every key zero but those of page 2, which carry q's direction.
  const PageLayout l{16, 1, 64, DType::kBFloat16};
  PagedKVStore store(kOneHead, 16, 16 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  std::vector<bfloat16_t> k(128 * 64, to_bfloat16(0)), v(128 * 64, to_bfloat16(1));
  for (int t = 32; t < 48; ++t)
    for (int d = 0; d < 64; ++d) k[t * 64 + d] = to_bfloat16(1.0f);
  store.append(seq, 0, TensorView::contiguous(k.data(), DType::kBFloat16, {128, 1, 64}),
               TensorView::contiguous(v.data(), DType::kBFloat16, {128, 1, 64}));
  std::vector<float> q(64, 1.0f);
  // Top-k with k = 3: sink page 0, local page 7, and the hot page 2.
  auto top = replay_selection(store, seq, 0, 0, q, 0.125f, SegmentRule{3, 0.0f, 1}, 1, 1, /*widen=*/true);
  EXPECT_EQ(top, (std::vector<std::int32_t>{0, 2, 7}));
  // Mass rule: page 2 holds nearly all the estimated mass.
  auto mass = replay_selection(store, seq, 0, 0, q, 0.125f, SegmentRule{8, 0.9f, 1}, 1, 1, /*widen=*/true);
  EXPECT_EQ(mass, (std::vector<std::int32_t>{0, 2, 7}));
  // Granularity 4 widens page 2 to the run [0, 4).
  auto wide = replay_selection(store, seq, 0, 0, q, 0.125f, SegmentRule{3, 0.0f, 4}, 1, 1, /*widen=*/true);
  EXPECT_EQ(wide, (std::vector<std::int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  // The GPU backend does not widen: the same rule selects the pages themselves.
  auto narrow = replay_selection(store, seq, 0, 0, q, 0.125f, SegmentRule{3, 0.0f, 4}, 1, 1, /*widen=*/false);
  EXPECT_EQ(narrow, (std::vector<std::int32_t>{0, 2, 7}));
  // The full budget takes every page.
  auto all = replay_selection(store, seq, 0, 0, q, 0.125f, SegmentRule{8, 0.0f, 1}, 1, 1, /*widen=*/true);
  EXPECT_EQ(all.size(), 8u);
}

TEST(Metrics, OracleSharesTheLayerBudgetAcrossHeads) {
  // 2 KV heads x group 2, 4 pages. Head 0 concentrates its mass on page 1, head 1 spreads it.
  ExactLayer ex;
  ex.pages = 4;
  ex.page_mass = {0.05, 0.85, 0.05, 0.05,   // q0 (KV head 0)
                  0.05, 0.80, 0.10, 0.05,   // q1 (KV head 0)
                  0.25, 0.25, 0.30, 0.20,   // q2 (KV head 1)
                  0.30, 0.20, 0.30, 0.20};  // q3 (KV head 1)
  // 25% of 8 (head, page) pairs = 2: head 0's page 1 (group mass 1.65), then head 1's page 2 (0.60).
  auto sel = oracle_selection(ex, 2, 2, 0.25);
  EXPECT_EQ(sel[0], (std::vector<std::int32_t>{1}));
  EXPECT_EQ(sel[1], (std::vector<std::int32_t>{2}));
  // 50% = 4 pairs: then head 1's page 0 (0.55) and page 1 (0.45), ahead of head 0's page 2 (0.15).
  sel = oracle_selection(ex, 2, 2, 0.5);
  EXPECT_EQ(sel[0], (std::vector<std::int32_t>{1}));
  EXPECT_EQ(sel[1], (std::vector<std::int32_t>{0, 1, 2}));
  // Every page at 100%, none at a budget below half a pair.
  sel = oracle_selection(ex, 2, 2, 1.0);
  EXPECT_EQ(sel[0].size() + sel[1].size(), 8u);
  sel = oracle_selection(ex, 2, 2, 0.01);
  EXPECT_TRUE(sel[0].empty() && sel[1].empty());
}

TEST(Metrics, BlendedRankFollowsTheEstimateButKeepsStrongNeedles) {
  // 8 pages, page 0 (sink) and 7 (local) forced, one more page affordable. Page 5 carries the most
  // estimated mass; page 3 has the highest bound.
  std::vector<float> upper = {4, 4, 4, 10, 4, 5, 4, 4}, estimate = {3.9f, 3.9f, 3.9f, 0, 3.9f, 4, 3.9f, 3.9f};
  std::vector<std::int32_t> out;
  detail::select_by_rule(upper, estimate, SegmentRule{3, 0.0f, 1, PageRank::kBound}, 1, 1, false, out);
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 3, 7}));
  // Blend: page 3 scores 0 + 0.1 x 10 = 1.0, page 5 scores 4 + 0.1 x 1 = 4.1.
  detail::select_by_rule(upper, estimate, SegmentRule{3, 0.0f, 1, PageRank::kBlend}, 1, 1, false, out);
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 5, 7}));
  // A needle whose bound stands far above the rest stays first under the blend: 3.5 + 0.1 x 26.5.
  upper[3] = 30, estimate[3] = 3.5f;
  detail::select_by_rule(upper, estimate, SegmentRule{3, 0.0f, 1, PageRank::kBlend}, 1, 1, false, out);
  EXPECT_EQ(out, (std::vector<std::int32_t>{0, 3, 7}));
}

TEST(Metrics, SumsAverage) {
  MetricSums a;
  a.output_error = 0.2, a.mass_recall = 1.8, a.q_samples = 2, a.budget = 0.1, a.segments = 1;
  a.needles = 4, a.needle_hits = 3;
  MetricSums b;
  b.output_error = 0.1, b.mass_recall = 0.9, b.q_samples = 1, b.budget = 0.2, b.segments = 1;
  a.add(b);
  EXPECT_NEAR(a.mean_output_error(), 0.1, 1e-12);
  EXPECT_NEAR(a.mean_mass_recall(), 0.9, 1e-12);
  EXPECT_NEAR(a.mean_budget(), 0.15, 1e-12);
  EXPECT_DOUBLE_EQ(a.needle_hit_rate(), 0.75);
  EXPECT_DOUBLE_EQ(MetricSums{}.needle_hit_rate(), -1.0);
}

}  // namespace
}  // namespace hattn::eval
