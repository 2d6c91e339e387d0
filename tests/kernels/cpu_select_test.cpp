// CPU scoring and selection: the Quest bound really bounds q.k and matches its formula, the mean-key
// estimate matches its formula, top-k equals a brute-force sort, forced pages are always present,
// and the mass rule takes the shortest prefix of the rank order that reaches its threshold; group
// scores bound their pages' scores, and two-level selection picks from the top groups' pages only.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "hattn/detail/select_by_rule.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kv/paged_kv_store.hpp"

namespace hattn {
namespace {

bool forced(int i, int n, int sink, int local) { return i < sink || i >= n - local; }

std::vector<std::int32_t> brute_top_k(const std::vector<float>& s, int k, int sink, int local, int begin, int end) {
  const int n = static_cast<int>(s.size());
  std::vector<std::int32_t> cand, out;
  for (int i = begin; i < end; ++i) (forced(i, n, sink, local) ? out : cand).push_back(i);
  std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return s[a] > s[b]; });
  const int take = std::clamp(k - static_cast<int>(out.size()), 0, static_cast<int>(cand.size()));
  out.insert(out.end(), cand.begin(), cand.begin() + take);
  std::sort(out.begin(), out.end());
  return out;
}

TEST(CpuSelectTopK, EqualsBruteForceSortWithTiesAndForcedPages) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = std::uniform_int_distribution<int>(0, 300)(rng);
    std::vector<float> s(static_cast<std::size_t>(n));
    // Few distinct values, so ties are common and the lower position must win.
    for (float& x : s) x = static_cast<float>(std::uniform_int_distribution<int>(-5, 5)(rng));
    const int k = std::uniform_int_distribution<int>(0, n + 3)(rng);
    const int sink = std::uniform_int_distribution<int>(0, 4)(rng);
    const int local = std::uniform_int_distribution<int>(0, 4)(rng);
    const int begin = n ? std::uniform_int_distribution<int>(0, n / 3)(rng) : 0;
    const int end = n ? std::uniform_int_distribution<int>(begin, n)(rng) : 0;
    std::vector<std::int32_t> got;
    cpu_select_top_k(s, k, sink, local, begin, end, got);
    ASSERT_EQ(got, brute_top_k(s, k, sink, local, begin, end))
        << "n " << n << " k " << k << " sink " << sink << " local " << local << " [" << begin << ", " << end << ")";
    for (int i = begin; i < end; ++i)
      if (forced(i, n, sink, local)) ASSERT_TRUE(std::binary_search(got.begin(), got.end(), i)) << "forced " << i;
  }
}

TEST(CpuSelectTopK, NanScoresRankLowestAndArgumentsAreChecked) {
  std::vector<float> s = {1.0f, std::nanf(""), 3.0f, 2.0f};
  std::vector<std::int32_t> got;
  cpu_select_top_k(s, 3, 0, 0, 0, 4, got);
  EXPECT_EQ(got, (std::vector<std::int32_t>{0, 2, 3}));
  EXPECT_THROW(cpu_select_top_k(s, -1, 0, 0, 0, 4, got), InvalidArgument);
  EXPECT_THROW(cpu_select_top_k(s, 1, 0, 0, 2, 5, got), InvalidArgument);
  EXPECT_THROW(cpu_select_top_k(s, 1, -1, 0, 0, 4, got), InvalidArgument);
}

double share(const std::vector<float>& lm, const std::vector<std::int32_t>& sel, int begin, int end) {
  double top = -INFINITY;
  for (int i = begin; i < end; ++i) top = std::max(top, static_cast<double>(lm[i]));
  double total = 0, part = 0;
  for (int i = begin; i < end; ++i) total += std::exp(lm[i] - top);
  for (int i : sel) part += std::exp(lm[i] - top);
  return part / total;
}

