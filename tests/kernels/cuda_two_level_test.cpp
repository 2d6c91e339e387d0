// Two-level scoring and selection on the GPU: group summaries rebuilt on the device against the host's
// compute_group_summary, the coarse pass against the fine one (a group's bound covers its pages'),
// the pruned pipeline against a host evaluation of the same rule, keeping every group against the
// one-level pipeline, and a planted needle found through the coarse level.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "cuda_test_support.hpp"
#include "select_brute_force.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"
#include "hattn/kernels/cuda_two_level.hpp"
#include "hattn/kv/page_summary.hpp"

namespace hattn::test {
namespace {

constexpr int kGroup = kPagesPerSummaryGroup;

/// A batch of a PagedKVStore's sequences on the device: fine summaries, page and group tables, the
/// queries, and the buffers of both passes. Group ids are assigned densely in request order.
struct Batch {
  const PagedKVStore& store;
  int batch, kv_heads, q_heads, dim, page_size;
  DType dtype;
  std::vector<std::int32_t> page_table, indptr{0}, seq_len, group_table, group_indptr{0};
  std::vector<float> q;
  DeviceBuffer<std::byte> d_summaries;
  DeviceBuffer<float> d_q;
  DeviceBuffer<std::int32_t> d_pt, d_ip, d_len, d_gt, d_gip;
  DeviceBuffer<float> d_groups;  // fp32 group summaries

  Batch(const PagedKVStore& s, const std::vector<SeqId>& seqs, const std::vector<std::vector<float>>& queries)
      : store(s),
        batch(static_cast<int>(seqs.size())),
        kv_heads(s.layout().kv_heads),
        q_heads(static_cast<int>(queries[0].size()) / s.layout().head_dim),
        dim(s.layout().head_dim),
        page_size(s.layout().page_size),
        dtype(s.layout().dtype),
        d_summaries(host_summaries(s)),
        d_q(flatten(queries)),
        d_pt(tables(s, seqs)),
        d_ip(indptr),
        d_len(seq_len),
        d_gt(group_table),
        d_gip(group_indptr),
        d_groups(static_cast<std::size_t>(group_table.size()) * s.layout().summary_elems()) {
    q = flatten(queries);
  }

  int pages(int b) const { return indptr[b + 1] - indptr[b]; }
  int groups(int b) const { return group_indptr[b + 1] - group_indptr[b]; }

  cuda::GroupSummaryParams group_params() const {
    cuda::GroupSummaryParams p;
    p.summaries = d_summaries.get();
    p.page_table = d_pt.get();
    p.page_indptr = d_ip.get();
    p.seq_len = d_len.get();
    p.group_table = d_gt.get();
    p.group_indptr = d_gip.get();
    p.batch = batch;
    p.kv_heads = kv_heads;
    p.head_dim = dim;
    p.page_size = page_size;
    p.dtype = dtype;
    p.group_summaries = d_groups.get();
    return p;
  }

  cuda::ScoreParams fine_params(float* upper, float* estimate) const {
    cuda::ScoreParams p;
    p.q = d_q.get();
    p.summaries = d_summaries.get();
    p.page_table = d_pt.get();
    p.page_indptr = d_ip.get();
    p.seq_len = d_len.get();
    p.batch = batch;
    p.q_heads = q_heads;
    p.kv_heads = kv_heads;
    p.head_dim = dim;
    p.page_size = page_size;
    p.dtype = dtype;
    p.scale = 1.0f / std::sqrt(static_cast<float>(dim));
    p.upper = upper;
    p.estimate = estimate;
    return p;
  }

  /// The coarse pass: the same launch over the group summaries.
  cuda::ScoreParams coarse_params(float* upper, float* estimate) const {
    cuda::ScoreParams p = fine_params(upper, estimate);
    p.summaries = d_groups.get();
    p.dtype = DType::kFloat32;
    p.page_table = d_gt.get();
    p.page_indptr = d_gip.get();
    p.page_size = page_size * kGroup;
    return p;
  }

