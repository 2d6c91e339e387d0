// The head zoo is deterministic and every head kind has the property it claims, checked with exact
// attention over the bf16 tokens it generates (8K context, Llama-3-8B and Qwen-like shapes).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "metrics.hpp"
#include "zoo/head_zoo.hpp"

namespace hattn::zoo {
namespace {

constexpr std::int64_t kContext = 8192;

ZooConfig llama_config(std::vector<int> layers, std::uint64_t seed = 7) {
  ZooConfig c;
  c.model = llama3_8b_shape();
  c.layers = std::move(layers);
  c.context_tokens = kContext;
  c.seed = seed;
  return c;
}

struct Tokens {
  std::vector<bfloat16_t> k, v;
};

Tokens generate(const HeadZoo& zoo, int layer, std::int64_t begin, std::int64_t n) {
  const std::size_t e = static_cast<std::size_t>(n) * zoo.shape().kv_heads * zoo.shape().head_dim;
  Tokens t{std::vector<bfloat16_t>(e), std::vector<bfloat16_t>(e)};
  zoo.tokens(layer, begin, n, t.k, t.v);
  return t;
}

TEST(HeadZoo, SameSeedSameTokensAndQueries) {
  const HeadZoo a(llama_config({0, 9})), b(llama_config({0, 9}));
  for (int layer = 0; layer < 2; ++layer) {
    const Tokens ta = generate(a, layer, 0, 2048), tb = generate(b, layer, 0, 2048);
    EXPECT_EQ(ta.k, tb.k);
    EXPECT_EQ(ta.v, tb.v);
    std::vector<float> qa(32 * 128), qb(32 * 128);
    a.query(layer, 3, qa);
    b.query(layer, 3, qb);
    EXPECT_EQ(qa, qb);
  }
}

TEST(HeadZoo, ChunkedGenerationEqualsWhole) {
  const HeadZoo zoo(llama_config({9}));
  const Tokens whole = generate(zoo, 0, 100, 300);
  const Tokens first = generate(zoo, 0, 100, 120), second = generate(zoo, 0, 220, 180);
  std::vector<bfloat16_t> k = first.k;
  k.insert(k.end(), second.k.begin(), second.k.end());
  std::vector<bfloat16_t> v = first.v;
  v.insert(v.end(), second.v.begin(), second.v.end());
  EXPECT_EQ(k, whole.k);
  EXPECT_EQ(v, whole.v);
}

TEST(HeadZoo, OtherSeedOtherTokens) {
  const HeadZoo a(llama_config({9}, 1)), b(llama_config({9}, 2));
  EXPECT_NE(generate(a, 0, 0, 64).k, generate(b, 0, 0, 64).k);
}

TEST(HeadZoo, LayerMixFollowsDuoAttentionPrior) {
  const HeadZoo zoo(llama_config({}));
  ASSERT_EQ(zoo.shape().layers, 32);
  std::vector<int> count(kHeadKinds, 0);
  for (int l = 0; l < 32; ++l) {
    int local = 0;
    for (int h = 0; h < 8; ++h) {
      ++count[static_cast<int>(zoo.kind(l, h))];
      local += zoo.kind(l, h) == HeadKind::kLocal;
    }
    EXPECT_EQ(local, local_heads_in_layer(l, 32, 8)) << "layer " << l;
  }
  EXPECT_EQ(local_heads_in_layer(0, 32, 8), 4);  // the first layers are mostly local
  EXPECT_EQ(count[static_cast<int>(HeadKind::kLocal)], 22);  // the prior's sum
  EXPECT_GT(count[static_cast<int>(HeadKind::kRetrieval)], 60);
  EXPECT_GT(count[static_cast<int>(HeadKind::kClustered)], 40);
  EXPECT_GT(count[static_cast<int>(HeadKind::kDiffuse)], 40);
  EXPECT_EQ(count[static_cast<int>(HeadKind::kGaussian)], 0);
  // Kinds belong to the model layer, not to which layers were generated.
  const HeadZoo sub(llama_config({3, 17}));
  for (int h = 0; h < 8; ++h) {
    EXPECT_EQ(sub.kind(0, h), zoo.kind(3, h));
    EXPECT_EQ(sub.kind(1, h), zoo.kind(17, h));
  }
}

TEST(HeadZoo, RejectsBadConfig) {
  ZooConfig c = llama_config({40});
  EXPECT_THROW(HeadZoo{c}, InvalidArgument);
  c = llama_config({0});
  c.context_tokens = 512;
  EXPECT_THROW(HeadZoo{c}, InvalidArgument);
  const HeadZoo zoo(llama_config({0}), 8);
  std::vector<float> q(32 * 128);
  EXPECT_THROW(zoo.query(0, 8, q), InvalidArgument);
  Tokens t{std::vector<bfloat16_t>(8 * 128), std::vector<bfloat16_t>(8 * 128)};
  EXPECT_THROW(zoo.tokens(0, kContext + 8, 1, t.k, t.v), InvalidArgument);
}

// Per-token exact attention mass of every query head of one generated layer (page size 1).
struct LayerMass {
  eval::ExactLayer exact;
  std::int64_t n = 0;
};

LayerMass token_mass(const HeadZoo& zoo, int layer, int step) {
  const std::int64_t n = zoo.step_position(step) + 1;  // the prompt plus the tokens of steps 0..step
  const Tokens t = generate(zoo, layer, 0, n);
  std::vector<float> q(static_cast<std::size_t>(zoo.shape().q_heads) * zoo.shape().head_dim);
  zoo.query(layer, step, q);
  return {eval::exact_layer(t.k, t.v, n, zoo.shape(), q, zoo.scale(), 1), n};
}

// Layers 0 (4 local heads), 9, 19 and 24: every kind is present.
class HeadProperties : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    zoo_ = new HeadZoo(llama_config({0, 9, 19, 24}));
    for (int l = 0; l < 4; ++l) mass_.push_back(token_mass(*zoo_, l, 0));
  }
  static void TearDownTestSuite() {
    delete zoo_;
    mass_.clear();
  }
  static std::span<const double> head_mass(int layer, int qh) {
    const auto& m = mass_[layer];
    return std::span<const double>(m.exact.page_mass).subspan(static_cast<std::size_t>(qh) * m.n, m.n);
  }
  template <class F>
  static int for_heads(HeadKind kind, F f) {
    int seen = 0;
    for (int l = 0; l < 4; ++l)
      for (int h = 0; h < 8; ++h)
        if (zoo_->kind(l, h) == kind) {
          ++seen;
          for (int g = 0; g < 4; ++g) f(l, h, h * 4 + g, head_mass(l, h * 4 + g));
        }
    return seen;
  }
  static HeadZoo* zoo_;
  static std::vector<LayerMass> mass_;
};
HeadZoo* HeadProperties::zoo_ = nullptr;
std::vector<LayerMass> HeadProperties::mass_;