/// The rule as documented: the shortest prefix of the rank order (descending, ties to the lower
/// position) whose estimated mass, with the forced pages', reaches the threshold; then the cap.
/// `margin` gets the smallest distance between a prefix share and the threshold.
std::vector<std::int32_t> brute_mass(const std::vector<float>& rank, const std::vector<float>& lm, float threshold,
                                     int cap, int sink, int local, int begin, int end, double* margin) {
  const int n = static_cast<int>(lm.size());
  double top = -INFINITY;
  for (int i = begin; i < end; ++i) top = std::max(top, static_cast<double>(lm[i]));
  double total = 0, cum = 0;
  std::vector<std::int32_t> cand, out;
  for (int i = begin; i < end; ++i) {
    total += std::exp(lm[i] - top);
    if (forced(i, n, sink, local)) {
      cum += std::exp(lm[i] - top);
      out.push_back(i);
    } else {
      cand.push_back(i);
    }
  }
  std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return rank[a] > rank[b]; });
  *margin = std::abs(cum / total - threshold);
  int taken = 0;
  for (int i : cand) {
    if (cum >= threshold * total || taken == cap) break;
    out.push_back(i);
    ++taken;
    cum += std::exp(lm[i] - top);
    *margin = std::min(*margin, std::abs(cum / total - threshold));
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(CpuSelectMass, TakesTheShortestPrefixOfTheRankOrder) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 400; ++trial) {
    const int n = std::uniform_int_distribution<int>(1, 400)(rng);
    std::vector<float> lm(static_cast<std::size_t>(n)), rank(lm.size());
    // Peaked log-masses (a few heavy pages among many light ones), as attention mass is; the rank is
    // correlated with the mass but not its order (as the Quest bound is with the mean-key estimate),
    // and sometimes coarse so ties occur.
    const bool ties = trial % 3 == 0;
    for (int i = 0; i < n; ++i) {
      lm[i] = static_cast<float>(std::normal_distribution<double>(0, 2.5)(rng));
      const double r = lm[i] + std::normal_distribution<double>(0, 1.5)(rng);
      rank[i] = static_cast<float>(ties ? std::round(r) : r);
    }
    const float threshold = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng);
    const int sink = std::uniform_int_distribution<int>(0, 2)(rng);
    const int local = std::uniform_int_distribution<int>(0, 3)(rng);
    const int begin = trial % 4 == 1 ? std::uniform_int_distribution<int>(0, n / 3)(rng) : 0;
    const int end = trial % 4 == 1 ? std::uniform_int_distribution<int>(begin, n)(rng) : n;
    if (begin == end) continue;
    const int cap = trial % 5 == 2 ? std::uniform_int_distribution<int>(0, n / 4)(rng) : n;
    std::vector<std::int32_t> got;
    cpu_select_mass(rank, lm, threshold, cap, sink, local, begin, end, got);
    ASSERT_TRUE(std::is_sorted(got.begin(), got.end()));
    ASSERT_EQ(std::adjacent_find(got.begin(), got.end()), got.end());
    for (int i = begin; i < end; ++i)
      if (forced(i, n, sink, local)) ASSERT_TRUE(std::binary_search(got.begin(), got.end(), i)) << "forced " << i;
    double margin = 1;
    const auto want = brute_mass(rank, lm, threshold, cap, sink, local, begin, end, &margin);
    if (margin < 1e-9) continue;  // double sums in another order may land on either side
    ASSERT_EQ(got, want) << "trial " << trial << " n " << n << " threshold " << threshold << " cap " << cap;
    if (cap == n) ASSERT_GE(share(lm, got, begin, end), threshold * (1 - 1e-9)) << "trial " << trial;
  }
}

TEST(CpuSelectMass, ANeedlePageRankedByItsBoundIsKept) {
  // Page 3 holds a short needle: its mean key dilutes it (low estimate) while its bound is the
  // highest. Ranking by the estimate would reach 50% with page 1 alone and miss it.
  const std::vector<float> estimate = {0, 3, 1, 0.5f, 1, 0};
  const std::vector<float> bound = {1, 4, 2, 9, 2, 1};
  std::vector<std::int32_t> got;
  cpu_select_mass(bound, estimate, 0.5f, 10, 0, 0, 0, 6, got);
  EXPECT_EQ(got, (std::vector<std::int32_t>{1, 3}));
}

TEST(CpuSelectMass, CapAndSubrangeAndFullThreshold) {
  std::vector<float> lm = {0, 5, 1, 4, 2, 3, 0, 0};
  std::vector<std::int32_t> got;
  cpu_select_mass(lm, lm, 1.0f, 2, 0, 0, 0, 8, got);  // would need all 8; the cap keeps the top 2
  EXPECT_EQ(got, (std::vector<std::int32_t>{1, 3}));
  cpu_select_mass(lm, lm, 0.5f, 10, 1, 1, 2, 6, got);  // inside [2, 6): no forced page is in range
  // Masses e^1, e^4, e^2, e^3: e^4 alone is 64% of the range.
  EXPECT_EQ(got, (std::vector<std::int32_t>{3}));
  cpu_select_mass(lm, lm, 1.0f, 10, 0, 0, 0, 8, got);
  EXPECT_EQ(got.size(), 8u);
  EXPECT_THROW(cpu_select_mass(lm, lm, 0.0f, 10, 0, 0, 0, 8, got), InvalidArgument);
  EXPECT_THROW(cpu_select_mass(lm, lm, 1.5f, 10, 0, 0, 0, 8, got), InvalidArgument);
  const std::vector<float> short_rank(4);
  EXPECT_THROW(cpu_select_mass(short_rank, lm, 0.5f, 10, 0, 0, 0, 8, got), InvalidArgument);
}