 private:
  std::vector<std::byte> host_summaries(const PagedKVStore& s) {
    const auto* base = s.pool().summaries_base();
    return {base, base + static_cast<std::size_t>(s.pool().capacity_pages()) * s.layout().summary_bytes()};
  }
  static std::vector<float> flatten(const std::vector<std::vector<float>>& x) {
    std::vector<float> out;
    for (const auto& v : x) out.insert(out.end(), v.begin(), v.end());
    return out;
  }
  std::vector<std::int32_t> tables(const PagedKVStore& s, const std::vector<SeqId>& seqs) {
    for (SeqId id : seqs) {
      const auto pages = s.pages(id, 0);
      page_table.insert(page_table.end(), pages.begin(), pages.end());
      indptr.push_back(static_cast<std::int32_t>(page_table.size()));
      seq_len.push_back(static_cast<std::int32_t>(s.length(id, 0)));
      const int g = summary_groups(static_cast<int>(pages.size()));
      for (int i = 0; i < g; ++i) group_table.push_back(static_cast<std::int32_t>(group_table.size()));
      group_indptr.push_back(static_cast<std::int32_t>(group_table.size()));
    }
    return page_table;
  }
};

/// The whole pruned pipeline: group summaries, coarse scores, group selection (keep_groups per
/// segment plus the sink and local groups), fine scores of the kept groups, selection of k pages.
struct TwoLevelRun {
  std::vector<float> coarse_upper, cand_upper;
  std::vector<std::int32_t> kept, kept_count, position_of, selected, selected_count;
  int candidates = 0;
};

/// Exclusion ranges of pages per request (the CPU side's share), or none.
struct Exclusion {
  std::vector<std::int32_t> begin, end;
};

/// How both levels rank and select: top-k or the mass rule; odd segments ranked by the blend.
struct Ranking {
  float mass_threshold = 0.0f;
  bool blend_odd_segments = false;
  bool compact = false;  // top-k over the candidates by the compact kernel (SelectParams::max_entries)
  bool fused = false;    // top-k by launch_select_two_level's fused kernel (needs compact's bounds)
};

constexpr float kBlend = 0.1f;

std::vector<std::int32_t> odd_segments(const Batch& x) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(x.batch) * x.kv_heads);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = i % 2;
  return v;
}

/// Odd segments rank by the blend where `rank` says so (`blended` from odd_segments, on the device).
void apply_blend(cuda::ScoreParams& p, const Ranking& rank, const DeviceBuffer<std::int32_t>& blended) {
  if (!rank.blend_odd_segments) return;
  p.blended = blended.get();
  p.blend = kBlend;
}

/// The page selection of a batch, both passes' last step: k pages per segment (top-k, or the mass
/// rule's cap), sink and local pages, an optional CPU share, and the buffers it writes.
struct PageSelection {
  DeviceBuffer<std::int32_t> budget, exclude_begin, exclude_end, selected, count;
  cuda::SelectParams params;

  PageSelection(const Batch& x, const float* upper, const float* estimate, int k, int sink_pages, int local_pages,
                const Exclusion& ex, const Ranking& rank)
      : budget(std::vector<std::int32_t>(x.batch * x.kv_heads, k)),
        exclude_begin(ex.begin),
        exclude_end(ex.end),
        selected(x.page_table.size() * x.kv_heads),
        count(static_cast<std::size_t>(x.batch) * x.kv_heads) {
    params.scores = upper;
    params.log_mass = estimate;
    params.mass_threshold = rank.mass_threshold;
    params.exclude_begin = ex.begin.empty() ? nullptr : exclude_begin.get();
    params.exclude_end = ex.end.empty() ? nullptr : exclude_end.get();
    params.page_indptr = x.d_ip.get();
    params.batch = x.batch;
    params.kv_heads = x.kv_heads;
    params.budget_pages = budget.get();
    params.sink_pages = sink_pages;
    params.local_pages = local_pages;
    params.selected = selected.get();
    params.selected_count = count.get();
  }
};

TwoLevelRun run_two_level(Batch& x, int keep_groups, int k, int sink_pages, int local_pages, const Exclusion& ex = {},
                          const Ranking& rank = {}) {
  const std::size_t total_groups = x.group_table.size() * x.kv_heads;
  DeviceBuffer<std::int32_t> blended(odd_segments(x));
  DeviceBuffer<float> c_up(total_groups), c_est(total_groups);
  const int sink_groups = summary_groups(sink_pages);
  const int local_groups = max_groups_spanned(local_pages);
  DeviceBuffer<std::int32_t> g_budget(std::vector<std::int32_t>(x.batch * x.kv_heads, keep_groups + sink_groups + local_groups));
  DeviceBuffer<std::int32_t> d_kept(total_groups), d_kept_count(static_cast<std::size_t>(x.batch) * x.kv_heads);

  TwoLevelRun r;
  r.candidates = (keep_groups + sink_groups + local_groups) * kGroup;
  const std::size_t entries = static_cast<std::size_t>(x.batch) * x.kv_heads * r.candidates;
  DeviceBuffer<float> f_up(entries), f_est(entries);
  DeviceBuffer<std::int32_t> d_pos(entries);
  cuda::TwoLevelScoreParams t;
  t.pages = x.fine_params(f_up.get(), f_est.get());
  apply_blend(t.pages, rank, blended);
  t.pages.inputs_ready = true;  // uploaded before the chain: the engine's early reads, exercised here
  t.group_table = x.d_gt.get();
  t.group_indptr = x.d_gip.get();
  t.group_summaries = x.d_groups.get();
  t.group_upper = c_up.get();
  t.group_estimate = c_est.get();
  t.group_budget = g_budget.get();
  t.sink_pages = sink_pages;
  t.local_pages = local_pages;
  t.kept = d_kept.get();
  t.kept_count = d_kept_count.get();
  t.candidates = r.candidates;
  t.position_of = d_pos.get();
  PageSelection sel(x, f_up.get(), f_est.get(), k, sink_pages, local_pages, ex, rank);
  sel.params.max_entries = rank.compact ? r.candidates : 0;
  sel.params.inputs_ready = true;
  sel.params.position_of = d_pos.get();
  sel.params.candidates = r.candidates;
  if (rank.fused) {
    for (int b = 0; b < x.batch; ++b) t.max_groups = std::max(t.max_groups, x.groups(b));
    const std::size_t ws = cuda::select_workspace_bytes(static_cast<std::int64_t>(x.page_table.size()), x.kv_heads, x.batch);
    DeviceBuffer<std::byte> workspace(std::vector<std::byte>(ws, std::byte{0}));
    sel.params.workspace = workspace.get();
    // Twice: the second launch finds the arrival counts the first left at zero, and writes the same.
    cuda::launch_select_two_level(t, sel.params, nullptr);
    cuda::launch_select_two_level(t, sel.params, nullptr);
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    for (std::byte c : workspace.download()) EXPECT_EQ(c, std::byte{0}) << "arrival counts left set";
  } else {
    cuda::launch_score_two_level(t, nullptr);
    cuda::launch_select_pages(sel.params, nullptr);
  }
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  r.coarse_upper = c_up.download();
  r.cand_upper = f_up.download();
  r.kept = d_kept.download();
  r.kept_count = d_kept_count.download();
  r.position_of = d_pos.download();
  r.selected = sel.selected.download();
  r.selected_count = sel.count.download();
  return r;
}

