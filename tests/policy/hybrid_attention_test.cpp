// HybridAttention on the CPU backend: dense equality at a 100% budget, structured sparse quality,
// ragged batches with sequences coming and going, feedback state per request, and bad input.
#include <gtest/gtest.h>

#include <vector>

#include "hattn/hybrid_attention.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/reference/exact_attention.hpp"
#include "structured_layer.hpp"

namespace hattn {
namespace {

constexpr ModelShape kShape{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kBFloat16};

Config cpu_config(double budget = 0.05) {
  Config c;
  c.shape = kShape;
  c.page_size = 16;
  c.host_pool_bytes = 64ull << 20;
  c.cpu_threads = 2;
  c.avg_budget = budget;
  c.backend = Backend::kCpu;
  return c;
}

template <class Attention>
void fill(Attention& attn, SeqId seq, const test::StructuredLayer& l) {
  const std::int64_t n = l.tokens;
  for (int layer = 0; layer < kShape.layers; ++layer) {
    // A prefill chunk and then single decode tokens, as an engine appends them.
    const std::int64_t prefill = n - 3;
    const std::size_t row = static_cast<std::size_t>(kShape.kv_heads) * kShape.head_dim;
    attn.append(seq, layer, TensorView::contiguous(l.keys.data(), DType::kBFloat16, {prefill, kShape.kv_heads, kShape.head_dim}),
                TensorView::contiguous(l.values.data(), DType::kBFloat16, {prefill, kShape.kv_heads, kShape.head_dim}));
    for (std::int64_t t = prefill; t < n; ++t)
      attn.append(seq, layer, TensorView::contiguous(l.keys.data() + t * row, DType::kBFloat16, {1, kShape.kv_heads, kShape.head_dim}),
                  TensorView::contiguous(l.values.data() + t * row, DType::kBFloat16, {1, kShape.kv_heads, kShape.head_dim}));
  }
}

// Runs one layer for the rows and returns the output [batch][q_heads][dim].
template <class Attention>
std::vector<float> run_layer(Attention& attn, std::span<const SeqId> rows, std::span<const float> q, int layer) {
  const std::int64_t b = static_cast<std::int64_t>(rows.size());
  std::vector<float> out(static_cast<std::size_t>(b) * kShape.q_heads * kShape.head_dim, -7.0f);
  const Plan plan = attn.plan(rows);
  attn.run(plan, layer, TensorView::contiguous(q.data(), DType::kFloat32, {b, kShape.q_heads, kShape.head_dim}),
           TensorView::contiguous(out.data(), DType::kFloat32, {b, kShape.q_heads, kShape.head_dim}));
  return out;
}

double error_vs_dense(const PagedKVStore& store, SeqId seq, int layer, std::span<const float> q, const std::vector<float>& out,
                      float scale) {
  const auto ref = reference::decode(store, seq, layer, q, scale);
  return test::relative_l2(out, ref.out);
}

// bf16 KV is exact in both; the difference is fp32 accumulation (and a bf16 dot-product path, whose
// q rounding gives ~3e-3); 1e-2 leaves room without hiding a wrong page.
constexpr double kDenseTolerance = 1e-2;

TEST(HybridAttentionCpu, FullBudgetEqualsDenseAttention) {
  DenseCpuAttention attn(cpu_config(1.0), {}, FixedBudget(1.0));
  EXPECT_EQ(attn.backend(), Backend::kCpu);
  const auto layer = test::make_structured_layer(kShape, 3000, 1);
  const SeqId seq = attn.add_sequence();
  fill(attn, seq, layer);
  const std::vector<SeqId> rows{seq};
  for (int l = 0; l < kShape.layers; ++l) {
    const auto out = run_layer(attn, rows, layer.query, l);
    EXPECT_LT(error_vs_dense(attn.store(), seq, l, layer.query, out, attn.config().logit_scale()), kDenseTolerance);
    const StepStats& s = attn.stats(l);
    EXPECT_DOUBLE_EQ(s.budget_used(), 1.0);
  }
}

TEST(HybridAttentionCpu, EveryPolicyCombinationStaysCloseOnStructuredHeads) {
  const auto layer = test::make_structured_layer(kShape, 8192, 2);
  auto check = [&](auto& attn, double max_error, const char* name) {
    const SeqId seq = attn.add_sequence();
    fill(attn, seq, layer);
    const std::vector<SeqId> rows{seq};
    double err = 0;
    for (int step = 0; step < 3; ++step) err = error_vs_dense(attn.store(), seq, 0, layer.query,
                                                              run_layer(attn, rows, layer.query, 0), attn.config().logit_scale());
    const StepStats& s = attn.stats(0);
    EXPECT_LT(err, max_error) << name;
    EXPECT_LE(s.budget_used(), 0.30) << name;
    EXPECT_GT(s.budget_used(), 0.0) << name;
  };
  FluxionAttention fluxion(cpu_config());
  check(fluxion, 0.1, "fluxion");
  Fixed5HybridAttention fixed(cpu_config(), {}, FixedBudget(0.05));
  check(fixed, 0.1, "fixed5");
  QuestGpuAttention quest(cpu_config(), {}, FixedBudget(0.05));
  check(quest, 0.1, "quest");
  PsaAttention psa(cpu_config(), {}, MassThreshold(0.95f, 0.25));
  check(psa, 0.1, "psa");
}

// Two-level scoring (Config::coarse_keep) prunes groups of 16 pages by their coarse summaries before
// the pages are ranked; on structured heads (sinks, local window, needles) it stays as close to
// dense attention as one pass does. 16K tokens: 64 groups, of which a 5% top-k keeps ~15.
TEST(HybridAttentionCpu, TwoLevelScoringStaysCloseOnStructuredHeads) {
  const auto layer = test::make_structured_layer(kShape, 16384, 4);
  Config c = cpu_config();
  c.coarse_keep = 4;
  EXPECT_LT(kept_summary_groups(1024, 51, c.coarse_keep, c.sink_pages, c.local_pages), summary_groups(1024));
  auto check = [&](auto& attn, const char* name) {
    const SeqId seq = attn.add_sequence();
    fill(attn, seq, layer);
    const std::vector<SeqId> rows{seq};
    double err = 0;
    for (int step = 0; step < 3; ++step)
      err = error_vs_dense(attn.store(), seq, 0, layer.query, run_layer(attn, rows, layer.query, 0),
                           attn.config().logit_scale());
    EXPECT_LT(err, 0.1) << name;
    EXPECT_LE(attn.stats(0).budget_used(), 0.30) << name;
    EXPECT_GT(attn.stats(0).budget_used(), 0.0) << name;
  };
  FluxionAttention fluxion(c);
  check(fluxion, "fluxion, two-level");
  QuestGpuAttention quest(c, {}, FixedBudget(0.05));
  check(quest, "quest, two-level");
  Config bad = c;
  bad.coarse_keep = 0.5;
  EXPECT_THROW(bad.validate(), InvalidArgument);
}

TEST(HybridAttentionCpu, RaggedBatchesWithSequencesAddedAndReleased) {
  DenseCpuAttention attn(cpu_config(1.0), {}, FixedBudget(1.0));
  std::vector<test::StructuredLayer> layers;
  std::vector<SeqId> rows;
  for (std::int64_t n : {17, 400, 1500}) {
    layers.push_back(test::make_structured_layer(kShape, n, static_cast<std::uint32_t>(n)));
    rows.push_back(attn.add_sequence());
    fill(attn, rows.back(), layers.back());
  }
  auto check_rows = [&](const std::vector<SeqId>& batch, const std::vector<const test::StructuredLayer*>& data) {
    std::vector<float> q;
    for (const auto* l : data) q.insert(q.end(), l->query.begin(), l->query.end());
    const auto out = run_layer(attn, batch, q, 1);
    const std::size_t row = static_cast<std::size_t>(kShape.q_heads) * kShape.head_dim;
    for (std::size_t b = 0; b < batch.size(); ++b) {
      std::vector<float> ob(out.begin() + b * row, out.begin() + (b + 1) * row);
      EXPECT_LT(error_vs_dense(attn.store(), batch[b], 1, data[b]->query, ob, attn.config().logit_scale()), kDenseTolerance)
          << "row " << b;
    }
  };
  check_rows(rows, {&layers[0], &layers[1], &layers[2]});
  const auto before = attn.store().pool().stats().used_pages;
  attn.release(rows[1]);
  EXPECT_LT(attn.store().pool().stats().used_pages, before);
  EXPECT_THROW(attn.plan(std::vector<SeqId>{rows[1]}), InvalidArgument);
  const auto extra = test::make_structured_layer(kShape, 777, 9);
  const SeqId fresh = attn.add_sequence();
  fill(attn, fresh, extra);
  check_rows({rows[2], fresh, rows[0]}, {&layers[2], &extra, &layers[0]});
}

TEST(HybridAttentionCpu, FeedbackStateResetsPerRequest) {
  Fixed5HybridAttention attn(cpu_config(), {}, FixedBudget(0.05));
  const SeqId seq = attn.add_sequence();
  const std::vector<SeqId> rows{seq};
  attn.scheduler().feedback({rows, 1.0, 10.0, 4, 4});
  EXPECT_GT(attn.scheduler().cpu_share(seq), 0.5);
  attn.release(seq);
  EXPECT_DOUBLE_EQ(attn.scheduler().cpu_share(seq), 0.5);
}

TEST(HybridAttentionCpu, BadInputIsRejectedAndStoredKvStaysIntact) {
  auto expect_message = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      ADD_FAILURE() << "no exception, expected one naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  Config bad = cpu_config();
  bad.avg_budget = 0.0;
  expect_message([&] { FluxionAttention a(bad); }, "avg_budget");
  bad.avg_budget = 1.5;
  expect_message([&] { FluxionAttention a(bad); }, "avg_budget");
  bad = cpu_config();
  bad.page_size = 24;
  expect_message([&] { FluxionAttention a(bad); }, "page_size");
  bad = cpu_config();
  bad.shape.kv_heads = 1;
  bad.shape.q_heads = kMaxCpuScoreGroup + 1;
  expect_message([&] { FluxionAttention a(bad); }, "shape.q_heads / shape.kv_heads");

  FluxionAttention attn(cpu_config());
  const auto layer = test::make_structured_layer(kShape, 200, 3);
  const SeqId seq = attn.add_sequence();
  fill(attn, seq, layer);
  const auto pages_before = std::vector<PageId>(attn.store().pages(seq, 0).begin(), attn.store().pages(seq, 0).end());
  const std::vector<SeqId> rows{seq};
  const auto good = run_layer(attn, rows, layer.query, 0);

  std::vector<float> fp32_keys(static_cast<std::size_t>(kShape.kv_heads) * kShape.head_dim);
  expect_message([&] {
    attn.append(seq, 0, TensorView::contiguous(fp32_keys.data(), DType::kFloat32, {1, kShape.kv_heads, kShape.head_dim}),
                TensorView::contiguous(fp32_keys.data(), DType::kFloat32, {1, kShape.kv_heads, kShape.head_dim}));
  }, "dtype");
  expect_message([&] {
    attn.append(seq, 5, TensorView::contiguous(layer.keys.data(), DType::kBFloat16, {1, kShape.kv_heads, kShape.head_dim}),
                TensorView::contiguous(layer.values.data(), DType::kBFloat16, {1, kShape.kv_heads, kShape.head_dim}));
  }, "layer");
  expect_message([&] { attn.plan(std::vector<SeqId>{seq + 100}); }, "sequence id");
  expect_message([&] { attn.plan(std::vector<SeqId>{seq, seq}); }, "listed once");
  const Plan plan = attn.plan(rows);
  std::vector<float> q(layer.query), out(q.size());
  expect_message([&] {
    attn.run(plan, 0, TensorView::contiguous(q.data(), DType::kFloat32, {1, kShape.q_heads - 1, kShape.head_dim}),
             TensorView::contiguous(out.data(), DType::kFloat32, {1, kShape.q_heads, kShape.head_dim}));
  }, "queries");
  expect_message([&] {
    attn.run(plan, 0, TensorView::contiguous(q.data(), DType::kFloat32, {1, kShape.q_heads, kShape.head_dim}),
             TensorView::contiguous(out.data(), DType::kBFloat16, {1, kShape.q_heads, kShape.head_dim}));
  }, "output");
  expect_message([&] {
    attn.run(plan, 9, TensorView::contiguous(q.data(), DType::kFloat32, {1, kShape.q_heads, kShape.head_dim}),
             TensorView::contiguous(out.data(), DType::kFloat32, {1, kShape.q_heads, kShape.head_dim}));
  }, "layer");
  expect_message([&] { attn.release(seq + 100); }, "sequence id");

  // Nothing above touched the stored KV: same pages, same length, same answer.
  EXPECT_EQ(attn.store().length(seq, 0), layer.tokens);
  EXPECT_TRUE(std::equal(pages_before.begin(), pages_before.end(), attn.store().pages(seq, 0).begin()));
  EXPECT_EQ(run_layer(attn, rows, layer.query, 0), good);
}

TEST(HybridAttentionCpu, PoolExhaustionIsAnErrorTheEngineCanHandle) {
  Config c = cpu_config();
  c.host_pool_bytes = 40 * (2ull * 2 * 16 * 64 * 2 + 2ull * 3 * 64 * 2);  // 40 pages
  FluxionAttention attn(c);
  const auto layer = test::make_structured_layer(kShape, 1000, 4);
  const SeqId seq = attn.add_sequence();
  const std::int64_t n = 300;  // 19 pages per layer
  auto k = TensorView::contiguous(layer.keys.data(), DType::kBFloat16, {n, kShape.kv_heads, kShape.head_dim});
  auto v = TensorView::contiguous(layer.values.data(), DType::kBFloat16, {n, kShape.kv_heads, kShape.head_dim});
  attn.append(seq, 0, k, v);
  attn.append(seq, 1, k, v);
  EXPECT_THROW(attn.append(seq, 1, k, v), OutOfCapacity);
  EXPECT_EQ(attn.store().length(seq, 1), n);
  std::vector<std::uint16_t> back(static_cast<std::size_t>(n) * kShape.kv_heads * kShape.head_dim);
  attn.store().read(seq, 1, 0, n, TensorView::contiguous(back.data(), DType::kBFloat16, {n, kShape.kv_heads, kShape.head_dim}),
                    TensorView::contiguous(std::vector<std::uint16_t>(back.size()).data(), DType::kBFloat16,
                                           {n, kShape.kv_heads, kShape.head_dim}));
  EXPECT_TRUE(std::equal(back.begin(), back.end(), layer.keys.begin()));
}

}  // namespace
}  // namespace hattn
