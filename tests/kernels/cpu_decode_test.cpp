// CpuDecoder against reference::decode on structured layers (attention sinks with large-norm keys,
// a local window, planted needles aligned with the query, RoPE-rotated background keys), for every
// path this CPU supports (each forced in turn; the others are skipped with the reason), every page
// size, head dim and KV dtype, GQA groups 1/4/8 (and 2/3/6 on fewer shapes), ragged batches, empty and single-page lists, token
// masks, and a thread-split list against the unsplit one.
#include <gtest/gtest.h>

#include <cmath>
#include <algorithm>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "hattn/kernels/cpu_decode.hpp"
#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/reference/exact_attention.hpp"

namespace hattn {
namespace {

// Tolerances. The kernel reads exactly the KV values the reference reads (both widen the stored
// bf16/fp16/fp32 to fp32 exactly), so the KV dtype adds no error of its own: what differs is fp32
// arithmetic against double. A logit is a sum of head_dim fp32 products (relative error about
// sqrt(head_dim) * 2^-24 of sum|q k|, ~1e-6 for sink logits of ~12 here), softmax weights and sums are
// fp32 (N * 2^-24 at worst over N <= 1.3K tokens, ~1e-4, typically far less), so outputs are held to 2e-4
// of the largest |value| and LSE to 2e-4 absolute plus relative. The AVX-512 BF16 path multiplies
// bf16 keys by a query split into two bf16 halves: 2^-18 relative per product, ~5e-5 of logit
// here, so its bound is 1e-3.
double out_tolerance(CpuIsa isa, DType dtype) {
  return isa == CpuIsa::kAvx512Bf16 && dtype == DType::kBFloat16 ? 1e-3 : 2e-4;
}

struct LayerSpec {
  DType dtype;
  int head_dim;
  int page_size;
  int group;
  int kv_heads = 2;
};

// A layer of structured heads. Per KV head: a query direction u shared by its group (each query head
// is u plus its own noise); keys are RoPE-rotated Gaussian content, except sinks (tokens 0-3, norm ~12
// along u: the largest logits), needles (a few tokens, ~8 along u) and a recent window (the last 32
// tokens, ~3 along u). Values are Gaussian; sink values are small, as in trained models.
class StructuredLayer {
 public:
  StructuredLayer(const LayerSpec& spec, const std::vector<int>& lengths, std::uint32_t seed)
      : spec_(spec),
        shape_{.layers = 1,
               .q_heads = spec.kv_heads * spec.group,
               .kv_heads = spec.kv_heads,
               .head_dim = spec.head_dim,
               .kv_dtype = spec.dtype},
        store_(shape_, spec.page_size, pool_bytes(spec, lengths), HostMemoryRequest::kAligned),
        rng_(seed) {
    for (int len : lengths) add(len);
  }

  const PagedKVStore& store() const { return store_; }
  const ModelShape& shape() const { return shape_; }
  SeqId seq(std::size_t i) const { return seqs_[i]; }
  const std::vector<float>& q(std::size_t i) const { return queries_[i]; }
  double max_abs_value() const { return max_abs_value_; }

 private:
  static std::size_t pool_bytes(const LayerSpec& s, const std::vector<int>& lengths) {
    const PageLayout l{s.page_size, s.kv_heads, s.head_dim, s.dtype};
    std::size_t pages = 0;
    for (int len : lengths) pages += static_cast<std::size_t>((len + s.page_size - 1) / s.page_size);
    return (pages + 1) * (l.page_bytes() + l.summary_bytes());
  }

  std::vector<double> unit(int dim) {
    std::normal_distribution<double> n(0, 1);
    std::vector<double> v(static_cast<std::size_t>(dim));
    double norm = 0;
    for (double& x : v) norm += (x = n(rng_)) * x;
    for (double& x : v) x /= std::sqrt(norm);
    return v;
  }

  // Rotates pairs (d, d + dim/2) by position * 10000^(-2d/dim), as Llama's RoPE does.
  static void rope(std::vector<double>& v, int pos) {
    const int half = static_cast<int>(v.size()) / 2;
    for (int d = 0; d < half; ++d) {
      const double theta = pos * std::pow(10000.0, -2.0 * d / static_cast<double>(v.size()));
      const double a = v[d], b = v[d + half];
      v[d] = a * std::cos(theta) - b * std::sin(theta);
      v[d + half] = a * std::sin(theta) + b * std::cos(theta);
    }
  }