/// One-level scores (bound and estimate) and selection of the same batch.
struct OneLevelRun {
  std::vector<float> upper, estimate;
  std::vector<std::int32_t> selected, selected_count;
};

OneLevelRun run_one_level(Batch& x, int k, int sink_pages, int local_pages, const Exclusion& ex = {},
                          const Ranking& rank = {}) {
  const std::size_t total = x.page_table.size() * x.kv_heads;
  DeviceBuffer<float> up(total), est(total);
  DeviceBuffer<std::int32_t> blended(odd_segments(x));
  cuda::ScoreParams sp = x.fine_params(up.get(), est.get());
  apply_blend(sp, rank, blended);
  cuda::launch_score_pages(sp, nullptr);
  PageSelection sel(x, up.get(), est.get(), k, sink_pages, local_pages, ex, rank);
  cuda::launch_select_pages(sel.params, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  return {up.download(), est.download(), sel.selected.download(), sel.count.download()};
}

std::vector<std::int32_t> segment(const std::vector<std::int32_t>& all, std::size_t offset, int count) {
  return {all.begin() + static_cast<std::ptrdiff_t>(offset), all.begin() + static_cast<std::ptrdiff_t>(offset) + std::max(count, 0)};
}

struct Shape {
  DType dtype;
  int dim, page_size, group;
};

class CudaTwoLevel : public ::testing::TestWithParam<Shape> {};

TEST_P(CudaTwoLevel, GroupSummariesMatchTheHostAndBoundTheirPages) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const Shape c = GetParam();
  const ModelShape shape{1, 2 * c.group, 2, c.dim, c.dtype};
  // 49 pages (a partial last group and a partial last page), exactly one group, one short page.
  StructuredLayer layer(shape, c.page_size, {c.page_size * 48 + 5, c.page_size * kGroup, 2}, 7u);
  Batch x(layer.store, layer.seqs, layer.queries);
  cuda::launch_build_group_summaries(x.group_params(), nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto got = x.d_groups.download();
  const PageLayout& lay = layer.store.layout();
  const std::size_t elems = lay.summary_elems();
  for (int b = 0; b < x.batch; ++b)
    for (int g = 0; g < x.groups(b); ++g) {
      std::vector<const std::byte*> sums;
      std::vector<int> tokens;
      for (int i = g * kGroup; i < std::min((g + 1) * kGroup, x.pages(b)); ++i) {
        sums.push_back(layer.store.pool().summary(x.page_table[x.indptr[b] + i]));
        tokens.push_back(std::min(c.page_size, x.seq_len[b] - i * c.page_size));
      }
      std::vector<float> want(elems);
      compute_group_summary(lay, sums, tokens, want.data());
      const float* have = got.data() + static_cast<std::size_t>(x.group_table[x.group_indptr[b] + g]) * elems;
      for (int h = 0; h < x.kv_heads; ++h)
        for (int d = 0; d < c.dim; ++d) {
          EXPECT_EQ(have[lay.summary_offset(h, 0) + d], want[lay.summary_offset(h, 0) + d]) << "min b" << b << " g" << g;
          EXPECT_EQ(have[lay.summary_offset(h, 1) + d], want[lay.summary_offset(h, 1) + d]) << "max b" << b << " g" << g;
          const float m = want[lay.summary_offset(h, 2) + d];
          EXPECT_NEAR(have[lay.summary_offset(h, 2) + d], m, 1e-6f * std::max(1.0f, std::abs(m))) << "mean b" << b;
        }
    }

  // Rebuilding only from first_group leaves the earlier groups alone.
  DeviceBuffer<float> fresh(x.d_groups.size());  // NaN-filled
  DeviceBuffer<std::int32_t> first(std::vector<std::int32_t>{x.groups(0) - 1, 0, 1});
  cuda::GroupSummaryParams gp = x.group_params();
  gp.group_summaries = fresh.get();
  gp.first_group = first.get();
  cuda::launch_build_group_summaries(gp, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto partial = fresh.download();
  for (int b = 0; b < x.batch; ++b)
    for (int g = 0; g < x.groups(b); ++g) {
      const std::size_t at = static_cast<std::size_t>(x.group_table[x.group_indptr[b] + g]) * elems;
      const bool rebuilt = g >= std::vector<int>{x.groups(0) - 1, 0, 1}[b];
      EXPECT_EQ(std::isnan(partial[at]), !rebuilt) << "b " << b << " g " << g;
      if (rebuilt) EXPECT_EQ(partial[at], got[at]);
    }

  // The coarse bound of a group is at least the bound of each of its pages (Quest's bound over the
  // union of the pages' boxes), up to fp32 summation order.
  DeviceBuffer<float> c_up(x.group_table.size() * x.kv_heads), f_up(x.page_table.size() * x.kv_heads);
  cuda::launch_score_pages(x.coarse_params(c_up.get(), nullptr), nullptr);
  cuda::launch_score_pages(x.fine_params(f_up.get(), nullptr), nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto cu = c_up.download(), fu = f_up.download();
  for (int b = 0; b < x.batch; ++b)
    for (int h = 0; h < x.kv_heads; ++h)
      for (int i = 0; i < x.pages(b); ++i) {
        const float page = fu[static_cast<std::size_t>(x.indptr[b]) * x.kv_heads + h * x.pages(b) + i];
        const float group = cu[static_cast<std::size_t>(x.group_indptr[b]) * x.kv_heads + h * x.groups(b) + i / kGroup];
        EXPECT_GE(group, page - 1e-4f * std::max(1.0f, std::abs(page))) << "b " << b << " h " << h << " page " << i;
      }
}

TEST_P(CudaTwoLevel, KeepingEveryGroupSelectsWhatOnePassSelects) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const Shape c = GetParam();
  const ModelShape shape{1, 2 * c.group, 2, c.dim, c.dtype};
  StructuredLayer layer(shape, c.page_size, {c.page_size * 300 + 3, c.page_size * 40, c.page_size * 5 + 1}, 11u);
  Batch x(layer.store, layer.seqs, layer.queries);
  const int all_groups = summary_groups(301);
  // Without and with a CPU share: pages [n / 4, n / 2) of each request excluded.
  const Exclusion cpu_share{{75, 10, 1}, {150, 20, 3}};
  // Top-k (the compact kernel over the candidates) and the mass rule (the general kernel's candidate
  // mode), each with and without the blend and a CPU share.
  for (const Ranking rank : {Ranking{}, Ranking{0.0f, true}, Ranking{0.0f, true, true}, Ranking{0.0f, false, true, true},
                             Ranking{0.0f, true, true, true}, Ranking{0.9f, false}, Ranking{0.9f, true}})
  for (const Exclusion& ex : {Exclusion{}, cpu_share}) {
    const int k = 15;
    const auto one = run_one_level(x, k, 2, 3, ex, rank);
    const auto two = run_two_level(x, all_groups, k, 2, 3, ex, rank);
    for (int b = 0; b < x.batch; ++b)
      for (int h = 0; h < x.kv_heads; ++h) {
        const int s = b * x.kv_heads + h;
        const std::size_t off = static_cast<std::size_t>(x.indptr[b]) * x.kv_heads + static_cast<std::size_t>(h) * x.pages(b);
        EXPECT_EQ(two.kept_count[s], x.groups(b));
        if (rank.mass_threshold > 0) {
          // Mass sums in fp32 with atomics: a segment within rounding of the threshold may differ.
          const std::vector<float> r(one.upper.begin() + off, one.upper.begin() + off + x.pages(b));
          const std::vector<float> m(one.estimate.begin() + off, one.estimate.begin() + off + x.pages(b));
          double margin = 1;
          const Rule rule{2, 3, ex.begin.empty() ? 0 : ex.begin[b], ex.end.empty() ? 0 : ex.end[b]};
          brute_mass(r, m, rank.mass_threshold, k, rule, &margin);
          if (margin < 1e-4) continue;
        }
        EXPECT_EQ(segment(two.selected, off, two.selected_count[s]), segment(one.selected, off, one.selected_count[s]))
            << (ex.begin.empty() ? "" : "with exclusion, ") << "mass " << rank.mass_threshold << ", blend "
            << rank.blend_odd_segments << ", fused " << rank.fused << ": b " << b << " h " << h;
        // Candidates are the segment's pages in order, scored with the same bits; then padding.
        for (int j = 0; j < two.candidates; ++j) {
          const std::size_t at = static_cast<std::size_t>(s) * two.candidates + j;
          if (j < x.pages(b)) {
            ASSERT_EQ(two.position_of[at], j);
            EXPECT_EQ(two.cand_upper[at], one.upper[off + j]);
          } else {
            ASSERT_EQ(two.position_of[at], -1);
            EXPECT_EQ(two.cand_upper[at], -INFINITY);
          }
        }
      }
  }
}

TEST_P(CudaTwoLevel, PrunedSelectionFollowsTheTwoLevelRule) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const Shape c = GetParam();
  const ModelShape shape{1, 2 * c.group, 2, c.dim, c.dtype};
  StructuredLayer layer(shape, c.page_size, {c.page_size * 700 + 9, c.page_size * 200, c.page_size * 33}, 23u);
  Batch x(layer.store, layer.seqs, layer.queries);
  const int keep = 5, k = 30, sink = 1, local = 4;
  // Ranked by the bound, and with odd segments ranked by the blend at both levels.
  for (const Ranking rank : {Ranking{}, Ranking{0.0f, true}, Ranking{0.0f, false, true}, Ranking{0.0f, false, true, true},
                             Ranking{0.0f, true, true, true}}) {
  const auto one = run_one_level(x, k, sink, local, {}, rank);
  const auto two = run_two_level(x, keep, k, sink, local, {}, rank);
  std::vector<std::int32_t> cpu;
  for (int b = 0; b < x.batch; ++b)
    for (int h = 0; h < x.kv_heads; ++h) {
      const int s = b * x.kv_heads + h, n = x.pages(b), groups = x.groups(b);
      // Level 1: the CPU's top-k of the same coarse scores, with the sink and local groups forced.
      const std::size_t goff = static_cast<std::size_t>(x.group_indptr[b]) * x.kv_heads + static_cast<std::size_t>(h) * groups;
      const std::vector<float> coarse(two.coarse_upper.begin() + goff, two.coarse_upper.begin() + goff + groups);
      const int sink_g = summary_groups(sink), local_g = max_groups_spanned(local);
      cpu_select_top_k(coarse, keep + sink_g + local_g, sink_g, local_g, 0, groups, cpu);
      const auto kept = segment(two.kept, goff, two.kept_count[s]);
      ASSERT_EQ(kept, cpu) << "kept groups, b " << b << " h " << h << ", fused " << rank.fused;
      // Level 2: the k best pages of the kept groups by their fine bound (one-level scores), the
      // sink and local pages forced.
      const std::size_t off = static_cast<std::size_t>(x.indptr[b]) * x.kv_heads + static_cast<std::size_t>(h) * n;
      std::vector<int> ranked, forced;
      for (int g : kept)
        for (int i = g * kGroup; i < std::min((g + 1) * kGroup, n); ++i) (i < sink || i >= n - local ? forced : ranked).push_back(i);
      ASSERT_EQ(static_cast<int>(forced.size()), std::min(n, sink + local)) << "every forced page is a candidate";
      std::stable_sort(ranked.begin(), ranked.end(), [&](int a, int bb) { return one.upper[off + a] > one.upper[off + bb]; });
      ranked.resize(std::min<std::size_t>(ranked.size(), static_cast<std::size_t>(std::max(0, k - static_cast<int>(forced.size()))))); 
      std::vector<std::int32_t> want(forced.begin(), forced.end());
      want.insert(want.end(), ranked.begin(), ranked.end());
      std::sort(want.begin(), want.end());
      EXPECT_EQ(segment(two.selected, off, two.selected_count[s]), want) << "b " << b << " h " << h << ", fused " << rank.fused;
      // Candidates carry the one-level bits at their positions.
      for (int j = 0; j < two.candidates; ++j) {
        const std::size_t at = static_cast<std::size_t>(s) * two.candidates + j;
        const int pos = two.position_of[at];
        if (pos >= 0) EXPECT_EQ(two.cand_upper[at], one.upper[off + pos]) << "candidate " << j;
      }
    }
  }
}

// The mass rule over more candidates than the general kernel stages in shared memory (8192): they are
// read from global memory, and every group kept still selects what one pass selects.
TEST(CudaTwoLevelMass, ManyCandidatesFromGlobalMemory) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const ModelShape shape{1, 8, 2, 64, DType::kBFloat16};
  StructuredLayer layer(shape, 16, {16 * 9000 + 5}, 29u);
  Batch x(layer.store, layer.seqs, layer.queries);
  const int k = 450, groups = summary_groups(x.pages(0));
  const Ranking rank{0.9f, true};
  const auto one = run_one_level(x, k, 1, 2, {}, rank);
  const auto two = run_two_level(x, groups, k, 1, 2, {}, rank);
  ASSERT_GT(two.candidates, 8192);
  for (int h = 0; h < x.kv_heads; ++h) {
    const std::size_t off = static_cast<std::size_t>(h) * x.pages(0);
    const std::vector<float> r(one.upper.begin() + off, one.upper.begin() + off + x.pages(0));
    const std::vector<float> m(one.estimate.begin() + off, one.estimate.begin() + off + x.pages(0));
    double margin = 1;
    brute_mass(r, m, rank.mass_threshold, k, Rule{1, 2, 0, 0}, &margin);
    if (margin < 1e-4) continue;  // within rounding of the threshold
    EXPECT_EQ(segment(two.selected, off, two.selected_count[h]), segment(one.selected, off, one.selected_count[h]))
        << "head " << h;
  }
}