TEST_F(HeadProperties, SinksOutweighAlmostEveryToken) {
  // Against background tokens: not in a needle or distractor span, not in the head's target topic,
  // not in the last 512 tokens (a local head's window).
  const int sinks = zoo_->config().sink_tokens;
  for (HeadKind kind : {HeadKind::kLocal, HeadKind::kRetrieval, HeadKind::kClustered, HeadKind::kDiffuse}) {
    const int seen = for_heads(kind, [&](int l, int h, int qh, std::span<const double> m) {
      std::vector<char> content(m.size(), 0);
      for (auto spans : {zoo_->needles(l, h), zoo_->distractors(l, h)})
        for (const Span& s : spans) std::fill_n(content.begin() + s.begin, s.length, 1);
      const int topic = zoo_->target_cluster(l, h, 0);
      std::vector<double> rest;
      for (std::size_t p = sinks; p + 512 < m.size(); ++p)
        if (!content[p] && (topic < 0 || zoo_->cluster_of(l, h, static_cast<std::int64_t>(p)) != topic)) rest.push_back(m[p]);
      std::nth_element(rest.begin(), rest.begin() + rest.size() * 99 / 100, rest.end());
      const double p99 = rest[rest.size() * 99 / 100];
      for (int s = 0; s < sinks; ++s)
        EXPECT_GT(m[s], p99) << to_string(kind) << " layer " << l << " head " << h << " q " << qh << " sink " << s;
    });
    EXPECT_GT(seen, 0) << to_string(kind);
  }
  // In diffuse heads a sink is the single heaviest token.
  for_heads(HeadKind::kDiffuse, [&](int l, int h, int qh, std::span<const double> m) {
    const auto top = std::max_element(m.begin(), m.end()) - m.begin();
    EXPECT_LT(top, sinks) << "layer " << l << " head " << h << " q " << qh;
  });
}

TEST_F(HeadProperties, LocalHeadsAttendTheirWindow) {
  const int seen = for_heads(HeadKind::kLocal, [&](int l, int h, int qh, std::span<const double> m) {
    const double window = std::accumulate(m.end() - 512, m.end(), 0.0);
    const double sinks = std::accumulate(m.begin(), m.begin() + zoo_->config().sink_tokens, 0.0);
    EXPECT_GT(window + sinks, 0.9) << "layer " << l << " head " << h << " q " << qh;
    EXPECT_GT(window, 0.5) << "layer " << l << " head " << h << " q " << qh;
  });
  EXPECT_GE(seen, 4);
}

TEST_F(HeadProperties, RetrievalHeadsFindTheirNeedle) {
  const int seen = for_heads(HeadKind::kRetrieval, [&](int l, int h, int qh, std::span<const double> m) {
    const auto targets = zoo_->targets(l, h, 0);
    ASSERT_EQ(targets.size(), 1u);
    const Span t = targets[0];
    const auto top = std::max_element(m.begin(), m.end()) - m.begin();
    EXPECT_TRUE(top >= t.begin && top < t.begin + t.length)
        << "layer " << l << " head " << h << " q " << qh << ": top token " << top << ", needle [" << t.begin << ", "
        << t.begin + t.length << ")";
    const double needle = std::accumulate(m.begin() + t.begin, m.begin() + t.begin + t.length, 0.0);
    EXPECT_GT(needle, 0.25) << "layer " << l << " head " << h << " q " << qh;
    // Distractors are near duplicates: together they draw real mass, each less than the needle.
    double distract = 0;
    const double needle_top = *std::max_element(m.begin() + t.begin, m.begin() + t.begin + t.length);
    for (const Span& d : zoo_->distractors(l, h)) {
      distract += std::accumulate(m.begin() + d.begin, m.begin() + d.begin + d.length, 0.0);
      EXPECT_LT(*std::max_element(m.begin() + d.begin, m.begin() + d.begin + d.length), needle_top);
    }
    EXPECT_GT(distract, 1e-4) << "layer " << l << " head " << h;
  });
  EXPECT_GT(seen, 0);
}