  void add(int len) {
    const int D = spec_.head_dim, H = spec_.kv_heads, G = spec_.group;
    std::normal_distribution<double> n(0, 1);
    std::uniform_int_distribution<int> pos(4, std::max(4, len - 1));
    const double sqrt_d = std::sqrt(static_cast<double>(D));
    std::vector<float> keys(static_cast<std::size_t>(len) * H * D), values(keys.size());
    std::vector<float> q(static_cast<std::size_t>(H) * G * D);
    for (int h = 0; h < H; ++h) {
      const std::vector<double> u = unit(D);
      for (int g = 0; g < G; ++g)
        for (int d = 0; d < D; ++d) q[(static_cast<std::size_t>(h) * G + g) * D + d] = static_cast<float>(u[d] * sqrt_d + 0.5 * n(rng_));
      std::vector<int> needles = {pos(rng_), pos(rng_), pos(rng_)};
      for (int t = 0; t < len; ++t) {
        std::vector<double> k(static_cast<std::size_t>(D));
        double along = 0;
        if (t < 4) along = 12;
        else if (std::find(needles.begin(), needles.end(), t) != needles.end()) along = 8;
        else if (t >= len - 32) along = 3;
        for (int d = 0; d < D; ++d) k[d] = n(rng_);
        rope(k, t);
        for (int d = 0; d < D; ++d) k[d] += along * u[d] * sqrt_d;  // logit ~ along with scale 1/sqrt(D)
        const double vscale = t < 4 ? 0.1 : 1.0;
        for (int d = 0; d < D; ++d) {
          const std::size_t i = (static_cast<std::size_t>(t) * H + h) * D + d;
          keys[i] = static_cast<float>(k[d]);
          values[i] = static_cast<float>(vscale * n(rng_));
        }
      }
    }
    // Store in the KV dtype; the reference reads back the rounded values, as the kernel does.
    const std::size_t bytes = keys.size() * dtype_bytes(spec_.dtype);
    std::vector<std::byte> kb(bytes), vb(bytes);
    for (std::size_t i = 0; i < keys.size(); ++i) {
      store_from_float(kb.data(), i, spec_.dtype, keys[i]);
      store_from_float(vb.data(), i, spec_.dtype, values[i]);
      max_abs_value_ = std::max(max_abs_value_, std::abs(static_cast<double>(load_as_float(vb.data(), i, spec_.dtype))));
    }
    const SeqId s = store_.add_sequence();
    if (len > 0) {
      store_.append(s, 0, TensorView::contiguous(kb.data(), spec_.dtype, {len, H, D}),
                    TensorView::contiguous(vb.data(), spec_.dtype, {len, H, D}));
    }
    seqs_.push_back(s);
    queries_.push_back(std::move(q));
  }