INSTANTIATE_TEST_SUITE_P(DtypeDimPageGroup, CudaTwoLevel,
                         ::testing::Values(Shape{DType::kBFloat16, 128, 16, 4}, Shape{DType::kFloat16, 64, 32, 1},
                                           Shape{DType::kBFloat16, 256, 64, 8}, Shape{DType::kFloat16, 128, 16, 7}),
                         [](const auto& info) {
                           const Shape& c = info.param;
                           return std::string(to_string(c.dtype)) + "_d" + std::to_string(c.dim) + "_p" +
                                  std::to_string(c.page_size) + "_g" + std::to_string(c.group);
                         });

// A retrieval head: noise keys, a few needle tokens aligned with the query far from the sinks and
// the local window (each needle's logit ~11 above the noise, most of the head's attention). Pruned to
// a fifth of the groups, the selection still holds every needle page. A needle much weaker than its
// group's noise envelope (a 256-token box) can be pruned: why the kept share is a knob and quality is
// measured on the head zoo, not here.
TEST(CudaTwoLevelNeedles, PrunedSelectionKeepsPlantedNeedles) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const int dim = 128, kvh = 2, group = 4, ps = 16;
  const std::int64_t len = 32768;
  const ModelShape shape{1, kvh * group, kvh, dim, DType::kBFloat16};
  const PageLayout lay{ps, kvh, dim, DType::kBFloat16};
  const int pages = static_cast<int>(len / ps);
  PagedKVStore store(shape, ps, static_cast<std::size_t>(pages + 1) * (lay.page_bytes() + lay.summary_bytes()));
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(kvh) * group * dim);
  for (auto& v : q) v = normal(rng);
  const std::vector<std::int64_t> needles{3001, 9000, 17777, 25000};
  std::vector<float> k(static_cast<std::size_t>(len) * kvh * dim), v(k.size());
  for (std::int64_t t = 0; t < len; ++t)
    for (int h = 0; h < kvh; ++h) {
      float* kr = &k[(static_cast<std::size_t>(t) * kvh + h) * dim];
      const bool needle = std::find(needles.begin(), needles.end(), t) != needles.end();
      for (int d = 0; d < dim; ++d) {
        kr[d] = 0.5f * normal(rng) + (needle ? q[static_cast<std::size_t>(h * group) * dim + d] : 0.0f);
        v[(static_cast<std::size_t>(t) * kvh + h) * dim + d] = normal(rng);
      }
    }
  std::vector<std::byte> kb(k.size() * 2), vb(v.size() * 2);
  for (std::size_t i = 0; i < k.size(); ++i) {
    store_from_float(kb.data(), i, DType::kBFloat16, k[i]);
    store_from_float(vb.data(), i, DType::kBFloat16, v[i]);
  }
  const SeqId id = store.add_sequence();
  store.append(id, 0, TensorView::contiguous(kb.data(), DType::kBFloat16, {len, kvh, dim}),
               TensorView::contiguous(vb.data(), DType::kBFloat16, {len, kvh, dim}));
  Batch x(store, {id}, {q});
  const int k_pages = pages / 20;                              // 5%
  const int keep = (4 * k_pages + kGroup - 1) / kGroup;        // 4x the budget in groups: 26 of 128
  const auto two = run_two_level(x, keep, k_pages, 1, 4);
  for (int h = 0; h < kvh; ++h) {
    const auto sel = segment(two.selected, static_cast<std::size_t>(h) * pages, two.selected_count[h]);
    EXPECT_EQ(static_cast<int>(sel.size()), k_pages);
    for (std::int64_t t : needles)
      EXPECT_TRUE(std::binary_search(sel.begin(), sel.end(), static_cast<std::int32_t>(t / ps)))
          << "needle at token " << t << " (page " << t / ps << ") lost by the coarse level, head " << h;
    EXPECT_TRUE(std::binary_search(sel.begin(), sel.end(), 0)) << "sink page";
    EXPECT_TRUE(std::binary_search(sel.begin(), sel.end(), pages - 1)) << "local page";
  }
}