TEST_F(HeadProperties, ClusteredHeadsAttendTheirTopic) {
  const int seen = for_heads(HeadKind::kClustered, [&](int l, int h, int qh, std::span<const double> m) {
    const int target = zoo_->target_cluster(l, h, 0);
    double mass = 0;
    std::int64_t tokens = 0;
    for (std::int64_t p = 0; p < static_cast<std::int64_t>(m.size()); ++p)
      if (zoo_->cluster_of(l, h, p) == target) mass += m[p], ++tokens;
    const double share = static_cast<double>(tokens) / static_cast<double>(m.size());
    EXPECT_GT(mass, 0.3) << "layer " << l << " head " << h << " q " << qh;
    EXPECT_GT(mass, 5 * share) << "layer " << l << " head " << h << " q " << qh;
  });
  EXPECT_GT(seen, 0);
}

TEST_F(HeadProperties, DiffuseHeadsSpreadTheirMass) {
  const int seen = for_heads(HeadKind::kDiffuse, [&](int l, int h, int qh, std::span<const double> m) {
    // Beyond the sinks and the last 512 tokens there is still a real share of the mass.
    const double middle = std::accumulate(m.begin() + zoo_->config().sink_tokens, m.end() - 512, 0.0);
    EXPECT_GT(middle, 0.1) << "layer " << l << " head " << h << " q " << qh;
  });
  EXPECT_GT(seen, 0);
}

TEST(HeadZoo, GaussianSanityHeadsAreNearlyUniform) {
  ZooConfig c = llama_config({0});
  c.gaussian_only = true;
  const HeadZoo zoo(c);
  const LayerMass m = token_mass(zoo, 0, 0);
  for (int qh = 0; qh < 32; ++qh) {
    const auto head = std::span<const double>(m.exact.page_mass).subspan(static_cast<std::size_t>(qh) * m.n, m.n);
    EXPECT_LT(*std::max_element(head.begin(), head.end()), 0.02) << "q " << qh;
  }
}

TEST(HeadZoo, QueriesDriftAndRetrievalTargetsMove) {
  const HeadZoo zoo(llama_config({9}));
  const int dim = 128;
  std::vector<float> q0(32 * dim), q1(32 * dim);
  zoo.query(0, 0, q0);
  zoo.query(0, 1, q1);
  for (int qh = 0; qh < 32; ++qh) {
    double dot = 0, n0 = 0, n1 = 0;
    for (int d = 0; d < dim; ++d) {
      dot += static_cast<double>(q0[qh * dim + d]) * q1[qh * dim + d];
      n0 += static_cast<double>(q0[qh * dim + d]) * q0[qh * dim + d];
      n1 += static_cast<double>(q1[qh * dim + d]) * q1[qh * dim + d];
    }
    const double cosine = dot / std::sqrt(n0 * n1);
    EXPECT_LT(cosine, 0.9999) << "q " << qh << " did not drift";
    EXPECT_GT(cosine, 0.5) << "q " << qh << " jumped";
  }
  int retrieval = 0;
  for (int h = 0; h < 8; ++h) {
    if (zoo.kind(0, h) != HeadKind::kRetrieval) continue;
    ++retrieval;
    const int k = zoo.config().steps_per_target;
    EXPECT_EQ(zoo.targets(0, h, 0), zoo.targets(0, h, k - 1));
    EXPECT_NE(zoo.targets(0, h, 0), zoo.targets(0, h, k));
  }
  EXPECT_GT(retrieval, 0);
}

TEST(HeadZoo, QwenShapeHasGroupSeven) {
  ZooConfig c;
  c.model = qwen_shape();
  c.layers = {0, 14};
  c.context_tokens = kContext;
  const HeadZoo zoo(c);
  EXPECT_EQ(zoo.shape().group_size(), 7);
  EXPECT_EQ(zoo.shape().kv_heads, 4);
  std::vector<float> q(28 * 128);
  zoo.query(1, 0, q);
  EXPECT_TRUE(std::all_of(q.begin(), q.end(), [](float x) { return std::isfinite(x); }));
  int local = 0;
  for (int h = 0; h < 4; ++h) local += zoo.kind(0, h) == HeadKind::kLocal;
  EXPECT_EQ(local, local_heads_in_layer(0, 28, 4));
  EXPECT_EQ(local, 2);
}

}  // namespace
}  // namespace hattn::zoo
