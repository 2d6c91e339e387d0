// GPU page scoring against a host evaluation of the same formulas, and GPU selection (top-k and the
// mass rule) against a host brute force of the same rule and against the CPU side's selection.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "cuda_test_support.hpp"
#include "select_brute_force.hpp"
#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"
#include "hattn/kernels/cpu_select.hpp"

namespace hattn::test {
namespace {

struct SelectCase {
  std::vector<int> pages;  // per request
  int kv_heads;
};

enum class Scores { kNormal, kTies, kBunched, kConstant };

void run_select(const SelectCase& c, bool mass, float threshold, std::uint32_t seed, bool with_exclude,
                Scores kind, bool compact = false) {
  const int batch = static_cast<int>(c.pages.size());
  std::vector<std::int32_t> indptr{0};
  for (int n : c.pages) indptr.push_back(indptr.back() + n);
  const std::int64_t total = static_cast<std::int64_t>(indptr.back()) * c.kv_heads;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  // Rank scores (the Quest bound) and log-masses (the mean-key estimate): correlated, not in the
  // same order. kTies rounds the ranks so ties are common; kBunched puts most ranks on two values
  // and a few far away, so a bin of the equal-width histogram overflows and the radix path runs;
  // kConstant ranks every page alike (the selection is then by position alone).
  std::vector<float> scores(total), log_mass(total);
  for (std::int64_t i = 0; i < total; ++i) {
    const float x = normal(rng);
    log_mass[i] = 0.7f * x + 0.5f * normal(rng);
    switch (kind) {
      case Scores::kNormal: scores[i] = x; break;
      case Scores::kTies: scores[i] = std::round(x) + 0.0f; break;  // + 0: no -0, which the GPU ranks below +0
      case Scores::kBunched: scores[i] = i % 97 == 0 ? 1000.0f * x : (x > 0 ? 1.0f + 1e-6f * x : 1.0f); break;
      case Scores::kConstant: scores[i] = 2.5f; break;
    }
  }
  std::vector<std::int32_t> budget, eb, ee;
  for (int b = 0; b < batch; ++b) {
    const int n = c.pages[b];
    eb.push_back(with_exclude ? n / 4 : 0);
    ee.push_back(with_exclude ? n / 2 : 0);
    for (int h = 0; h < c.kv_heads; ++h) budget.push_back(std::max(1, (n * (5 + 10 * h)) / 100));
  }
  cuda::SelectParams p;
  DeviceBuffer<float> d_scores(scores), d_log_mass(log_mass);
  DeviceBuffer<std::int32_t> d_indptr(indptr), d_budget(budget), d_eb(eb), d_ee(ee);
  DeviceBuffer<std::int32_t> d_selected(static_cast<std::size_t>(total)), d_count(static_cast<std::size_t>(batch) * c.kv_heads);
  const std::size_t ws_bytes = cuda::select_workspace_bytes(indptr.back(), c.kv_heads, batch);
  DeviceBuffer<std::byte> ws(ws_bytes);
  p.scores = d_scores.get();
  p.log_mass = mass ? d_log_mass.get() : nullptr;
  p.page_indptr = d_indptr.get();
  p.batch = batch;
  p.kv_heads = c.kv_heads;
  p.budget_pages = d_budget.get();
  p.mass_threshold = mass ? threshold : 0.0f;
  p.sink_pages = 2;
  p.local_pages = 3;
  p.exclude_begin = with_exclude ? d_eb.get() : nullptr;
  p.exclude_end = with_exclude ? d_ee.get() : nullptr;
  p.selected = d_selected.get();
  p.selected_count = d_count.get();
  p.workspace = ws.get();
  // The bound that lets top-k over short segments take the compact kernel.
  if (compact) p.max_entries = *std::max_element(c.pages.begin(), c.pages.end());
  cuda::launch_select_pages(p, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto sel = d_selected.download();
  const auto cnt = d_count.download();
  std::vector<std::int32_t> cpu;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < c.kv_heads; ++h) {
      const int n = c.pages[b];
      const std::int64_t off = static_cast<std::int64_t>(indptr[b]) * c.kv_heads + static_cast<std::int64_t>(h) * n;
      std::vector<float> seg(scores.begin() + off, scores.begin() + off + n);
      std::vector<float> seg_mass(log_mass.begin() + off, log_mass.begin() + off + n);
      const Rule rule{2, 3, eb[b], ee[b]};
      const int k = budget[b * c.kv_heads + h];
      double margin = 1;
      const auto want = mass ? brute_mass(seg, seg_mass, threshold, k, rule, &margin) : brute_top_k(seg, k, rule);
      if (mass && margin < 1e-4) continue;  // fp32 vs double sums may legitimately disagree here
      const int got_n = cnt[b * c.kv_heads + h];
      std::vector<std::int32_t> got(sel.begin() + off, sel.begin() + off + std::max(got_n, 0));
      EXPECT_EQ(got, want) << (compact ? "compact kernel: " : "") << "request " << b << " head " << h << " n " << n
                           << " k " << k;
      if (with_exclude) continue;  // the CPU functions take a range, not a hole
      // The CPU side's own selection of the same scores (sink 2, local 3; the mass cap counts
      // the pages beyond the forced ones, as in the engine).
      if (mass) cpu_select_mass(seg, seg_mass, threshold, k, 2, 3, 0, n, cpu);
      else cpu_select_top_k(seg, k, 2, 3, 0, n, cpu);
      EXPECT_EQ(got, cpu) << "GPU vs CPU: request " << b << " head " << h << " n " << n << " k " << k;
    }
}

TEST(CudaSelect, TopKMatchesBruteForce) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const SelectCase c{{1, 7, 300, 2048, 5000, 8192, 9000}, 3};
  for (bool ex : {false, true})
    for (Scores kind : {Scores::kNormal, Scores::kTies, Scores::kBunched})
      run_select(c, false, 0, 1 + ex + 2 * static_cast<int>(kind), ex, kind);
}

TEST(CudaSelect, CompactTopKMatchesBruteForce) {
  HATTN_REQUIRE_CUDA_DEVICE();
  // Bounds that pick each shape of the kernel: 256 threads of one entry, 1024 threads of 1, 2, 4, 8
  // and 16 entries.
  for (const SelectCase& c : {SelectCase{{1, 100, 256}, 3}, SelectCase{{5, 900, 1024}, 2}, SelectCase{{1500, 2048}, 2},
                              SelectCase{{1, 7, 300, 2048, 4096}, 3}, SelectCase{{6000, 8192}, 1},
                              SelectCase{{1, 5000, 8192, 16384}, 2}})
    for (bool ex : {false, true})
      for (Scores kind : {Scores::kNormal, Scores::kTies, Scores::kBunched, Scores::kConstant})
        run_select(c, false, 0, 31 + ex + 2 * static_cast<int>(kind), ex, kind, /*compact=*/true);
}

TEST(CudaSelect, MassThresholdMatchesBruteForce) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const SelectCase c{{1, 9, 400, 3000, 8192, 9000}, 2};
  for (float t : {0.5f, 0.9f, 0.99f, 1.0f})
    for (bool ex : {false, true})
      for (Scores kind : {Scores::kNormal, Scores::kTies, Scores::kBunched})
        run_select(c, true, t, 17 + ex + 2 * static_cast<int>(kind), ex, kind);
}

