// reference/: exact attention equals a naive softmax written out independently; splitting a head's keys
// into random subsets (whole pages, or token masks) and merging the partials by LSE equals one pass to
// 1e-12; empty partials merge to (0, -inf); bad input is rejected with a message naming it.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "hattn/reference/exact_attention.hpp"

namespace hattn {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// One layer's K/V as floats (already rounded to the KV dtype), [n][kv_heads][dim], beside the store.
struct Layer {
  std::int64_t n = 0;
  std::vector<float> keys, values;
};

// Keys of a realistic head mix: KV head 0 has an attention sink at token 0 and a planted needle;
// the other heads are local (recent tokens resemble the query) or diffuse. Queries point at the
// sink/needle direction so the softmax is peaked for some heads and flat for others.
Layer make_layer(const ModelShape& s, std::int64_t n, std::mt19937& rng, std::int64_t needle) {
  Layer L;
  L.n = n;
  const int dim = s.head_dim;
  L.keys.resize(static_cast<std::size_t>(n) * s.kv_heads * dim);
  L.values.resize(L.keys.size());
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (std::int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < s.kv_heads; ++h) {
      for (int d = 0; d < dim; ++d) {
        float k = 0.4f * g(rng);
        const float dir = (d % 2 == 0) ? 1.0f : -1.0f;  // the direction queries look along
        if (h == 0 && (t == 0 || t == needle)) k += 1.5f * dir;
        if (h % 3 == 1) k += dir * 2.0f * std::exp(-static_cast<float>(n - 1 - t) / 16.0f);  // local
        if (d == 5) k += 6.0f;  // outlier channel: a shared offset that softmax must cancel
        const std::size_t i = (static_cast<std::size_t>(t) * s.kv_heads + h) * dim + d;
        std::byte tmp[4];
        store_from_float(tmp, 0, s.kv_dtype, k);
        L.keys[i] = load_as_float(tmp, 0, s.kv_dtype);
        store_from_float(tmp, 0, s.kv_dtype, g(rng) + 0.01f * static_cast<float>(t % 50));
        L.values[i] = load_as_float(tmp, 0, s.kv_dtype);
      }
    }
  }
  return L;
}

void append_layer(PagedKVStore& store, SeqId seq, const Layer& L, std::mt19937& rng) {
  const ModelShape& s = store.shape();
  const std::size_t row = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
  // Prefill in random chunks, then the rest one decode token at a time, as an engine would.
  std::int64_t done = 0;
  while (done < L.n) {
    const std::int64_t n = done < L.n / 2 ? std::min<std::int64_t>(L.n - done, std::uniform_int_distribution<int>(1, 100)(rng)) : 1;
    std::vector<std::byte> k(n * row * dtype_bytes(s.kv_dtype)), v(k.size());
    for (std::size_t i = 0; i < n * row; ++i) {
      store_from_float(k.data(), i, s.kv_dtype, L.keys[done * row + i]);
      store_from_float(v.data(), i, s.kv_dtype, L.values[done * row + i]);
    }
    store.append(seq, 0, TensorView::contiguous(k.data(), s.kv_dtype, {n, s.kv_heads, s.head_dim}),
                 TensorView::contiguous(v.data(), s.kv_dtype, {n, s.kv_heads, s.head_dim}));
    done += n;
  }
}

std::vector<float> make_queries(const ModelShape& s, std::mt19937& rng) {
  std::vector<float> q(static_cast<std::size_t>(s.q_heads) * s.head_dim);
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int h = 0; h < s.q_heads; ++h)
    for (int d = 0; d < s.head_dim; ++d)
      q[static_cast<std::size_t>(h) * s.head_dim + d] = ((d % 2 == 0) ? 1.0f : -1.0f) * (0.5f + 0.1f * h) + 0.3f * g(rng);
  return q;
}