  LayerSpec spec_;
  ModelShape shape_;
  PagedKVStore store_;
  std::mt19937 rng_;
  std::vector<SeqId> seqs_;
  std::vector<std::vector<float>> queries_;
  double max_abs_value_ = 0;
};

// Items for every (sequence, KV head), with page positions and masks per head (empty = dense), and
// the reference over the same selection.
struct Batch {
  std::vector<std::vector<PageId>> page_ids;
  std::vector<std::vector<std::uint64_t>> masks;
  std::vector<CpuDecodeItem> items;
  std::vector<float> out, lse;  // [items][group][dim], [items][group]
  std::vector<reference::Partial> expected;  // per sequence
};

using Selector = std::function<reference::HeadSelection(std::size_t seq, int kv_head, std::int64_t n_pages)>;

Batch make_batch(const StructuredLayer& layer, std::size_t n_seqs, double scale, const Selector& select) {
  const PagedKVStore& store = layer.store();
  const ModelShape& shape = layer.shape();
  const int G = shape.group_size(), D = shape.head_dim, P = store.layout().page_size;
  Batch b;
  const std::size_t n_items = n_seqs * static_cast<std::size_t>(shape.kv_heads);
  b.page_ids.resize(n_items);
  b.masks.resize(n_items);
  b.out.assign(n_items * G * D, std::nanf(""));
  b.lse.assign(n_items * G, std::nanf(""));
  for (std::size_t s = 0; s < n_seqs; ++s) {
    const auto table = store.pages(layer.seq(s), 0);
    const std::int64_t len = store.length(layer.seq(s), 0);
    std::vector<reference::HeadSelection> sel;
    for (int h = 0; h < shape.kv_heads; ++h) {
      sel.push_back(select(s, h, static_cast<std::int64_t>(table.size())));
      const std::size_t i = s * shape.kv_heads + h;
      for (std::int32_t p : sel.back().pages) b.page_ids[i].push_back(table[p]);
      b.masks[i] = sel.back().token_masks;
      CpuDecodeItem it;
      it.q = layer.q(s).data() + static_cast<std::size_t>(h) * G * D;
      it.pages = b.page_ids[i].data();
      it.token_masks = b.masks[i].empty() ? nullptr : b.masks[i].data();
      it.n_pages = static_cast<std::int32_t>(b.page_ids[i].size());
      const bool has_last = !sel.back().pages.empty() && sel.back().pages.back() == static_cast<std::int32_t>(table.size()) - 1;
      it.last_page_tokens = has_last ? static_cast<std::int32_t>(len - (static_cast<std::int64_t>(table.size()) - 1) * P) : P;
      it.kv_head = h;
      it.out = b.out.data() + i * G * D;
      it.lse = b.lse.data() + i * G;
      b.items.push_back(it);
    }
    b.expected.push_back(reference::decode(store, layer.seq(s), 0, layer.q(s), scale, &sel));
  }
  return b;
}

reference::HeadSelection dense(std::int64_t n_pages) {
  reference::HeadSelection s;
  for (std::int64_t p = 0; p < n_pages; ++p) s.pages.push_back(static_cast<std::int32_t>(p));
  return s;
}

void expect_matches(const Batch& b, const ModelShape& shape, std::size_t n_seqs, double out_tol_abs,
                    const std::string& what) {
  const int G = shape.group_size(), D = shape.head_dim;
  double worst_out = 0, worst_lse = 0;
  for (std::size_t s = 0; s < n_seqs; ++s) {
    for (int qh = 0; qh < shape.q_heads; ++qh) {
      const std::size_t i = s * shape.kv_heads + qh / G;
      const int g = qh % G;
      const double ref_lse = b.expected[s].lse[qh];
      const float got_lse = b.lse[i * G + g];
      if (std::isinf(ref_lse)) {
        ASSERT_TRUE(std::isinf(got_lse) && got_lse < 0) << what << " seq " << s << " head " << qh << ": lse " << got_lse;
      } else {
        const double err = std::abs(got_lse - ref_lse);
        worst_lse = std::max(worst_lse, err);
        ASSERT_LE(err, 2e-4 * (1 + std::abs(ref_lse))) << what << " seq " << s << " head " << qh;
      }
      for (int d = 0; d < D; ++d) {
        const double ref = b.expected[s].out[static_cast<std::size_t>(qh) * D + d];
        const float got = b.out[(i * G + g) * D + d];
        ASSERT_FALSE(std::isnan(got)) << what << " seq " << s << " head " << qh << " d " << d;
        worst_out = std::max(worst_out, std::abs(got - ref));
        ASSERT_LE(std::abs(got - ref), out_tol_abs) << what << " seq " << s << " head " << qh << " d " << d;
      }
    }
  }
  ::testing::Test::RecordProperty("worst_out_err", std::to_string(worst_out));
  ::testing::Test::RecordProperty("worst_lse_err", std::to_string(worst_lse));
}

using Param = std::tuple<CpuIsa, DType, int /*head_dim*/, int /*page_size*/, int /*group*/>;

class CpuDecodeTest : public ::testing::TestWithParam<Param> {
 protected:
  void SetUp() override {
    isa_ = std::get<0>(GetParam());
    if (!cpu_supports(isa_)) GTEST_SKIP() << to_string(isa_) << " path: not supported by this CPU (or not compiled in)";
    spec_ = {std::get<1>(GetParam()), std::get<2>(GetParam()), std::get<3>(GetParam()), std::get<4>(GetParam())};
  }
  CpuIsa isa_{};
  LayerSpec spec_{};
};

TEST_P(CpuDecodeTest, RaggedBatchDenseAndSparseWithMasks) {
  const int P = spec_.page_size;
  // Ragged: one token, one page exactly, a partial last page, a longer sequence, and an empty one.
  const std::vector<int> lengths = {1, P, 3 * P + 5, 1300, 0};
  StructuredLayer layer(spec_, lengths, 1234u + spec_.head_dim + P + spec_.group);
  ThreadPool pool(3);
  CpuDecoder decoder(pool, isa_);
  ASSERT_EQ(decoder.isa(), isa_);
  const double scale = 1.0 / std::sqrt(static_cast<double>(spec_.head_dim));
  const double tol = out_tolerance(isa_, spec_.dtype) * layer.max_abs_value();

  // 1. Dense: every page of every sequence (the empty sequence gives an empty list).
  {
    Batch b = make_batch(layer, lengths.size(), scale, [](std::size_t, int, std::int64_t n) { return dense(n); });
    decoder.run(layer.store().pool(), spec_.group, static_cast<float>(scale), b.items);
    expect_matches(b, layer.shape(), lengths.size(), tol, "dense");
  }
  // 2. Sparse: per head a different subset (sinks, every third page, the last page), token masks
  //    that drop tokens (one page fully masked), and an empty list for one head of one sequence.
  {
    std::mt19937 rng(99);
    Batch b = make_batch(layer, lengths.size(), scale, [&](std::size_t s, int h, std::int64_t n) {
      reference::HeadSelection sel;
      if (s == 2 && h == 1) return sel;  // empty list
      for (std::int64_t p = 0; p < n; ++p)
        if (p == 0 || p == n - 1 || (p + h) % 3 == 0) sel.pages.push_back(static_cast<std::int32_t>(p));
      for (std::size_t i = 0; i < sel.pages.size(); ++i) {
        std::uint64_t m = (std::uint64_t{rng()} << 32) | rng();
        if (i == 0) m |= 1;        // keep a sink
        if (i == 1) m = 0;         // a page with nothing attended
        sel.token_masks.push_back(m);
      }
      return sel;
    });
    decoder.run(layer.store().pool(), spec_.group, static_cast<float>(scale), b.items);
    expect_matches(b, layer.shape(), lengths.size(), tol, "sparse+masks");
  }
  // 3. Single page lists: the middle page of each sequence (the last one where there is one page).
  {
    Batch b = make_batch(layer, lengths.size(), scale, [](std::size_t, int, std::int64_t n) {
      reference::HeadSelection sel;
      if (n > 0) sel.pages.push_back(static_cast<std::int32_t>(n / 2));
      return sel;
    });
    decoder.run(layer.store().pool(), spec_.group, static_cast<float>(scale), b.items);
    expect_matches(b, layer.shape(), lengths.size(), tol, "single page");
  }
}

std::string param_name(const ::testing::TestParamInfo<Param>& info) {
  const auto& [isa, dtype, dim, page, group] = info.param;
  return std::string(to_string(isa)) + "_" + std::string(to_string(dtype)) + "_d" + std::to_string(dim) + "_p" +
         std::to_string(page) + "_g" + std::to_string(group);
}

INSTANTIATE_TEST_SUITE_P(AllPaths, CpuDecodeTest,
                         ::testing::Combine(::testing::Values(CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512,
                                                              CpuIsa::kAvx512Bf16),
                                            ::testing::Values(DType::kBFloat16, DType::kFloat16, DType::kFloat32),
                                            ::testing::Values(64, 128, 256), ::testing::Values(16, 32, 64),
                                            ::testing::Values(1, 4, 8)),
                         param_name);

// Groups that are not a multiple of the 4-head block: 2 heads per block (8 key rows at once on the
// 16-lane paths), 3 (one row at a time) and 4 + 2.
INSTANTIATE_TEST_SUITE_P(OddGroups, CpuDecodeTest,
                         ::testing::Combine(::testing::Values(CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512,
                                                              CpuIsa::kAvx512Bf16),
                                            ::testing::Values(DType::kBFloat16, DType::kFloat32),
                                            ::testing::Values(64, 128), ::testing::Values(16), ::testing::Values(2, 3, 6)),
                         param_name);

TEST(CpuIsa, ReportsPathsAndDetectsASupportedOne) {
  for (CpuIsa isa : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    std::printf("  cpu path %-10s %s\n", to_string(isa), cpu_supports(isa) ? "runs here" : "skipped: not supported by this CPU");
  const CpuIsa best = detect_cpu_isa();
  std::printf("  detected: %s\n", to_string(best));
  EXPECT_TRUE(cpu_supports(best));
  EXPECT_TRUE(cpu_supports(CpuIsa::kGeneric));
  // The widest path, except the AVX-512 BF16 one: it runs only when asked for (it is slower).
  EXPECT_NE(best, CpuIsa::kAvx512Bf16);
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512})
    if (cpu_supports(isa)) EXPECT_GE(static_cast<int>(best), static_cast<int>(isa)) << to_string(isa);
}

TEST(CpuDecoder, RejectsAnUnsupportedPathAndBadItems) {
  ThreadPool pool(1);
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (!cpu_supports(isa)) EXPECT_THROW(CpuDecoder(pool, isa), InvalidArgument) << to_string(isa);
  StructuredLayer layer({DType::kBFloat16, 64, 16, 2}, {40}, 5u);
  CpuDecoder decoder(pool);
  Batch b = make_batch(layer, 1, 0.125, [](std::size_t, int, std::int64_t n) { return dense(n); });
  auto bad = b.items;
  bad[0].kv_head = 7;
  EXPECT_THROW(decoder.run(layer.store().pool(), 2, 0.125f, bad), InvalidArgument);
  bad = b.items;
  bad[0].last_page_tokens = 0;
  EXPECT_THROW(decoder.run(layer.store().pool(), 2, 0.125f, bad), InvalidArgument);
  EXPECT_THROW(decoder.run(layer.store().pool(), 0, 0.125f, b.items), InvalidArgument);
}

// Dense attention over `layer` by a pool of `workers` (which splits long lists into pieces merged by
// LSE) against a one-worker pool (which never splits): LSE within 1e-5, outputs within
// `split_ulps` x 1e-5 of the output scale (reassociated softmax sums), and the split result against
// the reference. `b` receives the split batch.
void expect_split_equals_unsplit(const StructuredLayer& layer, const LayerSpec& spec, const std::vector<int>& lengths,
                                 CpuIsa isa, CpuDecoder& split, double split_ulps, const std::string& what, Batch& b) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(spec.head_dim));
  auto all = [](std::size_t, int, std::int64_t n) { return dense(n); };
  ThreadPool one(1);
  CpuDecoder unsplit(one, isa);
  Batch a = make_batch(layer, lengths.size(), scale, all);
  b = make_batch(layer, lengths.size(), scale, all);
  unsplit.run(layer.store().pool(), spec.group, static_cast<float>(scale), a.items);
  split.run(layer.store().pool(), spec.group, static_cast<float>(scale), b.items);
  double worst = 0;
  for (std::size_t i = 0; i < a.out.size(); ++i) worst = std::max(worst, static_cast<double>(std::abs(a.out[i] - b.out[i])));
  for (std::size_t i = 0; i < a.lse.size(); ++i)
    ASSERT_NEAR(a.lse[i], b.lse[i], 1e-5 * (1 + std::abs(a.lse[i]))) << what << " lse " << i;
  EXPECT_LE(worst, split_ulps * 1e-5 * layer.max_abs_value()) << what;
  expect_matches(b, layer.shape(), lengths.size(), out_tolerance(isa, spec.dtype) * layer.max_abs_value(), what);
}