// The four launches follow from one description: the coarse pass is the page launch over the group
// level, the group selection forces the groups of the sink and local pages, the fine pass takes the
// kept groups. Host-side, so it runs without a GPU.
TEST(CudaTwoLevel, StagesFollowTheDescription) {
  std::int32_t table[4] = {}, indptr[2] = {}, gtable[2] = {}, gindptr[2] = {}, budget[2] = {}, blended[2] = {};
  std::int32_t kept[2] = {}, kept_count[2] = {}, first[1] = {}, pos[32] = {};
  float q[256] = {}, up[32] = {}, est[32] = {}, gsum[2] = {}, gup[2] = {}, gest[2] = {};
  const std::byte summaries[16] = {};
  cuda::TwoLevelScoreParams t;
  t.pages.q = q;
  t.pages.summaries = summaries;
  t.pages.page_table = table;
  t.pages.page_indptr = indptr;
  t.pages.seq_len = indptr;
  t.pages.batch = 1;
  t.pages.q_heads = 8;
  t.pages.kv_heads = 2;
  t.pages.head_dim = 128;
  t.pages.page_size = 32;
  t.pages.dtype = DType::kFloat16;
  t.pages.upper = up;
  t.pages.estimate = est;
  t.pages.blended = blended;
  t.group_table = gtable;
  t.group_indptr = gindptr;
  t.group_summaries = gsum;
  t.first_group = first;
  t.group_upper = gup;
  t.group_estimate = gest;
  t.group_budget = budget;
  t.sink_pages = 17;   // the first two groups
  t.local_pages = 20;  // up to three groups, wherever the window starts
  t.max_groups = 9;
  t.kept = kept;
  t.kept_count = kept_count;
  t.candidates = 48;
  t.position_of = pos;
  const cuda::TwoLevelStages st = cuda::two_level_stages(t);
  EXPECT_EQ(st.rebuild.summaries, static_cast<const void*>(summaries));
  EXPECT_EQ(st.rebuild.group_summaries, gsum);
  EXPECT_EQ(st.rebuild.first_group, first);
  EXPECT_EQ(st.rebuild.page_size, 32);
  EXPECT_EQ(st.rebuild.dtype, DType::kFloat16);
  EXPECT_EQ(st.coarse.summaries, static_cast<const void*>(gsum));
  EXPECT_EQ(st.coarse.dtype, DType::kFloat32);
  EXPECT_EQ(st.coarse.page_table, gtable);
  EXPECT_EQ(st.coarse.page_indptr, gindptr);
  EXPECT_EQ(st.coarse.page_size, 32 * kGroup);
  EXPECT_EQ(st.coarse.upper, gup);
  EXPECT_EQ(st.coarse.estimate, gest);  // the blend ranks groups by it
  EXPECT_EQ(st.coarse.kept_groups, nullptr);
  EXPECT_EQ(st.keep.scores, gup);
  EXPECT_EQ(st.keep.page_indptr, gindptr);
  EXPECT_EQ(st.keep.budget_pages, budget);
  EXPECT_EQ(st.keep.sink_pages, 2);
  EXPECT_EQ(st.keep.local_pages, 3);
  EXPECT_EQ(st.keep.max_entries, 9);
  EXPECT_FALSE(st.keep.inputs_ready);
  EXPECT_EQ(st.keep.selected, kept);
  EXPECT_EQ(st.keep.selected_count, kept_count);
  EXPECT_EQ(st.fine.summaries, static_cast<const void*>(summaries));
  EXPECT_EQ(st.fine.page_table, table);
  EXPECT_EQ(st.fine.kept_groups, kept);
  EXPECT_EQ(st.fine.kept_count, kept_count);
  EXPECT_EQ(st.fine.group_indptr, gindptr);
  EXPECT_EQ(st.fine.candidates, 48);
  EXPECT_EQ(st.fine.position_of, pos);
  EXPECT_EQ(st.fine.upper, up);
  EXPECT_EQ(st.fine.estimate, est);
  t.pages.blended = nullptr;  // without the blend the groups rank by the bound alone
  EXPECT_EQ(cuda::two_level_stages(t).coarse.estimate, nullptr);
  t.pages.inputs_ready = true;  // the caller's word about its inputs holds for the whole chain
  EXPECT_TRUE(cuda::two_level_stages(t).keep.inputs_ready);
  EXPECT_TRUE(cuda::two_level_stages(t).fine.inputs_ready);
}

