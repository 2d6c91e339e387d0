#include "zoo/head_zoo.hpp"

#include <algorithm>
#include <array>
#include <cmath>

#include "hattn/core/error.hpp"

namespace hattn::zoo {

const char* to_string(HeadKind k) noexcept {
  switch (k) {
    case HeadKind::kLocal: return "local";
    case HeadKind::kRetrieval: return "retrieval";
    case HeadKind::kClustered: return "clustered";
    case HeadKind::kDiffuse: return "diffuse";
    case HeadKind::kGaussian: return "gaussian";
  }
  return "unknown";
}

ModelShape llama3_8b_shape() { return {.layers = 32, .q_heads = 32, .kv_heads = 8, .head_dim = 128, .kv_dtype = DType::kBFloat16}; }
ModelShape qwen_shape() { return {.layers = 28, .q_heads = 28, .kv_heads = 4, .head_dim = 128, .kv_dtype = DType::kBFloat16}; }

namespace {

// DuoAttention, Llama-3.1-8B-Instruct: KV heads per layer (of 8) with gate < 0.5, i.e. heads a sink
// plus a recent window serve (papers.md).
constexpr std::array<int, 32> kDuoLocalHeads = {4, 3, 3, 4, 2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0};

// splitmix64's finaliser: a counter-based generator, so any token is generated on its own.
constexpr std::uint64_t mix(std::uint64_t x) noexcept {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr std::uint64_t key_of(std::uint64_t a, std::uint64_t b) noexcept { return mix(a ^ mix(b)); }

// A stream of standard normals (Irwin-Hall of four 16-bit uniforms, rescaled to unit variance):
// cheap enough for 128K tokens x 8 heads x 256 draws in about a second, tails cut at 3.46 sd, which
// is all the noise of a synthetic head needs.
class Normals {
 public:
  explicit Normals(std::uint64_t key) : state_(key) {}
  float next() noexcept {
    state_ += 0x9e3779b97f4a7c15ull;
    const std::uint64_t h = mix(state_);
    const std::uint32_t s = static_cast<std::uint32_t>(h & 0xffff) + static_cast<std::uint32_t>((h >> 16) & 0xffff) +
                            static_cast<std::uint32_t>((h >> 32) & 0xffff) + static_cast<std::uint32_t>(h >> 48);
    constexpr float kScale = 1.7320508f / 65536.0f;  // sqrt(3) / 2^16: variance of 4 U(0,1) is 1/3
    return (static_cast<float>(s) - 131070.0f) * kScale;
  }
  double uniform() noexcept {
    state_ += 0x9e3779b97f4a7c15ull;
    return static_cast<double>(mix(state_) >> 11) * 0x1.0p-53;
  }

 private:
  std::uint64_t state_;
};

// Stream ids keep independent draws apart.
enum Stream : std::uint64_t { kKeyNoise = 1, kValueNoise, kQueryNoise, kStructure, kDriftStream, kClusterRun };

void normalise(std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  const float inv = s > 0 ? static_cast<float>(1.0 / std::sqrt(s)) : 0.0f;
  for (float& x : v) x *= inv;
}

// A random unit vector supported on rotary pairs [first, last): dims i and i + dim/2 of each pair.
std::vector<float> pair_direction(Normals& rng, int dim, int first, int last) {
  std::vector<float> v(static_cast<std::size_t>(dim), 0.0f);
  const int half = dim / 2;
  for (int i = first; i < last; ++i) {
    v[i] = rng.next();
    v[i + half] = rng.next();
  }
  normalise(v);
  return v;
}

// Recency vector: equal energy in every pair of [first, last), so u.R(d)u = mean over pairs of
// cos(theta_i d): 1 at d = 0, decaying over about 1 / theta of the slowest pair included.
std::vector<float> recency_vector(Normals& rng, int dim, int first, int last) {
  std::vector<float> v(static_cast<std::size_t>(dim), 0.0f);
  const int half = dim / 2;
  const float r = 1.0f / std::sqrt(static_cast<float>(last - first));
  for (int i = first; i < last; ++i) {
    const double a = 6.283185307179586 * rng.uniform();
    v[i] = r * static_cast<float>(std::cos(a));
    v[i + half] = r * static_cast<float>(std::sin(a));
  }
  return v;
}

std::vector<float> full_direction(Normals& rng, int dim) {
  std::vector<float> v(static_cast<std::size_t>(dim));
  for (float& x : v) x = rng.next();
  normalise(v);
  return v;
}

// Content directions (needles, distractors, topics) avoid the recency and sink pairs: a content
// query projected on the strong sink or recency key parts would add logit noise of several units.
std::vector<float> content_direction(Normals& rng, int dim, int recency_begin, int recency_end, int sink_begin) {
  std::vector<float> v(static_cast<std::size_t>(dim), 0.0f);
  const int half = dim / 2;
  for (int i = 0; i < sink_begin; ++i) {
    if (i >= recency_begin && i < recency_end) continue;
    v[i] = rng.next();
    v[i + half] = rng.next();
  }
  normalise(v);
  return v;
}

float between(Normals& rng, float lo, float hi) { return lo + static_cast<float>(rng.uniform()) * (hi - lo); }

// Key-side norms of the structured components; queries get the coefficient that gives the target
// logit (logit = scale * key_norm * query_coefficient). They are large next to the key noise (norm
// sqrt(head_dim)) as real keys' structured directions are: a query coefficient c turns the key noise
// into logit noise of sd scale * c, so small norms would drown every structure in noise.
constexpr float kSinkKeyNorm = 24.0f;
constexpr float kRecencyKeyNorm = 16.0f;
constexpr float kContentKeyNorm = 20.0f;
constexpr float kSinkKeyNoise = 0.2f;
constexpr float kContentQueryNoise = 0.3f;
// Rotary pairs (of head_dim / 2): recency lives on the fast pairs, the sink on the slowest ones
// (a sink's own rotation at positions < 4 is negligible there, and no other key has mass there).
// Pairs [8, 40) (wavelengths 40 to 18K tokens) with a peak logit of 15-16 put 97-99% of a local
// head's mass in its last 512 tokens at 8K and 128K alike; the fastest pairs are left out because
// their far-field sum of cosines adds noise without sharpening the window.
constexpr int kRecencyPairsBegin = 8;
constexpr int kRecencyPairsEnd = 40;
constexpr int kSinkPairsFromEnd = 8;
// Value norms relative to sqrt(head_dim): sinks carry little value (the "no-op" role of a sink),
// needles a distinct large one, so missing a needle changes the output.
constexpr float kSinkValueScale = 0.2f;
constexpr float kNeedleValueNorm = 3.0f;
// Query drift: AR(1) with this correlation step to step.
constexpr float kDriftRho = 0.9f;
constexpr float kContentDrift = 0.25f;

}  // namespace

struct HeadZoo::Head {
  HeadKind kind = HeadKind::kDiffuse;
  std::uint64_t key = 0;
  float noise_logit = 1.0f;  // sd of the logits the query noise gives against unit-variance key noise
  float sink_logit = 0, recency_logit = 0, content_logit = 0;
  std::vector<float> sink_dir, recency, value_mean;
  std::vector<Span> needles, distractors;  // distractors sorted by position after construction
  std::vector<std::vector<float>> needle_dir, needle_value;
  std::vector<std::vector<float>> distractor_dir, distractor_value;  // parallel to distractors
  std::vector<std::vector<float>> cluster_dir;
  int cluster_run = 256;
  int target_offset = 0;
  // All content spans sorted by begin, with their index: needles first (i < groups) then distractors.
  std::vector<std::pair<Span, int>> spans;
};

int local_heads_in_layer(int model_layer, int layers, int kv_heads) {
  detail::require(layers > 0, "local_heads_in_layer", "layers", layers, "> 0");
  detail::require(model_layer >= 0 && model_layer < layers, "local_heads_in_layer", "model_layer", model_layer,
                  "in [0, ", layers, ")");
  const int src = static_cast<int>(static_cast<std::int64_t>(model_layer) * 32 / layers);
  return std::min(kv_heads, static_cast<int>(std::lround(kDuoLocalHeads[src] * kv_heads / 8.0)));
}

HeadZoo::HeadZoo(ZooConfig config, int max_steps) : config_(std::move(config)), max_steps_(max_steps) {
  const ModelShape& m = config_.model;
  m.validate();
  detail::require(max_steps >= 1, "HeadZoo", "max_steps", max_steps, ">= 1");
  detail::require(config_.sink_tokens >= 0, "HeadZoo", "sink_tokens", config_.sink_tokens, ">= 0");
  detail::require(config_.context_tokens > config_.sink_tokens + 1024, "HeadZoo", "context_tokens",
                  config_.context_tokens, "> sink_tokens + 1024");
  detail::require(config_.needle_groups >= 1, "HeadZoo", "needle_groups", config_.needle_groups, ">= 1");
  detail::require(config_.distractors_per_group >= 0, "HeadZoo", "distractors_per_group",
                  config_.distractors_per_group, ">= 0");
  detail::require(config_.steps_per_target >= 1, "HeadZoo", "steps_per_target", config_.steps_per_target, ">= 1");
  detail::require(config_.clusters >= 2, "HeadZoo", "clusters", config_.clusters, ">= 2");
  detail::require(config_.rope_base > 1, "HeadZoo", "rope_base", config_.rope_base, "> 1");
  if (config_.layers.empty())
    for (int l = 0; l < m.layers; ++l) config_.layers.push_back(l);
  for (int l : config_.layers)
    detail::require(l >= 0 && l < m.layers, "HeadZoo", "layers[i]", l, "in [0, ", m.layers, ")");
  shape_ = m;
  shape_.layers = static_cast<int>(config_.layers.size());

  const int dim = m.head_dim, half = dim / 2;
  const std::int64_t positions = config_.context_tokens + max_steps;
  cos_.resize(static_cast<std::size_t>(positions) * half);
  sin_.resize(cos_.size());
  std::vector<double> theta(static_cast<std::size_t>(half));
  for (int i = 0; i < half; ++i) theta[i] = std::pow(config_.rope_base, -2.0 * i / dim);
  for (std::int64_t p = 0; p < positions; ++p)
    for (int i = 0; i < half; ++i) {
      const double a = static_cast<double>(p) * theta[i];
      cos_[static_cast<std::size_t>(p) * half + i] = static_cast<float>(std::cos(a));
      sin_[static_cast<std::size_t>(p) * half + i] = static_cast<float>(std::sin(a));
    }

  // Kinds over the whole model, so a layer's heads do not depend on which layers are generated:
  // local heads from the DuoAttention prior, the rest cycling retrieval/clustered/diffuse 4:3:3
  // from a seeded offset.
  std::vector<HeadKind> kinds(static_cast<std::size_t>(m.layers) * m.kv_heads);
  Normals assign(key_of(config_.seed, 0xa551));
  const int offset = static_cast<int>(assign.uniform() * 10);
  int counter = 0;
  for (int l = 0; l < m.layers; ++l) {
    std::vector<int> order(static_cast<std::size_t>(m.kv_heads));
    for (int h = 0; h < m.kv_heads; ++h) order[h] = h;
    for (int h = m.kv_heads - 1; h > 0; --h)
      std::swap(order[h], order[static_cast<int>(assign.uniform() * (h + 1))]);
    const int n_local = local_heads_in_layer(l, m.layers, m.kv_heads);
    for (int i = 0; i < m.kv_heads; ++i) {
      HeadKind k;
      if (config_.gaussian_only) k = HeadKind::kGaussian;
      else if (i < n_local) k = HeadKind::kLocal;
      else {
        const int c = (counter++ + offset) % 10;
        k = c < 4 ? HeadKind::kRetrieval : c < 7 ? HeadKind::kClustered : HeadKind::kDiffuse;
      }
      kinds[static_cast<std::size_t>(l) * m.kv_heads + order[i]] = k;
    }
  }

  heads_.resize(static_cast<std::size_t>(shape_.layers) * m.kv_heads);
  const std::int64_t ctx = config_.context_tokens;
  for (int layer = 0; layer < shape_.layers; ++layer) {
    const int ml = config_.layers[layer];
    for (int kvh = 0; kvh < m.kv_heads; ++kvh) {
      Head& h = heads_[static_cast<std::size_t>(layer) * m.kv_heads + kvh];
      h.kind = kinds[static_cast<std::size_t>(ml) * m.kv_heads + kvh];
      h.key = key_of(key_of(config_.seed, static_cast<std::uint64_t>(ml) + 1), static_cast<std::uint64_t>(kvh) + 1000);
      Normals rng(key_of(h.key, kStructure));
      h.sink_dir = pair_direction(rng, dim, half - kSinkPairsFromEnd, half);
      h.recency = recency_vector(rng, dim, kRecencyPairsBegin, kRecencyPairsEnd);
      h.value_mean.resize(static_cast<std::size_t>(dim));
      for (float& x : h.value_mean) x = 0.5f * rng.next();
      switch (h.kind) {
        case HeadKind::kLocal:
          h.noise_logit = 0.7f, h.sink_logit = between(rng, 7, 9), h.recency_logit = between(rng, 15, 16);
          break;
        case HeadKind::kRetrieval:
          h.noise_logit = 0.7f, h.sink_logit = between(rng, 6, 8), h.recency_logit = between(rng, 2, 3);
          h.content_logit = between(rng, 12, 14);
          break;
        case HeadKind::kClustered:
          h.noise_logit = 0.7f, h.sink_logit = between(rng, 7.5f, 9.5f), h.recency_logit = between(rng, 2, 3);
          h.content_logit = between(rng, 4.5f, 6);
          break;
        case HeadKind::kDiffuse:
          h.noise_logit = 1.2f, h.sink_logit = between(rng, 9, 10.5f), h.recency_logit = between(rng, 1.5f, 2.5f);
          break;
        case HeadKind::kGaussian:
          h.noise_logit = 1.0f;
          std::fill(h.value_mean.begin(), h.value_mean.end(), 0.0f);
          break;
      }
      h.target_offset = static_cast<int>(rng.uniform() * 1024);
      if (h.kind == HeadKind::kRetrieval) {
        // Spans inside the prompt, clear of the sinks and of the last 5% (the local window's reach),
        // never overlapping, so the ground truth of a needle is unambiguous.
        std::vector<Span> taken;
        auto place = [&](int group) {
          for (int attempt = 0; attempt < 1000; ++attempt) {
            const int len = 4 + static_cast<int>(rng.uniform() * 13);
            const std::int64_t lo = std::max<std::int64_t>(config_.sink_tokens + 64, ctx / 50);
            const std::int64_t hi = ctx * 95 / 100 - len;
            const std::int64_t b = lo + static_cast<std::int64_t>(rng.uniform() * static_cast<double>(hi - lo));
            const bool clash = std::any_of(taken.begin(), taken.end(), [&](const Span& s) {
              return b < s.begin + s.length + 1 && s.begin < b + len + 1;
            });
            if (!clash) {
              taken.push_back({b, len, group});
              return taken.back();
            }
          }
          throw InvalidArgument(detail::concat("HeadZoo: context_tokens ", ctx, " too short for ",
                                               config_.needle_groups * (1 + config_.distractors_per_group),
                                               " needle and distractor spans"));
        };
        for (int g = 0; g < config_.needle_groups; ++g) {
          h.needles.push_back(place(g));
          h.needle_dir.push_back(content_direction(rng, dim, kRecencyPairsBegin, kRecencyPairsEnd, half - kSinkPairsFromEnd));
          h.needle_value.push_back(full_direction(rng, dim));
        }
        for (int g = 0; g < config_.needle_groups; ++g)
          for (int d = 0; d < config_.distractors_per_group; ++d) {
            h.distractors.push_back(place(g));
            // A near duplicate: cosine 0.45 to 0.7 with its needle's direction (4 to 7 logits
            // below the needle, so a group of them still draws real mass).
            const float c = between(rng, 0.45f, 0.7f);
            std::vector<float> r = content_direction(rng, dim, kRecencyPairsBegin, kRecencyPairsEnd, half - kSinkPairsFromEnd);
            double dot = 0;
            for (int i = 0; i < dim; ++i) dot += static_cast<double>(r[i]) * h.needle_dir[g][i];
            for (int i = 0; i < dim; ++i) r[i] -= static_cast<float>(dot) * h.needle_dir[g][i];
            normalise(r);
            const float s = std::sqrt(1 - c * c);
            std::vector<float> dir(static_cast<std::size_t>(dim));
            for (int i = 0; i < dim; ++i) dir[i] = c * h.needle_dir[g][i] + s * r[i];
            h.distractor_dir.push_back(std::move(dir));
            h.distractor_value.push_back(full_direction(rng, dim));
          }
        for (std::size_t i = 0; i < h.needles.size(); ++i) h.spans.push_back({h.needles[i], static_cast<int>(i)});
        for (std::size_t i = 0; i < h.distractors.size(); ++i)
          h.spans.push_back({h.distractors[i], static_cast<int>(h.needles.size() + i)});
        std::sort(h.spans.begin(), h.spans.end(),
                  [](const auto& a, const auto& b) { return a.first.begin < b.first.begin; });
      }
      if (h.kind == HeadKind::kClustered) {
        h.cluster_run = 64 + static_cast<int>(rng.uniform() * 193);  // topic runs of 64..256 tokens
        for (int c = 0; c < config_.clusters; ++c)
          h.cluster_dir.push_back(content_direction(rng, dim, kRecencyPairsBegin, kRecencyPairsEnd, half - kSinkPairsFromEnd));
      }
    }
  }
}

HeadZoo::~HeadZoo() = default;
HeadZoo::HeadZoo(HeadZoo&&) noexcept = default;
HeadZoo& HeadZoo::operator=(HeadZoo&&) noexcept = default;

float HeadZoo::scale() const noexcept { return 1.0f / std::sqrt(static_cast<float>(shape_.head_dim)); }

const HeadZoo::Head& HeadZoo::head(int layer, int kv_head) const {
  detail::require(layer >= 0 && layer < shape_.layers, "HeadZoo", "layer", layer,
                  "in [0, ", shape_.layers, ")");
  detail::require(kv_head >= 0 && kv_head < shape_.kv_heads, "HeadZoo", "kv_head", kv_head,
                  "in [0, ", shape_.kv_heads, ")");
  return heads_[static_cast<std::size_t>(layer) * shape_.kv_heads + kv_head];
}

HeadKind HeadZoo::kind(int layer, int kv_head) const { return head(layer, kv_head).kind; }
std::span<const Span> HeadZoo::needles(int layer, int kv_head) const { return head(layer, kv_head).needles; }
std::span<const Span> HeadZoo::distractors(int layer, int kv_head) const { return head(layer, kv_head).distractors; }

std::vector<Span> HeadZoo::targets(int layer, int kv_head, int step) const {
  const Head& h = head(layer, kv_head);
  if (h.needles.empty()) return {};
  const int g = (h.target_offset + step / config_.steps_per_target) % static_cast<int>(h.needles.size());
  return {h.needles[g]};
}

int HeadZoo::cluster_of(int layer, int kv_head, std::int64_t position) const {
  const Head& h = head(layer, kv_head);
  if (h.cluster_dir.empty()) return -1;
  // Every topic once per cycle of `clusters` runs, each cycle rotated by a hash: every topic occurs
  // in any context of clusters * cluster_run tokens, in no fixed period.
  const std::int64_t run = position / h.cluster_run;
  const auto c = static_cast<std::int64_t>(h.cluster_dir.size());
  const auto shift = static_cast<std::int64_t>(key_of(key_of(h.key, kClusterRun), static_cast<std::uint64_t>(run / c)) %
                                               static_cast<std::uint64_t>(c));
  return static_cast<int>((run * 7 % c + shift) % c);
}

int HeadZoo::target_cluster(int layer, int kv_head, int step) const {
  const Head& h = head(layer, kv_head);
  if (h.cluster_dir.empty()) return -1;
  return (h.target_offset + step / (2 * config_.steps_per_target)) % static_cast<int>(h.cluster_dir.size());
}

void HeadZoo::key_value(const Head& h, int layer, int kv_head, std::int64_t p, bfloat16_t* k, bfloat16_t* v) const {
  const int dim = shape_.head_dim, half = dim / 2;
  float k0[256], vv[256];
  Normals kn(key_of(key_of(h.key, kKeyNoise), static_cast<std::uint64_t>(p)));
  Normals vn(key_of(key_of(h.key, kValueNoise), static_cast<std::uint64_t>(p)));
  for (int d = 0; d < dim; ++d) k0[d] = kn.next();
  for (int d = 0; d < dim; ++d) vv[d] = vn.next();
  if (h.kind != HeadKind::kGaussian) {
    const bool sink = p < config_.sink_tokens;
    // A sink's key is its own outlier: its direction dominates (little noise) and it has no recency
    // part, or the far-field sum of cosines at the sink's distance would move its logit by several
    // units from one context length to another.
    if (sink)
      for (int d = 0; d < dim; ++d) k0[d] *= kSinkKeyNoise;
    for (int d = 0; d < dim; ++d) {
      k0[d] += sink ? kSinkKeyNorm * h.sink_dir[d] : kRecencyKeyNorm * h.recency[d];
      vv[d] = sink ? kSinkValueScale * vv[d] : vv[d] + h.value_mean[d];
    }
  }
  // Rotary embedding at position p (half-split pairs).
  const float* c = &cos_[static_cast<std::size_t>(p) * half];
  const float* s = &sin_[static_cast<std::size_t>(p) * half];
  float kr[256];
  for (int i = 0; i < half; ++i) {
    kr[i] = k0[i] * c[i] - k0[i + half] * s[i];
    kr[i + half] = k0[i] * s[i] + k0[i + half] * c[i];
  }
  // Position-free content: needle / distractor spans and topic clusters.
  const float content = kContentKeyNorm;
  const float value_norm = kNeedleValueNorm * std::sqrt(static_cast<float>(dim));
  if (!h.spans.empty()) {
    auto it = std::upper_bound(h.spans.begin(), h.spans.end(), p,
                               [](std::int64_t x, const auto& s) { return x < s.first.begin; });
    if (it != h.spans.begin()) {
      --it;
      if (p < it->first.begin + it->first.length) {
        const int idx = it->second;
        const int groups = static_cast<int>(h.needles.size());
        const auto& dir = idx < groups ? h.needle_dir[idx] : h.distractor_dir[idx - groups];
        const auto& val = idx < groups ? h.needle_value[idx] : h.distractor_value[idx - groups];
        for (int d = 0; d < dim; ++d) {
          kr[d] += content * dir[d];
          vv[d] = value_norm * val[d] + 0.3f * vv[d];
        }
      }
    }
  }
  if (!h.cluster_dir.empty()) {
    const auto& dir = h.cluster_dir[static_cast<std::size_t>(cluster_of(layer, kv_head, p))];
    for (int d = 0; d < dim; ++d) kr[d] += content * dir[d];
  }
  for (int d = 0; d < dim; ++d) {
    k[d] = to_bfloat16(kr[d]);
    v[d] = to_bfloat16(vv[d]);
  }
}

void HeadZoo::tokens(int layer, std::int64_t begin, std::int64_t n, std::span<bfloat16_t> keys,
                     std::span<bfloat16_t> values) const {
  const int heads = shape_.kv_heads, dim = shape_.head_dim;
  detail::require(begin >= 0 && n >= 0 && begin + n <= config_.context_tokens + max_steps_, "HeadZoo::tokens",
                  "[begin, begin + n)", detail::concat("[", begin, ", ", begin + n, ")"),
                  "inside [0, ", config_.context_tokens + max_steps_, ")");
  const std::size_t need = static_cast<std::size_t>(n) * heads * dim;
  detail::require(keys.size() >= need && values.size() >= need, "HeadZoo::tokens", "keys/values size",
                  std::min(keys.size(), values.size()), ">= n * kv_heads * head_dim = ", need);
  for (int kvh = 0; kvh < heads; ++kvh) {
    const Head& h = head(layer, kvh);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::size_t off = (static_cast<std::size_t>(i) * heads + kvh) * dim;
      key_value(h, layer, kvh, begin + i, &keys[off], &values[off]);
    }
  }
}

void HeadZoo::query(int layer, int step, std::span<float> q) const {
  const int dim = shape_.head_dim, half = dim / 2, group = shape_.group_size();
  detail::require(step >= 0 && step < max_steps_, "HeadZoo::query", "step", step,
                  "in [0, ", max_steps_, ")");
  detail::require(q.size() == static_cast<std::size_t>(shape_.q_heads) * dim, "HeadZoo::query", "q.size()", q.size(),
                  "q_heads * head_dim");
  const float sc = scale();
  const std::int64_t t = step_position(step);
  const float* c = &cos_[static_cast<std::size_t>(t) * half];
  const float* s = &sin_[static_cast<std::size_t>(t) * half];
  for (int kvh = 0; kvh < shape_.kv_heads; ++kvh) {
    const Head& h = head(layer, kvh);
    // Recency vector rotated to the query's position: lines up with the keys just behind it.
    float rec[256];
    for (int i = 0; i < half; ++i) {
      rec[i] = h.recency[i] * c[i] - h.recency[i + half] * s[i];
      rec[i + half] = h.recency[i] * s[i] + h.recency[i + half] * c[i];
    }
    // Content drift shared by the group (one KV head's queries look for the same thing).
    std::vector<float> drift(static_cast<std::size_t>(dim), 0.0f);
    {
      Normals dn(key_of(h.key, kDriftStream));
      for (int st = 0; st <= step; ++st)
        for (int d = 0; d < dim; ++d)
          drift[d] = (st == 0 ? 0.0f : kDriftRho * drift[d]) + (st == 0 ? 1.0f : std::sqrt(1 - kDriftRho * kDriftRho)) * dn.next() / std::sqrt(static_cast<float>(dim));
      // Drift stays on the content pairs, like the content itself.
      for (int i = 0; i < half; ++i)
        if ((i >= kRecencyPairsBegin && i < kRecencyPairsEnd) || i >= half - kSinkPairsFromEnd) drift[i] = drift[i + half] = 0;
    }
    std::vector<float> content(static_cast<std::size_t>(dim), 0.0f);
    if (h.kind == HeadKind::kRetrieval) {
      const int g = (h.target_offset + step / config_.steps_per_target) % static_cast<int>(h.needles.size());
      for (int d = 0; d < dim; ++d) content[d] = h.needle_dir[g][d] + kContentDrift * drift[d];
    } else if (h.kind == HeadKind::kClustered) {
      const auto& dir = h.cluster_dir[static_cast<std::size_t>(target_cluster(layer, kvh, step))];
      for (int d = 0; d < dim; ++d) content[d] = dir[d] + kContentDrift * drift[d];
    }
    for (int g = 0; g < group; ++g) {
      const int qh = kvh * group + g;
      float* out = &q[static_cast<std::size_t>(qh) * dim];
      // Per-query-head noise drifting as AR(1) across steps; heads of a group share the structure.
      Normals qn(key_of(key_of(h.key, kQueryNoise), static_cast<std::uint64_t>(g)));
      std::vector<float> noise(static_cast<std::size_t>(dim));
      for (int st = 0; st <= step; ++st)
        for (int d = 0; d < dim; ++d)
          noise[d] = st == 0 ? qn.next() : kDriftRho * noise[d] + std::sqrt(1 - kDriftRho * kDriftRho) * qn.next();
      // No noise on the sink pairs: against the strong sink key it would move every sink logit by
      // a few units per query head, and real queries hit sinks consistently.
      // Less on the content pairs for the same reason: against a needle's key it would blur the
      // needle into its near duplicates.
      if (h.kind != HeadKind::kGaussian)
        for (int i = 0; i < half; ++i) {
          const bool recency = i >= kRecencyPairsBegin && i < kRecencyPairsEnd;
          const float f = i >= half - kSinkPairsFromEnd ? 0.0f : recency ? 1.0f : kContentQueryNoise;
          noise[i] *= f;
          noise[i + half] *= f;
        }
      // Query coefficients from target logits: logit = scale * key_norm * coefficient.
      const float head_jitter = 1.0f + 0.05f * static_cast<float>(g);  // heads of a group differ a little
      for (int d = 0; d < dim; ++d) {
        float x = h.noise_logit * noise[d];
        if (h.kind != HeadKind::kGaussian) {
          x += h.sink_logit / (sc * kSinkKeyNorm) * h.sink_dir[d];
          x += head_jitter * h.recency_logit / (sc * kRecencyKeyNorm) * rec[d];
          x += head_jitter * h.content_logit / (sc * kContentKeyNorm) * content[d];
        }
        out[d] = x;
      }
    }
  }
}

}  // namespace hattn::zoo
