// PagedKVStore: append (prefill chunks and single decode tokens) and readback bit-exact, summaries
// equal to a brute-force recomputation after every append, exhaustion that leaves everything intact,
// release, concurrent appends, and rejection of bad input.
#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "hattn/kv/paged_kv_store.hpp"
#include "kv/kv_test_data.hpp"

namespace hattn {
namespace {

using test::StreamModel;
using test::TokenBlock;

// Every page of the stream holds exactly the model's bytes at the HND offsets of PageLayout, and
// read() of the whole stream and of a random sub-range returns them too.
void expect_stream_bytes(const PagedKVStore& store, SeqId seq, int layer, const StreamModel& m, std::mt19937& rng) {
  const PageLayout& l = store.layout();
  ASSERT_EQ(store.length(seq, layer), m.length);
  const auto pages = store.pages(seq, layer);
  ASSERT_EQ(static_cast<std::int64_t>(pages.size()), (m.length + l.page_size - 1) / l.page_size);
  const std::size_t row = static_cast<std::size_t>(l.head_dim) * dtype_bytes(l.dtype);
  for (std::int64_t pos = 0; pos < m.length; ++pos) {
    const std::byte* page = store.pool().page(pages[pos / l.page_size]);
    const int tok = static_cast<int>(pos % l.page_size);
    for (int h = 0; h < l.kv_heads; ++h) {
      const std::size_t src = (static_cast<std::size_t>(pos) * l.kv_heads + h) * row;
      ASSERT_EQ(std::memcmp(page + l.key_offset(h, tok) * dtype_bytes(l.dtype), m.keys.data() + src, row), 0)
          << "key of token " << pos << " head " << h;
      ASSERT_EQ(std::memcmp(page + l.value_offset(h, tok) * dtype_bytes(l.dtype), m.values.data() + src, row), 0)
          << "value of token " << pos << " head " << h;
    }
  }
  std::uniform_int_distribution<std::int64_t> pick(0, m.length);
  std::int64_t a = pick(rng), b = pick(rng);
  if (a > b) std::swap(a, b);
  for (auto [begin, n] : {std::pair<std::int64_t, std::int64_t>{0, m.length}, {a, b - a}}) {
    TokenBlock out;
    out.n = n;
    out.keys.resize(static_cast<std::size_t>(n) * l.kv_heads * row);
    out.values.resize(out.keys.size());
    store.read(seq, layer, begin, n, out.key_view(l), out.value_view(l));
    if (n == 0) continue;  // memcmp of an empty vector's null data is undefined
    const std::size_t off = static_cast<std::size_t>(begin) * l.kv_heads * row;
    ASSERT_EQ(std::memcmp(out.keys.data(), m.keys.data() + off, out.keys.size()), 0) << "read [" << begin << ", +" << n << ")";
    ASSERT_EQ(std::memcmp(out.values.data(), m.values.data() + off, out.values.size()), 0);
  }
}

// Fine and coarse summaries recomputed from the appended tokens (not from the pages):
// min and max exact; the fine mean is the fp32 sum in token order divided by the count and rounded
// once to the KV dtype (the documented contract), and also within rounding of the exact mean;
// the coarse mean is within one rounding of the KV dtype of the exact mean of the group's tokens.
void expect_summaries(const PagedKVStore& store, SeqId seq, int layer, const StreamModel& m) {
  const PageLayout& l = store.layout();
  const auto pages = store.pages(seq, layer);
  const std::int64_t n_pages = static_cast<std::int64_t>(pages.size());
  for (std::int64_t p = 0; p < n_pages; ++p) {
    const std::byte* s = store.pool().summary(pages[p]);
    const std::int64_t first = p * l.page_size;
    const std::int64_t last = std::min<std::int64_t>(first + l.page_size, m.length);
    for (int h = 0; h < l.kv_heads; ++h) {
      for (int d = 0; d < l.head_dim; ++d) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo, sum32 = 0.0f;
        double sum64 = 0.0;
        for (std::int64_t pos = first; pos < last; ++pos) {
          const float k = test::model_key(m, l, pos, h, d);
          lo = std::min(lo, k);
          hi = std::max(hi, k);
          sum32 += k;
          sum64 += k;
        }
        const float got_lo = load_as_float(s, l.summary_offset(h, 0) + d, l.dtype);
        const float got_hi = load_as_float(s, l.summary_offset(h, 1) + d, l.dtype);
        const float got_mean = load_as_float(s, l.summary_offset(h, 2) + d, l.dtype);
        ASSERT_EQ(got_lo, lo) << "min of page " << p << " head " << h << " dim " << d;
        ASSERT_EQ(got_hi, hi) << "max of page " << p << " head " << h << " dim " << d;
        std::byte rounded[4];
        store_from_float(rounded, 0, l.dtype, sum32 / static_cast<float>(last - first));
        ASSERT_EQ(got_mean, load_as_float(rounded, 0, l.dtype)) << "mean of page " << p << " head " << h << " dim " << d;
        const double exact = sum64 / static_cast<double>(last - first);
        ASSERT_LE(std::fabs(got_mean - exact), test::unit_roundoff(l.dtype) * std::fabs(exact) * 1.01 +
                                                   1e-5 * std::max(std::fabs(lo), std::fabs(hi)) + 1e-7)
            << "mean of page " << p;
      }
    }
  }
  const auto groups = store.group_summaries(seq, layer);
  const std::int64_t n_groups = (n_pages + kPagesPerSummaryGroup - 1) / kPagesPerSummaryGroup;
  ASSERT_EQ(groups.size(), static_cast<std::size_t>(n_groups) * l.summary_elems());
  for (std::int64_t g = 0; g < n_groups; ++g) {
    const float* s = groups.data() + g * l.summary_elems();
    const std::int64_t first = g * kPagesPerSummaryGroup * l.page_size;
    const std::int64_t last = std::min<std::int64_t>(first + kPagesPerSummaryGroup * l.page_size, m.length);
    for (int h = 0; h < l.kv_heads; ++h) {
      for (int d = 0; d < l.head_dim; ++d) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        double sum = 0.0;
        for (std::int64_t pos = first; pos < last; ++pos) {
          const float k = test::model_key(m, l, pos, h, d);
          lo = std::min(lo, k);
          hi = std::max(hi, k);
          sum += k;
        }
        ASSERT_EQ(s[l.summary_offset(h, 0) + d], lo) << "group " << g << " min, head " << h << " dim " << d;
        ASSERT_EQ(s[l.summary_offset(h, 1) + d], hi) << "group " << g << " max, head " << h << " dim " << d;
        // Built from page means rounded to the KV dtype: each is off by at most one rounding of a
        // value no larger than the group's largest |key|.
        const double bound = std::max(std::fabs(lo), std::fabs(hi));
        ASSERT_NEAR(s[l.summary_offset(h, 2) + d], sum / static_cast<double>(last - first),
                    (test::unit_roundoff(l.dtype) + 1e-5) * bound + 1e-7)
            << "group " << g << " mean, head " << h << " dim " << d;
      }
    }
  }
}