TEST(CudaTwoLevel, RejectsInconsistentCandidateArguments) {
  const std::int32_t ints[2] = {0, 1};
  const float floats[8] = {};
  float out[2] = {};
  std::int32_t pos[16] = {};
  cuda::ScoreParams p;
  p.batch = 1;
  p.q_heads = 2;
  p.kv_heads = 1;
  p.head_dim = 64;
  p.page_size = 16;
  p.q = floats;
  p.summaries = floats;
  p.page_table = p.page_indptr = p.seq_len = ints;
  p.upper = out;
  p.kept_groups = ints;  // without kept_count, group_indptr, position_of
  auto names = [](const auto& fn, const char* what) {
    try {
      fn();
      ADD_FAILURE() << "accepted; expected an error naming " << what;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  names([&] { cuda::launch_score_pages(p, nullptr); }, "kept_count");
  p.kept_count = p.group_indptr = ints;
  p.position_of = pos;
  p.candidates = 20;  // not a multiple of 16
  names([&] { cuda::launch_score_pages(p, nullptr); }, "candidates");
  p.kept_groups = nullptr;
  p.candidates = 16;
  names([&] { cuda::launch_score_pages(p, nullptr); }, "candidates/position_of");
  cuda::SelectParams s;
  s.batch = 1;
  s.kv_heads = 1;
  s.scores = floats;
  s.page_indptr = s.budget_pages = ints;
  s.selected = s.selected_count = pos;
  s.candidates = 16;  // without position_of
  names([&] { cuda::launch_select_pages(s, nullptr); }, "candidates");
  cuda::GroupSummaryParams g;
  g.batch = 1;
  g.kv_heads = 1;
  g.page_size = 24;
  names([&] { cuda::launch_build_group_summaries(g, nullptr); }, "page_size");
  // The two-level launcher: the fine pass's candidate fields come from the group level, and the
  // blend needs the groups' estimate.
  cuda::TwoLevelScoreParams t;
  t.pages = p;  // candidates and position_of still set
  names([&] { cuda::two_level_stages(t); }, "pages.kept_groups/position_of/candidates");
  t.pages.candidates = 0;
  t.pages.position_of = nullptr;
  names([&] { cuda::two_level_stages(t); }, "pointers");
  t.group_table = t.group_indptr = t.group_budget = ints;
  t.group_summaries = t.group_upper = out;
  t.kept = t.kept_count = t.position_of = pos;
  t.pages.blended = ints;
  names([&] { cuda::two_level_stages(t); }, "group_estimate");
  t.group_estimate = out;
  t.local_pages = -1;
  names([&] { cuda::two_level_stages(t); }, "local_pages");
  // The fused launcher: its selection must be the one over these candidates.
  t.local_pages = 1;
  t.pages.blended = nullptr;
  t.candidates = 16;
  cuda::SelectParams over = s;
  over.position_of = pos;
  over.scores = floats;  // not t.pages.upper
  names([&] { cuda::launch_select_two_level(t, over, nullptr); }, "select.scores/position_of/candidates");
  over.scores = t.pages.upper;
  over.page_indptr = ints + 1;  // not the scored pages' indptr
  names([&] { cuda::launch_select_two_level(t, over, nullptr); }, "select.batch/kv_heads/page_indptr");
}

// Which launches launch_select_two_level runs: fused for a top-k within the bounds and with a
// workspace, staged otherwise (host-side, no device needed).
TEST(CudaTwoLevel, FusesTopKWithinItsBounds) {
  std::uint32_t counts[1] = {};
  cuda::TwoLevelScoreParams t;
  t.pages.batch = 1;
  t.pages.kv_heads = 8;
  t.pages.dtype = DType::kBFloat16;
  t.max_groups = 512;
  t.candidates = 1696;
  cuda::SelectParams s;
  s.workspace = counts;
  EXPECT_TRUE(cuda::select_two_level_fuses(t, s));
  cuda::SelectParams mass = s;
  mass.mass_threshold = 0.9f;  // the mass rule keeps the staged launches
  EXPECT_FALSE(cuda::select_two_level_fuses(t, mass));
  cuda::SelectParams no_workspace = s;
  no_workspace.workspace = nullptr;
  EXPECT_FALSE(cuda::select_two_level_fuses(t, no_workspace));
  cuda::TwoLevelScoreParams long_rows = t;
  long_rows.max_groups = cuda::kFusedMaxGroups + 1;
  EXPECT_FALSE(cuda::select_two_level_fuses(long_rows, s));
  long_rows = t;
  long_rows.max_groups = 0;  // unknown
  EXPECT_FALSE(cuda::select_two_level_fuses(long_rows, s));
  cuda::TwoLevelScoreParams many = t;
  many.candidates = cuda::kFusedMaxCandidates + kGroup;
  EXPECT_FALSE(cuda::select_two_level_fuses(many, s));
  many = t;
  many.pages.batch = 65536 / 8 + 1;  // more segments than the grid's y
  EXPECT_FALSE(cuda::select_two_level_fuses(many, s));
}

}  // namespace
}  // namespace hattn::test