// The scoring paths this CPU runs; the others are named on stdout, not silently dropped.
std::vector<CpuIsa> scoring_paths() {
  std::vector<CpuIsa> paths;
  for (CpuIsa isa : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (cpu_supports(isa)) paths.push_back(isa);
    else std::printf("scoring path %s skipped: not compiled in or not supported by this CPU\n", to_string(isa));
  }
  return paths;
}

// Scores from real summaries: a layer with a planted key per page range, on every scoring path.
TEST(CpuScorePages, QuestBoundsAndMeanKeyEstimateFollowTheirFormulas) {
  for (CpuIsa isa : scoring_paths())
  for (DType dtype : {DType::kBFloat16, DType::kFloat16, DType::kFloat32}) {
    SCOPED_TRACE(to_string(isa));
    const ModelShape shape{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .kv_dtype = dtype};
    const int P = 16, len = 16 * 20 + 7;
    PagedKVStore store(shape, P, 4 << 20, HostMemoryRequest::kAligned);
    const SeqId s = store.add_sequence();
    std::mt19937 rng(5);
    std::normal_distribution<double> n(0, 1);
    const std::size_t elems = static_cast<std::size_t>(len) * 2 * 64;
    std::vector<std::byte> kb(elems * dtype_bytes(dtype)), vb(kb.size());
    for (std::size_t i = 0; i < elems; ++i) {
      store_from_float(kb.data(), i, dtype, static_cast<float>(n(rng) * (i % 97 == 0 ? 6 : 1)));
      store_from_float(vb.data(), i, dtype, static_cast<float>(n(rng)));
    }
    store.append(s, 0, TensorView::contiguous(kb.data(), dtype, {len, 2, 64}),
                 TensorView::contiguous(vb.data(), dtype, {len, 2, 64}));
    const auto pages = store.pages(s, 0);
    const PageLayout& layout = store.layout();
    // A GQA group, and the largest group a call takes.
    for (const int G : {4, 256}) {
    SCOPED_TRACE(G);
    std::vector<float> q(static_cast<std::size_t>(G) * 64);
    for (float& x : q) x = static_cast<float>(n(rng));
    const float scale = 0.125f;
    for (int kvh = 0; kvh < 2; ++kvh) {
      std::vector<float> upper(pages.size()), est(pages.size());
      const int last_tokens = len - (static_cast<int>(pages.size()) - 1) * P;
      cpu_score_pages(store.pool(), kvh, q, G, scale, pages, last_tokens, upper, est, isa);
      for (std::size_t p = 0; p < pages.size(); ++p) {
        const std::byte* sum = store.pool().summary(pages[p]);
        const std::byte* page = store.pool().page(pages[p]);
        const int tokens = p + 1 == pages.size() ? last_tokens : P;
        double bound = -INFINITY, true_max = -INFINITY, mean_exp = 0;
        for (int g = 0; g < G; ++g) {
          double b = 0, dm = 0;
          for (int d = 0; d < 64; ++d) {
            const double qd = q[g * 64 + d];
            b += std::max(qd * load_as_float(sum, layout.summary_offset(kvh, 0) + d, dtype),
                          qd * load_as_float(sum, layout.summary_offset(kvh, 1) + d, dtype));
            dm += qd * load_as_float(sum, layout.summary_offset(kvh, 2) + d, dtype);
          }
          bound = std::max(bound, scale * b);
          mean_exp += std::exp(scale * dm) / G;
          for (int t = 0; t < tokens; ++t) {
            double dot = 0;
            for (int d = 0; d < 64; ++d) dot += q[g * 64 + d] * load_as_float(page, layout.key_offset(kvh, t) + d, dtype);
            true_max = std::max(true_max, scale * dot);
          }
        }
        ASSERT_NEAR(upper[p], bound, 1e-4 * (1 + std::abs(bound))) << "page " << p;
        ASSERT_GE(upper[p] + 1e-4 * (1 + std::abs(bound)), true_max) << "the Quest bound must bound q.k, page " << p;
        const double expect_est = std::log(static_cast<double>(tokens)) + std::log(mean_exp);
        ASSERT_NEAR(est[p], expect_est, 1e-4 * (1 + std::abs(expect_est))) << "page " << p;
      }
    }
    std::vector<float> wrong(1);
    std::vector<float> upper(pages.size()), est(pages.size());
    EXPECT_THROW(cpu_score_pages(store.pool(), 0, wrong, G, scale, pages, 7, upper, est), InvalidArgument);
    EXPECT_THROW(cpu_score_pages(store.pool(), 2, q, G, scale, pages, 7, upper, est), InvalidArgument);
    EXPECT_THROW(cpu_score_pages(store.pool(), 0, q, G, scale, pages, 0, upper, est), InvalidArgument);
    }
  }
  // More query heads per KV head than one call holds logits for.
  const ModelShape shape{.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kFloat32};
  PagedKVStore store(shape, 16, 1 << 20, HostMemoryRequest::kAligned);
  const SeqId s = store.add_sequence();
  std::vector<float> kv(16 * 2 * 64, 0.5f);
  store.append(s, 0, TensorView::contiguous(kv.data(), DType::kFloat32, {16, 2, 64}),
               TensorView::contiguous(kv.data(), DType::kFloat32, {16, 2, 64}));
  const int too_many = 257;
  std::vector<float> q(static_cast<std::size_t>(too_many) * 64), upper(1), est(1);
  EXPECT_THROW(cpu_score_pages(store.pool(), 0, q, too_many, 0.125f, store.pages(s, 0), 16, upper, est),
               InvalidArgument);
}