using StoreParam = std::tuple<int, DType, std::pair<int, int>>;  // page size, dtype, (kv_heads, head_dim)

class PagedKVStoreSweep : public ::testing::TestWithParam<StoreParam> {
 protected:
  PageLayout layout() const {
    const auto& [ps, dtype, hd] = GetParam();
    return {ps, hd.first, hd.second, dtype};
  }
  ModelShape shape(int layers) const {
    const PageLayout l = layout();
    return {.layers = layers, .q_heads = 2 * l.kv_heads, .kv_heads = l.kv_heads, .head_dim = l.head_dim,
            .kv_dtype = l.dtype};
  }
};

TEST_P(PagedKVStoreSweep, MixedAppendsReadBackBitExactWithSummariesCurrentAfterEveryAppend) {
  const PageLayout l = layout();
  const int ps = l.page_size;
  constexpr int kLayers = 2;
  constexpr int kSeqs = 2;
  const std::size_t pool_bytes = 64 * kPagesPerSummaryGroup * (l.page_bytes() + l.summary_bytes());
  PagedKVStore store(shape(kLayers), ps, pool_bytes, HostMemoryRequest::kAligned);
  std::mt19937 rng(1234 + ps + static_cast<int>(l.dtype) * 7 + l.head_dim);

  // Stream 0 crosses a coarse group boundary; the others get random short lengths.
  std::vector<SeqId> seqs;
  std::vector<StreamModel> model(kSeqs * kLayers);
  std::vector<std::int64_t> target(kSeqs * kLayers);
  for (int s = 0; s < kSeqs; ++s) seqs.push_back(store.add_sequence());
  for (std::size_t i = 0; i < target.size(); ++i) {
    target[i] = i == 0 ? std::uniform_int_distribution<std::int64_t>(kPagesPerSummaryGroup * ps + 1,
                                                                      (kPagesPerSummaryGroup + 6) * ps)(rng)
                       : std::uniform_int_distribution<std::int64_t>(1, 5 * ps)(rng);
  }

  std::int64_t appends = 0, decode_appends = 0;
  for (;;) {
    std::vector<int> open;
    for (std::size_t i = 0; i < target.size(); ++i)
      if (model[i].length < target[i]) open.push_back(static_cast<int>(i));
    if (open.empty()) break;
    const int i = open[std::uniform_int_distribution<std::size_t>(0, open.size() - 1)(rng)];
    const SeqId seq = seqs[i / kLayers];
    const int layer = i % kLayers;
    const std::int64_t left = target[i] - model[i].length;
    // A quarter single-token decode appends; the rest prefill chunks that start and end anywhere.
    const bool decode = std::uniform_int_distribution<int>(0, 3)(rng) == 0;
    const std::int64_t n = decode ? 1 : std::min<std::int64_t>(left, std::uniform_int_distribution<std::int64_t>(1, 3 * ps)(rng));
    const TokenBlock block = test::make_tokens(l, model[i].length, n, static_cast<std::uint32_t>(i + 1));
    store.append(seq, layer, block.key_view(l), block.value_view(l));
    model[i].append(block);
    ++appends;
    decode_appends += decode;
    expect_summaries(store, seq, layer, model[i]);
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(decode_appends, 0);
  EXPECT_GT(appends, decode_appends);

  std::set<PageId> all_pages;
  std::int64_t pages_total = 0;
  for (std::size_t i = 0; i < model.size(); ++i) {
    expect_stream_bytes(store, seqs[i / kLayers], static_cast<int>(i % kLayers), model[i], rng);
    expect_summaries(store, seqs[i / kLayers], static_cast<int>(i % kLayers), model[i]);
    const auto pages = store.pages(seqs[i / kLayers], static_cast<int>(i % kLayers));
    all_pages.insert(pages.begin(), pages.end());
    pages_total += static_cast<std::int64_t>(pages.size());
  }
  EXPECT_EQ(static_cast<std::int64_t>(all_pages.size()), pages_total) << "no page is shared";
  EXPECT_EQ(store.pool().stats().used_pages, pages_total);

  for (SeqId s : seqs) store.release(s);
  EXPECT_EQ(store.pool().stats().used_pages, 0) << "release returns every page";
  EXPECT_TRUE(store.sequences().empty());
}

std::string sweep_name(const ::testing::TestParamInfo<StoreParam>& info) {
  const auto& [ps, dtype, hd] = info.param;
  return "page" + std::to_string(ps) + "_" + std::string(to_string(dtype)) + "_h" + std::to_string(hd.first) +
         "_d" + std::to_string(hd.second);
}

INSTANTIATE_TEST_SUITE_P(PageSizesDTypesShapes, PagedKVStoreSweep,
                         ::testing::Combine(::testing::Values(16, 32, 64),
                                            ::testing::Values(DType::kFloat32, DType::kFloat16, DType::kBFloat16),
                                            ::testing::Values(std::pair{2, 64}, std::pair{1, 128}, std::pair{1, 256})),
                         sweep_name);

// The checkers above must be able to fail: corrupt one summary element, one coarse mean and one
// stored key, and each is caught. (gtest-spi needs the objects at namespace scope.)
const PagedKVStore* g_store = nullptr;
const StreamModel* g_model = nullptr;
std::mt19937 g_rng(3);

TEST(PagedKVStoreCheckers, CatchCorruptedSummariesAndPages) {
  const PageLayout l{16, 2, 64, DType::kBFloat16};
  PagedKVStore store({.layers = 1, .q_heads = 2, .kv_heads = 2, .head_dim = 64}, 16,
                     40 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  StreamModel m;
  const TokenBlock b = test::make_tokens(l, 0, 17 * 16 + 3, 11);
  store.append(seq, 0, b.key_view(l), b.value_view(l));
  m.append(b);
  g_store = &store;
  g_model = &m;
  expect_summaries(store, seq, 0, m);
  ASSERT_FALSE(HasFailure());

  std::byte* summary = store.pool().summary(store.pages(seq, 0)[3]);
  const float saved = load_as_float(summary, l.summary_offset(1, 2) + 7, l.dtype);
  store_from_float(summary, l.summary_offset(1, 2) + 7, l.dtype, saved + 0.25f);
  EXPECT_FATAL_FAILURE(expect_summaries(*g_store, 0, 0, *g_model), "mean of page 3");
  store_from_float(summary, l.summary_offset(1, 2) + 7, l.dtype, saved);

  auto* group = const_cast<float*>(store.group_summaries(seq, 0).data()) + l.summary_elems();
  const float saved_group = group[l.summary_offset(0, 2)];
  group[l.summary_offset(0, 2)] += 0.05f;
  EXPECT_FATAL_FAILURE(expect_summaries(*g_store, 0, 0, *g_model), "group 1 mean");
  group[l.summary_offset(0, 2)] = saved_group;

  std::byte* page = store.pool().page(store.pages(seq, 0)[16]);
  page[l.key_offset(1, 2) * 2] ^= std::byte{1};
  EXPECT_FATAL_FAILURE(expect_stream_bytes(*g_store, 0, 0, *g_model, g_rng), "key of token 258 head 1");
}

// A byte image of everything a store holds for some streams: lengths, page tables, page bytes,
// fine summaries and coarse summaries.
struct Snapshot {
  std::vector<std::int64_t> lengths;
  std::vector<std::vector<PageId>> tables;
  std::vector<std::vector<std::byte>> bytes;
  std::vector<std::vector<float>> groups;
  friend bool operator==(const Snapshot&, const Snapshot&) = default;
};

Snapshot snapshot(const PagedKVStore& store, const std::vector<SeqId>& seqs) {
  Snapshot s;
  const PageLayout& l = store.layout();
  for (SeqId seq : seqs) {
    for (int layer = 0; layer < store.shape().layers; ++layer) {
      s.lengths.push_back(store.length(seq, layer));
      const auto pages = store.pages(seq, layer);
      s.tables.emplace_back(pages.begin(), pages.end());
      std::vector<std::byte> b;
      for (PageId p : pages) {
        b.insert(b.end(), store.pool().page(p), store.pool().page(p) + l.page_bytes());
        b.insert(b.end(), store.pool().summary(p), store.pool().summary(p) + l.summary_bytes());
      }
      s.bytes.push_back(std::move(b));
      const auto g = store.group_summaries(seq, layer);
      s.groups.emplace_back(g.begin(), g.end());
    }
  }
  return s;
}

constexpr ModelShape kSmall{.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64, .kv_dtype = DType::kBFloat16};

TEST(PagedKVStore, ExhaustionThrowsClearlyAndLeavesEveryStoredPageIntact) {
  const PageLayout l{16, kSmall.kv_heads, kSmall.head_dim, kSmall.kv_dtype};
  constexpr int kPages = 7;
  PagedKVStore store(kSmall, 16, kPages * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  ASSERT_EQ(store.pool().capacity_pages(), kPages);
  const SeqId a = store.add_sequence(), b = store.add_sequence();
  StreamModel ma, mb;
  auto append = [&](SeqId seq, int layer, StreamModel& m, std::int64_t n) {
    const TokenBlock t = test::make_tokens(l, m.length, n, static_cast<std::uint32_t>(seq * 2 + layer + 1));
    store.append(seq, layer, t.key_view(l), t.value_view(l));
    m.append(t);
  };
  append(a, 0, ma, 40);  // 3 pages, 8 free slots in the last
  append(b, 1, mb, 50);  // 4 pages: the pool is full
  ASSERT_EQ(store.pool().stats().free_pages(), 0);
  const Snapshot before = snapshot(store, {a, b});

  const TokenBlock big = test::make_tokens(l, 40, 9, 99);  // needs one more page
  try {
    store.append(a, 0, big.key_view(l), big.value_view(l));
    FAIL() << "append past capacity must throw";
  } catch (const OutOfCapacity& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("exhausted"), std::string::npos) << msg;
    EXPECT_NE(msg.find("PagedKVStore::append(seq " + std::to_string(a) + ", layer 0, 9 tokens at length 40)"),
              std::string::npos)
        << msg;
    EXPECT_NE(msg.find("need 1 pages, 0 free of 7"), std::string::npos) << msg;
  }
  const TokenBlock other_layer = test::make_tokens(l, 0, 1, 98);
  EXPECT_THROW(store.append(a, 1, other_layer.key_view(l), other_layer.value_view(l)), OutOfCapacity);
  EXPECT_EQ(snapshot(store, {a, b}), before) << "a failed append changes nothing";
  EXPECT_EQ(store.pool().stats().used_pages, kPages);

  // Tokens that fit in the last page's free slots still go in while the pool is full.
  append(a, 0, ma, 8);
  EXPECT_EQ(store.length(a, 0), 48);
  EXPECT_EQ(store.last_page_tokens(a, 0), 16);
  EXPECT_EQ(store.last_page_tokens(b, 1), 2);  // 50 tokens: 3 full pages and 2
  EXPECT_EQ(store.last_page_tokens(b, 0), 0);  // no pages
  std::mt19937 rng(5);
  expect_stream_bytes(store, a, 0, ma, rng);
  expect_summaries(store, a, 0, ma);
  expect_stream_bytes(store, b, 1, mb, rng);

  store.release(b);
  EXPECT_EQ(store.pool().stats().used_pages, 3);
  append(a, 0, ma, 60);  // the freed pages are reused
  expect_stream_bytes(store, a, 0, ma, rng);
  expect_summaries(store, a, 0, ma);
}

TEST(PagedKVStore, ReleaseReturnsAllPagesAndTheIdIsGone) {
  const PageLayout l{32, kSmall.kv_heads, kSmall.head_dim, kSmall.kv_dtype};
  PagedKVStore store(kSmall, 32, 64 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  const SeqId s = store.add_sequence();
  const SeqId keep = store.add_sequence();
  for (int layer = 0; layer < kSmall.layers; ++layer) {
    const TokenBlock t = test::make_tokens(l, 0, 100 + layer * 33, 3);
    store.append(s, layer, t.key_view(l), t.value_view(l));
  }
  const TokenBlock k = test::make_tokens(l, 0, 5, 4);
  store.append(keep, 0, k.key_view(l), k.value_view(l));
  EXPECT_EQ(store.pool().stats().used_pages, 4 + 5 + 1);
  const std::vector<PageId> released(store.pages(s, 1).begin(), store.pages(s, 1).end());
  store.release(s);
  EXPECT_EQ(store.pool().stats().used_pages, 1);
  for (PageId p : released) EXPECT_FALSE(store.pool().is_allocated(p));
  EXPECT_FALSE(store.contains(s));
  EXPECT_TRUE(store.contains(keep));
  EXPECT_EQ(store.sequences(), std::vector<SeqId>{keep});
  EXPECT_THROW(store.release(s), InvalidArgument) << "double release";
  EXPECT_THROW((void)store.length(s, 0), InvalidArgument);
  const SeqId fresh = store.add_sequence();
  EXPECT_NE(fresh, s) << "ids are never reused";
  EXPECT_EQ(store.length(fresh, 0), 0);
}

TEST(PagedKVStore, ConcurrentAppendsToDistinctSequencesAreExact) {
  const PageLayout l{16, kSmall.kv_heads, kSmall.head_dim, DType::kFloat16};
  ModelShape shape = kSmall;
  shape.kv_dtype = DType::kFloat16;
  PagedKVStore store(shape, 16, 512 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  constexpr int kThreads = 4;
  std::vector<SeqId> seqs(kThreads);
  std::vector<StreamModel> models(kThreads * shape.layers);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      seqs[t] = store.add_sequence();  // add_sequence races with other threads' appends too
      std::mt19937 rng(t);
      for (int step = 0; step < 60; ++step) {
        const int layer = step % shape.layers;
        StreamModel& m = models[t * shape.layers + layer];
        const std::int64_t n = step < 10 ? std::uniform_int_distribution<int>(1, 40)(rng) : 1;
        const TokenBlock b = test::make_tokens(l, m.length, n, static_cast<std::uint32_t>(t * 10 + layer));
        store.append(seqs[t], layer, b.key_view(l), b.value_view(l));
        m.append(b);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::mt19937 rng(9);
  for (int t = 0; t < kThreads; ++t) {
    for (int layer = 0; layer < shape.layers; ++layer) {
      expect_stream_bytes(store, seqs[t], layer, models[t * shape.layers + layer], rng);
      expect_summaries(store, seqs[t], layer, models[t * shape.layers + layer]);
    }
  }
  for (SeqId s : seqs) store.release(s);
  EXPECT_EQ(store.pool().stats().used_pages, 0);
}

// Runs fn, expects InvalidArgument, and checks that the message holds every fragment.
template <class Fn>
void expect_rejects(Fn&& fn, std::initializer_list<const char*> fragments) {
  try {
    fn();
    ADD_FAILURE() << "no InvalidArgument thrown; expected a message with \"" << *fragments.begin() << "\"";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    for (const char* f : fragments) EXPECT_NE(msg.find(f), std::string::npos) << "\"" << f << "\" not in: " << msg;
  }
}

TEST(PagedKVStore, RejectsBadInputNamingArgumentAndValue) {
  const PageLayout l{16, kSmall.kv_heads, kSmall.head_dim, kSmall.kv_dtype};
  const std::size_t bytes = 32 * (l.page_bytes() + l.summary_bytes());
  ModelShape bad = kSmall;
  bad.head_dim = 96;
  expect_rejects([&] { PagedKVStore s(bad, 16, bytes); }, {"head_dim", "96"});
  expect_rejects([&] { PagedKVStore s(kSmall, 24, bytes); }, {"page_size", "(got 24)", "16, 32 or 64"});
  bad = kSmall;
  bad.layers = 0;
  expect_rejects([&] { PagedKVStore s(bad, 16, bytes); }, {"layers", "(got 0)"});
  expect_rejects([&] { PagedKVStore s(kSmall, 16, 100); }, {"pool_bytes", "(got 100)"});

  PagedKVStore store(kSmall, 16, bytes, HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  const TokenBlock good = test::make_tokens(l, 0, 3, 1);
  const TensorView k = good.key_view(l), v = good.value_view(l);
  constexpr SeqId kUnknown = 4242;

  expect_rejects([&] { store.append(kUnknown, 0, k, v); }, {"PagedKVStore::append", "seq", "4242"});
  expect_rejects([&] { store.append(seq, 2, k, v); }, {"PagedKVStore::append", "layer", "(got 2)", "[0, 2)"});
  expect_rejects([&] { store.append(seq, -1, k, v); }, {"layer", "(got -1)"});
  TensorView wrong = TensorView::contiguous(good.keys.data(), l.dtype, {3, 1, 128});
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys", "shape", "[*, 2, 64]", "[3, 1, 128]"});
  wrong = TensorView::contiguous(good.keys.data(), l.dtype, {3 * 2 * 64});
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys", "[*, 2, 64]"});
  wrong = TensorView::contiguous(good.values.data(), l.dtype, {2, 2, 64});
  expect_rejects([&] { store.append(seq, 0, k, wrong); }, {"values", "[3, 2, 64]", "(got bf16[2, 2, 64]"});
  wrong = TensorView::contiguous(good.keys.data(), DType::kFloat16, {3, 2, 64});
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys", "dtype bf16", "(got fp16)"});
  wrong = k;
  wrong.device = Device::kCuda;
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys.device", "(got cuda)"});
  wrong = v;
  wrong.device = Device::kCuda;
  expect_rejects([&] { store.append(seq, 0, k, wrong); }, {"values.device", "(got cuda)"});
  wrong = k;
  wrong.data = nullptr;
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys is null"});
  wrong = k;
  std::swap(wrong.stride[0], wrong.stride[1]);
  expect_rejects([&] { store.append(seq, 0, wrong, v); }, {"keys must be contiguous"});
  EXPECT_EQ(store.length(seq, 0), 0) << "rejected appends change nothing";
  EXPECT_EQ(store.pool().stats().used_pages, 0);

  store.append(seq, 0, k, v);
  TokenBlock out = test::make_tokens(l, 0, 2, 1);
  expect_rejects([&] { store.read(seq, 0, 2, 2, out.key_view(l), out.value_view(l)); },
                 {"PagedKVStore::read", "token range", "[2, 4)", "[0, 3)"});
  expect_rejects([&] { store.read(seq, 0, -1, 2, out.key_view(l), out.value_view(l)); }, {"token range", "[-1, 1)"});
  expect_rejects([&] { store.read(seq, 0, 0, 1, out.key_view(l), out.value_view(l)); },
                 {"keys_out", "[1, 2, 64]", "(got bf16[2, 2, 64]"});
  expect_rejects([&] { store.read(seq, 0, 0, 2, out.key_view(l), k); }, {"values_out", "[2, 2, 64]"});
  expect_rejects([&] { store.read(kUnknown, 0, 0, 1, out.key_view(l), out.value_view(l)); }, {"seq", "4242"});
  expect_rejects([&] { store.read(seq, 7, 0, 1, out.key_view(l), out.value_view(l)); }, {"layer", "(got 7)"});
  expect_rejects([&] { (void)store.length(kUnknown, 0); }, {"PagedKVStore::length", "seq", "4242"});
  expect_rejects([&] { (void)store.length(seq, 2); }, {"PagedKVStore::length", "layer", "(got 2)"});
  expect_rejects([&] { (void)store.pages(kUnknown, 0); }, {"PagedKVStore::pages", "4242"});
  expect_rejects([&] { (void)store.pages(seq, -3); }, {"PagedKVStore::pages", "(got -3)"});
  expect_rejects([&] { (void)store.group_summaries(kUnknown, 0); }, {"PagedKVStore::group_summaries", "4242"});
  expect_rejects([&] { (void)store.group_summaries(seq, 9); }, {"PagedKVStore::group_summaries", "(got 9)"});
  expect_rejects([&] { store.release(kUnknown); }, {"PagedKVStore::release", "seq", "4242"});
  EXPECT_EQ(store.length(seq, 0), 3);
}

TEST(PagedKVStore, EmptyAppendIsANoOp) {
  const PageLayout l{64, kSmall.kv_heads, kSmall.head_dim, kSmall.kv_dtype};
  PagedKVStore store(kSmall, 64, 8 * (l.page_bytes() + l.summary_bytes()), HostMemoryRequest::kAligned);
  const SeqId seq = store.add_sequence();
  const TokenBlock none = test::make_tokens(l, 0, 0, 1);
  store.append(seq, 1, none.key_view(l), none.value_view(l));
  EXPECT_EQ(store.length(seq, 1), 0);
  EXPECT_TRUE(store.pages(seq, 1).empty());
  EXPECT_TRUE(store.group_summaries(seq, 1).empty());
  EXPECT_EQ(store.pool().stats().used_pages, 0);
}

}  // namespace
}  // namespace hattn