TEST(CudaSelect, MassRuleKeepsANeedleThatTheEstimateRanksLow) {
  HATTN_REQUIRE_CUDA_DEVICE();
  // Page 40 of 64: the highest bound, a low estimate (a short needle diluted by its page's mean key).
  std::vector<float> bound(64, 0.0f), estimate(64, 0.0f);
  for (int i = 0; i < 64; ++i) {
    bound[i] = 0.01f * static_cast<float>(i % 7);
    estimate[i] = i == 10 ? 6.0f : 0.0f;
  }
  bound[10] = 1.0f;
  bound[40] = 5.0f;
  estimate[40] = -1.0f;
  DeviceBuffer<float> d_bound(bound), d_est(estimate);
  DeviceBuffer<std::int32_t> d_indptr(std::vector<std::int32_t>{0, 64}), d_budget(std::vector<std::int32_t>{64});
  DeviceBuffer<std::int32_t> d_selected(64), d_count(1);
  cuda::SelectParams p;
  p.scores = d_bound.get();
  p.log_mass = d_est.get();
  p.page_indptr = d_indptr.get();
  p.batch = 1;
  p.kv_heads = 1;
  p.budget_pages = d_budget.get();
  p.mass_threshold = 0.5f;
  p.sink_pages = 0;
  p.local_pages = 0;
  p.selected = d_selected.get();
  p.selected_count = d_count.get();
  cuda::launch_select_pages(p, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto sel = d_selected.download();
  const int got_n = d_count.download()[0];
  // Page 40 first (its bound), then page 10, whose estimated mass e^6 is over half of the total.
  EXPECT_EQ(std::vector<std::int32_t>(sel.begin(), sel.begin() + std::max(got_n, 0)),
            (std::vector<std::int32_t>{10, 40}));
}

TEST(CudaSelect, MillionTokenSegmentNeedsOnlyACountPerSegment) {
  HATTN_REQUIRE_CUDA_DEVICE();
  // 1M tokens of 16-token pages: 65536 pages per segment; selection memory stays O(pages), and the
  // workspace is one count per (request, KV head) segment at any length.
  EXPECT_EQ(cuda::select_workspace_bytes(65536, 8, 1), 8 * sizeof(std::uint32_t));
  EXPECT_EQ(cuda::select_workspace_bytes(1 << 20, 8, 1), 8 * sizeof(std::uint32_t));
  run_select(SelectCase{{65536}, 2}, false, 0, 5, false, Scores::kNormal);
  run_select(SelectCase{{65536}, 2}, true, 0.8f, 6, true, Scores::kNormal);
  run_select(SelectCase{{65536}, 2}, true, 0.8f, 7, false, Scores::kTies);
  run_select(SelectCase{{65536}, 1}, false, 0, 8, false, Scores::kBunched);
}

// ---- scoring
struct ScoreCase {
  DType dtype;
  int dim, page_size, group;
};

class CudaScore : public ::testing::TestWithParam<ScoreCase> {};

TEST_P(CudaScore, MatchesHostEvaluationOfSummaries) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const auto c = GetParam();
  const ModelShape shape{1, 2 * c.group, 2, c.dim, c.dtype};
  StructuredLayer layer(shape, c.page_size, {c.page_size * 30 + 5, c.page_size * 3, 2}, 42u);
  const PageLayout& lay = layer.store.layout();
  const int batch = 3, kvh = 2, qh = shape.q_heads;
  std::vector<std::int32_t> page_table, indptr{0}, seq_len;
  std::vector<float> q;
  for (int b = 0; b < batch; ++b) {
    auto pages = layer.store.pages(layer.seqs[b], 0);
    page_table.insert(page_table.end(), pages.begin(), pages.end());
    indptr.push_back(static_cast<std::int32_t>(page_table.size()));
    seq_len.push_back(static_cast<std::int32_t>(layer.length(b)));
    q.insert(q.end(), layer.queries[b].begin(), layer.queries[b].end());
  }
  const std::size_t summary_bytes = static_cast<std::size_t>(layer.store.pool().capacity_pages()) * lay.summary_bytes();
  std::vector<std::byte> summaries(layer.store.pool().summaries_base(),
                                   layer.store.pool().summaries_base() + summary_bytes);
  DeviceBuffer<std::byte> d_sum(summaries);
  DeviceBuffer<float> d_q(q);
  DeviceBuffer<std::int32_t> d_pt(page_table), d_ip(indptr), d_len(seq_len);
  const std::size_t total = page_table.size() * kvh;
  DeviceBuffer<float> up(total), est(total);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.dim));
  cuda::ScoreParams p;
  p.q = d_q.get();
  p.summaries = d_sum.get();
  p.page_table = d_pt.get();
  p.page_indptr = d_ip.get();
  p.seq_len = d_len.get();
  p.batch = batch;
  p.q_heads = qh;
  p.kv_heads = kvh;
  p.head_dim = c.dim;
  p.page_size = c.page_size;
  p.dtype = c.dtype;
  p.scale = scale;
  p.upper = up.get();
  p.estimate = est.get();
  cuda::launch_score_pages(p, nullptr);
  // Again with every other segment ranking by the blend, written over its bound.
  std::vector<std::int32_t> blended(static_cast<std::size_t>(batch) * kvh);
  for (std::size_t seg = 0; seg < blended.size(); ++seg) blended[seg] = seg % 2;
  DeviceBuffer<std::int32_t> d_blended(blended);
  DeviceBuffer<float> rank(total), est2(total);
  cuda::ScoreParams pb = p;
  pb.upper = rank.get();
  pb.estimate = est2.get();
  pb.blended = d_blended.get();
  pb.blend = 0.1f;
  cuda::launch_score_pages(pb, nullptr);
  // Each row set alone (the top-k step skips the mean row; an estimate-only rank skips min/max):
  // the same arithmetic, so the same bits.
  DeviceBuffer<float> up_only(total), est_only(total);
  cuda::ScoreParams pu = p, pe = p;
  pu.upper = up_only.get();
  pu.estimate = nullptr;
  pe.upper = nullptr;
  pe.estimate = est_only.get();
  cuda::launch_score_pages(pu, nullptr);
  cuda::launch_score_pages(pe, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got_up = up.download(), got_est = est.download(), got_rank = rank.download();
  EXPECT_EQ(up_only.download(), got_up);
  EXPECT_EQ(est_only.download(), got_est);
  for (int b = 0; b < batch; ++b) {
    const int n = indptr[b + 1] - indptr[b];
    for (int h = 0; h < kvh; ++h)
      for (int i = 0; i < n; ++i) {
        const std::byte* s = layer.store.pool().summary(page_table[indptr[b] + i]);
        double best = -INFINITY, mean_exp = 0;
        for (int g = 0; g < c.group; ++g) {
          const float* qq = &q[(static_cast<std::size_t>(b) * qh + h * c.group + g) * c.dim];
          double u = 0, dot = 0;
          for (int d = 0; d < c.dim; ++d) {
            const double lo = load_as_float(s, lay.summary_offset(h, 0) + d, c.dtype);
            const double hi = load_as_float(s, lay.summary_offset(h, 1) + d, c.dtype);
            const double mean = load_as_float(s, lay.summary_offset(h, 2) + d, c.dtype);
            u += std::max(qq[d] * lo, qq[d] * hi);
            dot += qq[d] * mean;
          }
          best = std::max(best, scale * u);
          mean_exp += std::exp(scale * dot) / c.group;
        }
        const int tokens = std::min<int>(c.page_size, seq_len[b] - i * c.page_size);
        const double want_est = std::log(static_cast<double>(tokens)) + std::log(mean_exp);
        const std::size_t at = static_cast<std::size_t>(indptr[b]) * kvh + static_cast<std::size_t>(h) * n + i;
        // fp32 sums of head_dim products of unit-scale values: ~1e-5 relative.
        EXPECT_NEAR(got_up[at], best, 1e-3 * std::max(1.0, std::abs(best))) << "b " << b << " h " << h << " i " << i;
        EXPECT_NEAR(got_est[at], want_est, 1e-3 * std::max(1.0, std::abs(want_est)))
            << "b " << b << " h " << h << " i " << i;
        const double want_rank = blended[b * kvh + h] ? want_est + 0.1 * (best - want_est) : best;
        EXPECT_NEAR(got_rank[at], want_rank, 1e-3 * std::max(1.0, std::abs(want_rank)))
            << "blended: b " << b << " h " << h << " i " << i;
      }
  }
}