// The textbook formula, in long double, with no max subtraction and no shared code with reference/:
// p_i = exp(s_i) / sum_j exp(s_j), out = sum_i p_i v_i, lse = log sum_j exp(s_j).
reference::Partial naive(const ModelShape& s, const Layer& L, const std::vector<float>& q, double scale) {
  reference::Partial r{std::vector<double>(static_cast<std::size_t>(s.q_heads) * s.head_dim),
                       std::vector<double>(s.q_heads)};
  const int dim = s.head_dim;
  for (int qh = 0; qh < s.q_heads; ++qh) {
    const int kvh = qh / (s.q_heads / s.kv_heads);
    long double denom = 0;
    std::vector<long double> num(dim, 0.0L);
    for (std::int64_t t = 0; t < L.n; ++t) {
      long double dot = 0;
      for (int d = 0; d < dim; ++d)
        dot += static_cast<long double>(q[qh * dim + d]) * L.keys[(t * s.kv_heads + kvh) * dim + d];
      const long double e = std::exp(dot * scale);
      denom += e;
      for (int d = 0; d < dim; ++d) num[d] += e * L.values[(t * s.kv_heads + kvh) * dim + d];
    }
    r.lse[qh] = L.n ? static_cast<double>(std::log(denom)) : -kInf;
    for (int d = 0; d < dim; ++d) r.out[qh * dim + d] = L.n ? static_cast<double>(num[d] / denom) : 0.0;
  }
  return r;
}

void expect_close(const reference::Partial& got, const reference::Partial& want, double tol, const std::string& what) {
  ASSERT_EQ(got.out.size(), want.out.size()) << what;
  ASSERT_EQ(got.lse.size(), want.lse.size()) << what;
  for (std::size_t h = 0; h < want.lse.size(); ++h) {
    if (std::isinf(want.lse[h])) {
      EXPECT_EQ(got.lse[h], want.lse[h]) << what << " head " << h;
    } else {
      EXPECT_NEAR(got.lse[h], want.lse[h], tol * std::max(1.0, std::fabs(want.lse[h]))) << what << " lse of head " << h;
    }
  }
  double scale = 1.0;
  for (double v : want.out) scale = std::max(scale, std::fabs(v));
  std::size_t worst = 0;
  double worst_err = 0.0;
  for (std::size_t i = 0; i < want.out.size(); ++i) {
    const double err = std::isnan(got.out[i]) ? kInf : std::fabs(got.out[i] - want.out[i]);
    if (err > worst_err) worst_err = err, worst = i;
  }
  EXPECT_LE(worst_err, tol * scale) << what << ": out[" << worst << "] = " << got.out[worst] << ", want "
                                    << want.out[worst];
}

using RefParam = std::tuple<int, DType, int>;  // GQA group size, KV dtype, page size

class ExactAttentionSweep : public ::testing::TestWithParam<RefParam> {
 protected:
  void SetUp() override {
    const auto [group, dtype, ps] = GetParam();
    shape_ = {.layers = 1, .q_heads = 2 * group, .kv_heads = 2, .head_dim = 64, .kv_dtype = dtype};
    rng_.seed(static_cast<unsigned>(group * 100 + ps + static_cast<int>(dtype)));
    const std::int64_t n = std::uniform_int_distribution<std::int64_t>(5 * ps + 1, 9 * ps)(rng_);
    store_ = std::make_unique<PagedKVStore>(shape_, ps, 32 * PageLayout{ps, 2, 64, dtype}.page_bytes() * 2,
                                            HostMemoryRequest::kAligned);
    seq_ = store_->add_sequence();
    layer_ = make_layer(shape_, n, rng_, n / 3);
    append_layer(*store_, seq_, layer_, rng_);
    q_ = make_queries(shape_, rng_);
    scale_ = 1.0 / std::sqrt(static_cast<double>(shape_.head_dim));
  }

  ModelShape shape_;
  std::mt19937 rng_;
  std::unique_ptr<PagedKVStore> store_;
  SeqId seq_ = 0;
  Layer layer_;
  std::vector<float> q_;
  double scale_ = 0;
};

TEST_P(ExactAttentionSweep, EqualsTheNaiveSoftmaxFormula) {
  const reference::Partial got = reference::decode(*store_, seq_, 0, q_, scale_);
  expect_close(got, naive(shape_, layer_, q_, scale_), 1e-12, "reference vs naive");
  // The heads really are different: the sink/needle head is peaked, the others are not.
  EXPECT_NE(got.lse.front(), got.lse.back());
}