// Group scores (two-level scoring) from the store's coarse summaries: the formulas of the page
// scores over the group's box and mean, and a group's bound covers each of its pages' bounds.
TEST(CpuScoreGroups, FollowTheFormulasAndBoundTheirPages) {
  const ModelShape shape{.layers = 1, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kBFloat16};
  const int P = 16, len = P * (2 * kPagesPerSummaryGroup + 5) + 3;  // two full groups and a partial one
  PagedKVStore store(shape, P, 8 << 20, HostMemoryRequest::kAligned);
  const SeqId s = store.add_sequence();
  std::mt19937 rng(9);
  std::normal_distribution<double> n(0, 1);
  const std::size_t elems = static_cast<std::size_t>(len) * 2 * 64;
  std::vector<std::byte> kb(elems * 2), vb(kb.size());
  for (std::size_t i = 0; i < elems; ++i) {
    store_from_float(kb.data(), i, DType::kBFloat16, static_cast<float>(n(rng)));
    store_from_float(vb.data(), i, DType::kBFloat16, static_cast<float>(n(rng)));
  }
  store.append(s, 0, TensorView::contiguous(kb.data(), DType::kBFloat16, {len, 2, 64}),
               TensorView::contiguous(vb.data(), DType::kBFloat16, {len, 2, 64}));
  const auto pages = store.pages(s, 0);
  const auto groups = store.group_summaries(s, 0);
  const PageLayout& layout = store.layout();
  const int G = 4, ng = summary_groups(static_cast<int>(pages.size()));
  ASSERT_EQ(ng, 3);
  std::vector<float> q(static_cast<std::size_t>(G) * 64);
  for (float& x : q) x = static_cast<float>(n(rng));
  const float scale = 0.125f;
  for (CpuIsa isa : scoring_paths())
  for (int kvh = 0; kvh < 2; ++kvh) {
    SCOPED_TRACE(to_string(isa));
    std::vector<float> gu(ng), ge(ng), pu(pages.size()), pe(pages.size());
    cpu_score_groups(layout, groups, kvh, q, G, scale, len, gu, ge, isa);
    cpu_score_pages(store.pool(), kvh, q, G, scale, pages, len - (static_cast<int>(pages.size()) - 1) * P, pu, pe,
                    isa);
    for (int g = 0; g < ng; ++g) {
      const float* sum = groups.data() + static_cast<std::size_t>(g) * layout.summary_elems();
      double bound = -INFINITY, mean_exp = 0;
      for (int h = 0; h < G; ++h) {
        double b = 0, dm = 0;
        for (int d = 0; d < 64; ++d) {
          const double qd = q[h * 64 + d];
          b += std::max(qd * sum[layout.summary_offset(kvh, 0) + d], qd * sum[layout.summary_offset(kvh, 1) + d]);
          dm += qd * sum[layout.summary_offset(kvh, 2) + d];
        }
        bound = std::max(bound, scale * b);
        mean_exp += std::exp(scale * dm) / G;
      }
      const int tokens = std::min(P * kPagesPerSummaryGroup, len - g * P * kPagesPerSummaryGroup);
      EXPECT_NEAR(gu[g], bound, 1e-4 * (1 + std::abs(bound))) << "group " << g;
      const double est = std::log(static_cast<double>(tokens)) + std::log(mean_exp);
      EXPECT_NEAR(ge[g], est, 1e-4 * (1 + std::abs(est))) << "group " << g;
      for (int i = g * kPagesPerSummaryGroup; i < std::min<int>((g + 1) * kPagesPerSummaryGroup, pages.size()); ++i)
        EXPECT_GE(gu[g] + 1e-4f * (1 + std::abs(gu[g])), pu[i]) << "group " << g << " page " << i;
    }
  }
  std::vector<float> few(1), est(1);
  EXPECT_THROW(cpu_score_groups(layout, groups, 0, q, G, scale, len, few, est), InvalidArgument);
  EXPECT_THROW(cpu_score_groups(layout, groups.first(10), 0, q, G, scale, len, few, est), InvalidArgument);
}