INSTANTIATE_TEST_SUITE_P(DtypeDimPageGroup, CudaScore,
                         ::testing::Values(ScoreCase{DType::kBFloat16, 128, 16, 4}, ScoreCase{DType::kFloat16, 64, 32, 1},
                                           ScoreCase{DType::kBFloat16, 256, 64, 8}, ScoreCase{DType::kFloat16, 128, 16, 8},
                                           ScoreCase{DType::kBFloat16, 64, 16, 3}),
                         [](const auto& info) {
                           const ScoreCase& c = info.param;
                           return std::string(to_string(c.dtype)) + "_d" + std::to_string(c.dim) + "_p" +
                                  std::to_string(c.page_size) + "_g" + std::to_string(c.group);
                         });

TEST(CudaScore, RejectsUnsupportedValues) {
  cuda::ScoreParams p;
  p.batch = 1;
  p.q_heads = 4;
  p.kv_heads = 3;
  p.page_size = 16;
  EXPECT_THROW(cuda::launch_score_pages(p, nullptr), InvalidArgument);
  // The blend needs both the bound and the estimate (checked before any device call).
  p.kv_heads = 2;
  const std::int32_t ints[2] = {0, 1};
  const float floats[8] = {};
  float out[2] = {};
  p.q = floats;
  p.summaries = floats;
  p.page_table = p.page_indptr = p.seq_len = p.blended = ints;
  p.upper = out;
  try {
    cuda::launch_score_pages(p, nullptr);
    ADD_FAILURE() << "a blend without an estimate was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("blended"), std::string::npos) << e.what();
  }
  cuda::SelectParams s;
  s.batch = 1;
  s.kv_heads = 1;
  s.mass_threshold = 1.5f;
  EXPECT_THROW(cuda::launch_select_pages(s, nullptr), InvalidArgument);
}

}  // namespace
}  // namespace hattn::test