// Splits every KV head's tokens into k random disjoint parts, either whole pages or token masks,
// computes each part's partial with a selection and merges them by LSE in a random order.
TEST_P(ExactAttentionSweep, RandomKeySubsetsMergedByLseEqualOnePass) {
  const reference::Partial whole = reference::decode(*store_, seq_, 0, q_, scale_);
  const int ps = store_->layout().page_size;
  const auto n_pages = static_cast<std::int32_t>(store_->pages(seq_, 0).size());
  for (int trial = 0; trial < 6; ++trial) {
    const bool by_token = trial % 2 == 1;
    const int parts = std::uniform_int_distribution<int>(2, 5)(rng_);
    std::vector<std::vector<reference::HeadSelection>> sel(parts, std::vector<reference::HeadSelection>(shape_.kv_heads));
    for (int kvh = 0; kvh < shape_.kv_heads; ++kvh) {
      for (std::int32_t p = 0; p < n_pages; ++p) {
        // Part parts-1 never receives anything in the first trials: an empty partial joins the merge.
        const int top = trial < 2 ? parts - 2 : parts - 1;
        if (!by_token) {
          auto& s = sel[std::uniform_int_distribution<int>(0, top)(rng_)][kvh];
          s.pages.push_back(p);
          continue;
        }
        std::vector<std::uint64_t> masks(parts, 0);
        for (int t = 0; t < ps; ++t) masks[std::uniform_int_distribution<int>(0, top)(rng_)] |= std::uint64_t{1} << t;
        for (int j = 0; j < parts; ++j) {
          // A page with an empty mask is listed anyway: it must contribute nothing.
          if (masks[j] == 0 && std::uniform_int_distribution<int>(0, 1)(rng_)) continue;
          sel[j][kvh].pages.push_back(p);
          sel[j][kvh].token_masks.push_back(masks[j]);
        }
      }
    }
    std::vector<reference::Partial> partials;
    for (int j = 0; j < parts; ++j) {
      partials.push_back(reference::decode(*store_, seq_, 0, q_, scale_, &sel[j]));
    }
    if (trial < 2) {
      for (double l : partials.back().lse) EXPECT_EQ(l, -kInf) << "the unused part is empty";
    }
    std::shuffle(partials.begin(), partials.end(), rng_);
    const std::string what = std::string(by_token ? "token-mask" : "page") + " split into " + std::to_string(parts);
    expect_close(reference::merge(partials), whole, 1e-12, what);
    reference::Partial folded = partials.back();
    for (int j = parts - 2; j >= 0; --j) folded = reference::merge(partials[j], folded);
    expect_close(folded, whole, 1e-12, what + " (right fold)");
  }
}

TEST_P(ExactAttentionSweep, SelectingEverythingIsTheDenseResult) {
  const auto n_pages = static_cast<std::int32_t>(store_->pages(seq_, 0).size());
  std::vector<reference::HeadSelection> all(shape_.kv_heads), masked(shape_.kv_heads);
  for (int kvh = 0; kvh < shape_.kv_heads; ++kvh) {
    for (std::int32_t p = 0; p < n_pages; ++p) {
      all[kvh].pages.push_back(p);
      masked[kvh].pages.push_back(p);
      masked[kvh].token_masks.push_back(~std::uint64_t{0});  // bits past the valid tokens are ignored
    }
  }
  const reference::Partial dense = reference::decode(*store_, seq_, 0, q_, scale_);
  const reference::Partial a = reference::decode(*store_, seq_, 0, q_, scale_, &all);
  const reference::Partial b = reference::decode(*store_, seq_, 0, q_, scale_, &masked);
  EXPECT_EQ(a.out, dense.out);
  EXPECT_EQ(a.lse, dense.lse);
  EXPECT_EQ(b.out, dense.out);
  EXPECT_EQ(b.lse, dense.lse);
}

std::string ref_name(const ::testing::TestParamInfo<RefParam>& info) {
  const auto& [group, dtype, ps] = info.param;
  return "group" + std::to_string(group) + "_" + std::string(to_string(dtype)) + "_page" + std::to_string(ps);
}

INSTANTIATE_TEST_SUITE_P(GroupsDTypesPages, ExactAttentionSweep,
                         ::testing::Combine(::testing::Values(1, 4, 8),
                                            ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                                            ::testing::Values(16, 64)),
                         ref_name);