// A long list split across workers and merged by LSE equals the unsplit pass (a one-worker pool
// never splits), and both equal the reference. Every supported path.
TEST(CpuDecoder, ThreadSplitEqualsUnsplit) {
  for (CpuIsa isa : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
    if (!cpu_supports(isa)) {
      std::printf("  %s skipped: not supported by this CPU\n", to_string(isa));
      continue;
    }
    for (int P : {16, 64}) {
      const LayerSpec spec{DType::kBFloat16, 128, P, 4};
      const std::vector<int> lengths = {8000, 300, 4100};
      StructuredLayer layer(spec, lengths, 77u + P);
      ThreadPool four(4);
      CpuDecoder split(four, isa);
      // ~8 pieces reassociated: a few fp32 ulps of the output scale.
      Batch b;
      expect_split_equals_unsplit(layer, spec, lengths, isa, split, 1.0,
                                  std::string("split ") + to_string(isa) + " page " + std::to_string(P), b);
      ASSERT_FALSE(HasFatalFailure());
      // Run again on the same decoder: scratch is reused, results identical.
      const double scale = 1.0 / std::sqrt(128.0);
      Batch c = make_batch(layer, lengths.size(), scale, [](std::size_t, int, std::int64_t n) { return dense(n); });
      split.run(layer.store().pool(), 4, static_cast<float>(scale), c.items);
      EXPECT_EQ(c.out, b.out);
    }
  }
}

// Pieces capped by bytes: 40K tokens (2500 pages of 16 tokens per KV head, 2 KV heads) over two
// workers would split evenly into ~313-page pieces, above the ~1 MB cap (128 pages of bf16 K and V at
// dim 128), so the cap sets the pieces (20 per head). Still equal to the unsplit pass and the reference.
TEST(CpuDecoder, PiecesCappedByBytesEqualTheUnsplitPass) {
  const CpuIsa isa = detect_cpu_isa();
  const LayerSpec spec{DType::kBFloat16, 128, 16, 4};
  const std::vector<int> lengths = {40000};
  StructuredLayer layer(spec, lengths, 91u);
  ThreadPool two(2);
  CpuDecoder split(two, isa);
  // ~20 pieces reassociated.
  Batch b;
  expect_split_equals_unsplit(layer, spec, lengths, isa, split, 2.0, std::string("capped pieces ") + to_string(isa), b);
}

}  // namespace
}  // namespace hattn