// Two-level selection: top-k of the groups (sink and local groups forced), then the rule over the
// kept groups' pages alone; keeping every group is the one-pass rule.
TEST(SelectTwoLevel, PicksFromTheTopGroupsPagesOnly) {
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0, 1);
  for (int pages : {40, 300, 1000}) {
    const int groups = summary_groups(pages);
    std::vector<float> gu(groups), ge(groups), pu(pages), pe(pages);
    for (auto& x : gu) x = n(rng);
    for (auto& x : ge) x = n(rng);
    for (auto& x : pu) x = n(rng);
    for (auto& x : pe) x = n(rng);
    for (float threshold : {0.0f, 0.9f})
    for (PageRank by : {PageRank::kBound, PageRank::kBlend}) {
      const SegmentRule rule{std::max(3, pages / 20), threshold, 1, by};
      const int sink = 1, local = 3;
      std::vector<std::int32_t> got, one;
      detail::select_two_level(gu, ge, pu, pe, rule, 1e9, sink, local, false, got);
      detail::select_by_rule(pu, pe, rule, sink, local, false, one);
      EXPECT_EQ(got, one) << "every group kept, pages " << pages;

      const double keep = 2.0;
      const int kept_groups = kept_summary_groups(pages, rule.budget_pages, keep, sink, local);
      detail::select_two_level(gu, ge, pu, pe, rule, keep, sink, local, false, got);
      if (kept_groups >= groups) continue;
      // The kept groups: the top of the group ranks (bound or blend), groups 0 and the last two forced.
      std::vector<float> grank = gu;
      if (by == PageRank::kBlend)
        for (int g = 0; g < groups; ++g) grank[g] = ge[g] + kRankBlend * (gu[g] - ge[g]);
      const auto kept = brute_top_k(grank, kept_groups, summary_groups(sink), max_groups_spanned(local), 0, groups);
      std::vector<int> position;
      std::vector<float> cu, ce;
      for (int g : kept)
        for (int i = g * kPagesPerSummaryGroup; i < std::min(pages, (g + 1) * kPagesPerSummaryGroup); ++i) {
          position.push_back(i);
          cu.push_back(pu[i]);
          ce.push_back(pe[i]);
        }
      std::vector<std::int32_t> want;
      detail::select_by_rule(cu, ce, rule, sink, local, false, want);
      for (auto& p : want) p = position[p];
      EXPECT_EQ(got, want) << "pages " << pages << " threshold " << threshold;
      for (int i = 0; i < sink; ++i) EXPECT_TRUE(std::binary_search(got.begin(), got.end(), i)) << "sink " << i;
      for (int i = pages - local; i < pages; ++i) EXPECT_TRUE(std::binary_search(got.begin(), got.end(), i)) << "local " << i;
      for (std::int32_t p : got)
        EXPECT_TRUE(std::binary_search(kept.begin(), kept.end(), p / kPagesPerSummaryGroup)) << "page " << p << " of a pruned group";
      if (threshold == 0.0f) EXPECT_EQ(static_cast<int>(got.size()), rule.budget_pages);
    }
  }
}

}  // namespace
}  // namespace hattn