TEST(ReferenceMerge, EmptyPartialsGiveZeroAndMinusInfinityNotNaN) {
  const reference::Partial empty{std::vector<double>(6, 0.0), std::vector<double>(2, -kInf)};
  const reference::Partial both = reference::merge(empty, empty);
  for (double v : both.out) EXPECT_EQ(v, 0.0);
  for (double l : both.lse) EXPECT_EQ(l, -kInf);
  const reference::Partial p{{1.0, -2.0, 3.0, 0.5, 0.25, -0.125}, {0.7, -40.0}};
  const reference::Partial left = reference::merge(empty, p);
  const reference::Partial right = reference::merge(p, empty);
  EXPECT_EQ(left.out, p.out);
  EXPECT_EQ(left.lse, p.lse);
  EXPECT_EQ(right.out, p.out);
  EXPECT_EQ(right.lse, p.lse);
  // One head empty, the other not, inside one merge.
  const reference::Partial half{{0.0, 0.0, 0.0, 9.0, 9.0, 9.0}, {-kInf, -40.0}};
  const reference::Partial mixed = reference::merge(half, empty);
  EXPECT_EQ(mixed.lse[0], -kInf);
  EXPECT_EQ(mixed.out[0], 0.0);
  EXPECT_EQ(mixed.lse[1], -40.0);
  EXPECT_EQ(mixed.out[4], 9.0);
}

TEST(ReferenceMerge, WeightsByExpOfLse) {
  // Two single-key partials with logits a and b merge to the two-key softmax.
  const double a = 2.0, b = -1.0;
  const reference::Partial pa{{1.0}, {a}}, pb{{5.0}, {b}};
  const reference::Partial m = reference::merge(pa, pb);
  const double wa = std::exp(a) / (std::exp(a) + std::exp(b));
  EXPECT_NEAR(m.out[0], wa * 1.0 + (1 - wa) * 5.0, 1e-15);
  EXPECT_NEAR(m.lse[0], std::log(std::exp(a) + std::exp(b)), 1e-15);
  // Far apart LSEs (exp would overflow without the max shift) stay finite.
  const reference::Partial big{{3.0}, {1000.0}}, small{{7.0}, {-1000.0}};
  const reference::Partial mb = reference::merge(big, small);
  EXPECT_EQ(mb.out[0], 3.0);
  EXPECT_EQ(mb.lse[0], 1000.0);
}

TEST(ReferenceDecode, EmptySequenceAndEmptySelectionAreEmptyPartials) {
  const ModelShape s{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kFloat32};
  PagedKVStore store(s, 16, 1 << 20, HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  std::vector<float> q(8 * 64, 1.0f);
  const reference::Partial r = reference::decode(store, seq, 1, q, 0.125);
  for (double l : r.lse) EXPECT_EQ(l, -kInf);
  for (double v : r.out) EXPECT_EQ(v, 0.0);
  std::mt19937 rng(1);
  append_layer(store, seq, make_layer(s, 20, rng, 3), rng);
  const std::vector<reference::HeadSelection> none(2);
  const reference::Partial e = reference::decode(store, seq, 0, q, 0.125, &none);
  for (double l : e.lse) EXPECT_EQ(l, -kInf);
  for (double v : e.out) EXPECT_FALSE(std::isnan(v));
}

TEST(ReferenceDecode, PeakedSoftmaxWithHugeLogitsStaysExact) {
  // A needle whose logit exceeds every other by ~1000: exp() of raw logits would overflow; the
  // reference must return the needle's value and its logit as LSE.
  const ModelShape s{.layers = 1, .q_heads = 1, .kv_heads = 1, .head_dim = 64, .kv_dtype = DType::kFloat32};
  PagedKVStore store(s, 16, 1 << 20, HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  Layer L;
  L.n = 40;
  L.keys.assign(40 * 64, 0.0f);
  L.values.resize(40 * 64);
  for (int t = 0; t < 40; ++t)
    for (int d = 0; d < 64; ++d) L.values[t * 64 + d] = static_cast<float>(t) + 0.01f * static_cast<float>(d);
  for (int d = 0; d < 64; ++d) L.keys[17 * 64 + d] = 125.0f;
  std::mt19937 rng(2);
  append_layer(store, seq, L, rng);
  const std::vector<float> q(64, 1.0f);
  const reference::Partial r = reference::decode(store, seq, 0, q, 0.125);  // needle logit 1000
  for (int d = 0; d < 64; ++d) EXPECT_EQ(r.out[d], L.values[17 * 64 + d]);
  EXPECT_EQ(r.lse[0], 1000.0);
}

TEST(ReferenceDecode, BatchOfRaggedSequencesEqualsOneAtATime) {
  const ModelShape s{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 128, .kv_dtype = DType::kBFloat16};
  PagedKVStore store(s, 32, 8 << 20, HostMemoryRequest::kAligned);
  std::mt19937 rng(4);
  std::vector<SeqId> seqs;
  std::vector<float> q;
  for (std::int64_t n : {37, 0, 300, 1}) {
    seqs.push_back(store.add_sequence());
    if (n) append_layer(store, seqs.back(), make_layer(s, n, rng, n / 2), rng);
    const std::vector<float> qs = make_queries(s, rng);
    q.insert(q.end(), qs.begin(), qs.end());
  }
  const std::vector<reference::Partial> batch = reference::decode_batch(store, seqs, 0, q, 0.088);
  ASSERT_EQ(batch.size(), seqs.size());
  const std::size_t per = 8 * 128;
  for (std::size_t b = 0; b < seqs.size(); ++b) {
    const reference::Partial one = reference::decode(store, seqs[b], 0, std::span<const float>(q).subspan(b * per, per), 0.088);
    EXPECT_EQ(batch[b].out, one.out) << "sequence " << b;
    EXPECT_EQ(batch[b].lse, one.lse) << "sequence " << b;
  }
}

template <class Fn>
void expect_rejects(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "no InvalidArgument thrown; expected \"" << *fragments.begin() << "\"";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "\"" << f << "\" not in: " << msg;
  }
}

TEST(ReferenceDecode, RejectsBadInputNamingArgumentAndValue) {
  const ModelShape s{.layers = 1, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kFloat32};
  PagedKVStore store(s, 16, 1 << 20, HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  std::mt19937 rng(3);
  append_layer(store, seq, make_layer(s, 40, rng, 5), rng);  // 3 pages
  const std::vector<float> q(4 * 64, 0.5f);
  expect_rejects([&] { (void)reference::decode(store, seq, 0, std::span<const float>(q).first(100), 0.1); },
                 {"reference::decode", "q.size()", "(got 100)"});
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, std::nan("")); }, {"scale", "finite"});
  expect_rejects([&] { (void)reference::decode(store, seq, 1, q, 0.1); }, {"layer", "(got 1)"});
  expect_rejects([&] { (void)reference::decode(store, 99, 0, q, 0.1); }, {"seq", "(got 99)"});
  std::vector<reference::HeadSelection> sel(3);
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, 0.1, &sel); }, {"selection.size()", "(got 3)"});
  sel.resize(2);
  sel[1].pages = {0, 3};
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, 0.1, &sel); },
                 {"selected page index", "(got 3)", "[0, 3)"});
  sel[1].pages = {2, 1};
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, 0.1, &sel); }, {"(got 1)", "strictly ascending"});
  sel[1].pages = {1, 1};
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, 0.1, &sel); }, {"(got 1)", "strictly ascending"});
  sel[1].pages = {0, 2};
  sel[1].token_masks = {1};
  expect_rejects([&] { (void)reference::decode(store, seq, 0, q, 0.1, &sel); },
                 {"selection.token_masks.size()", "(got 1)", "pages.size() = 2"});
  const reference::Partial a{{1.0, 2.0}, {0.0}}, b{{1.0, 2.0, 3.0, 4.0}, {0.0, 0.0}};
  expect_rejects([&] { (void)reference::merge(a, b); }, {"reference::merge", "partial sizes", "2 vs 4"});
  expect_rejects([&] { (void)reference::merge(std::span<const reference::Partial>{}); }, {"partials.size()", "(got 0)"});
  const std::vector<SeqId> seqs{seq, seq};
  expect_rejects([&] { (void)reference::decode_batch(store, seqs, 0, q, 0.1); },
                 {"reference::decode_batch", "q.size()", "(got 256)", "512"});
}

// The comparison helper must be able to fail.
reference::Partial g_a{{1.0, 2.0}, {0.5}};
reference::Partial g_b{{1.0, 2.0 + 1e-9}, {0.5}};
TEST(ReferenceChecker, DetectsADifferenceAboveTolerance) {
  EXPECT_NONFATAL_FAILURE(expect_close(g_a, g_b, 1e-12, "x"), "out[1]");
  expect_close(g_a, g_b, 1e-8, "x");
}

}  // namespace
}  // namespace hattn
