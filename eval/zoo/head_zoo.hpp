#pragma once
// The head zoo: deterministic, structured decode-time Q/K/V for model-shaped layers, so accuracy is
// judged on heads that behave like a real model's (sinks, local/streaming heads, retrieval heads with
// needles among near-duplicate distractors, clustered keys, diffuse heads) and never on plain Gaussian
// Q/K alone (papers.md: "Measuring quality without model weights").
//
// How a head is built (logit units: scale * q.k with scale = 1 / sqrt(head_dim)):
// - Keys are k(p) = R(p) k0(p) + c(p): k0 is position content (noise, the sink direction on the
//   8 slowest rotary pairs for the first tokens, a constant "recency" vector on pairs 8-40, whose
//   wavelengths of 40 to 18K tokens make a window of a few hundred tokens), rotated by the real
//   rotary embedding R(p) (Llama half-split pairs, base 500000); c(p) is semantic content on the
//   remaining pairs that queries match wherever the token is (needles, distractors, topic clusters),
//   added after rotation as a learned content match would survive it.
// - A query at position t is q = noise + sink coefficient + R(t) * recency vector (so through RoPE
//   it lines up with recent keys: q.R(p)u = u.R(p - t)u, a sum of cosines peaking at p = t) + the
//   content it looks for. Queries drift step to step (a random walk) and retrieval heads switch the
//   needle they look for every few steps, so the previous needle becomes a distractor.
// - Head kinds per layer follow DuoAttention's published per-layer count of streaming heads for
//   Llama-3.1-8B (papers.md): the first layers are mostly local.
// Every random draw is a hash of (seed, layer, head, position, stream): any token can be regenerated
// alone, in any order, and the result never depends on how generation was chunked.
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/model_shape.hpp"

namespace hattn::zoo {

/// What a generated KV head is built to be. kGaussian is the sanity case (no structure).
enum class HeadKind : std::uint8_t { kLocal, kRetrieval, kClustered, kDiffuse, kGaussian };
inline constexpr int kHeadKinds = 5;

const char* to_string(HeadKind k) noexcept;

/// Llama-3-8B attention: 32 layers, 32 query heads, 8 KV heads (group 4), head_dim 128, bf16 KV.
ModelShape llama3_8b_shape();
/// Qwen2.5-7B-like attention: 28 layers, 28 query heads, 4 KV heads (group 7), head_dim 128, bf16 KV.
ModelShape qwen_shape();

/// A run of consecutive tokens carrying one piece of content.
struct Span {
  std::int64_t begin = 0;  ///< first token position
  int length = 0;          ///< tokens
  int group = 0;           ///< needle group the span belongs to (retrieval heads)
  friend bool operator==(const Span&, const Span&) = default;
};

struct ZooConfig {
  /// The model the layers come from; the per-layer head mix is indexed by the model's layer.
  ModelShape model = llama3_8b_shape();
  /// Model layers to generate, in order (empty = all). Generated layer i is model layer layers[i].
  std::vector<int> layers;
  /// Tokens present before the first decode step (the prompt); decode step s appends position
  /// context_tokens + s and queries from it.
  std::int64_t context_tokens = 8192;
  /// Tokens whose keys every query hits (attention sinks).
  int sink_tokens = 4;
  double rope_base = 500000.0;
  /// Needle groups per retrieval head; the query looks for one at a time.
  int needle_groups = 4;
  /// Near-duplicate distractor spans per needle group.
  int distractors_per_group = 12;
  /// Steps a retrieval head keeps looking for the same needle before switching.
  int steps_per_target = 2;
  /// Topic clusters of a clustered head.
  int clusters = 16;
  /// Every head plain Gaussian (the sanity case).
  bool gaussian_only = false;
  std::uint64_t seed = 1;
};

/// The generator. Const member functions are thread-safe.
class HeadZoo {
 public:
  /// Precomputes per-head structure (kinds, needle and distractor spans, directions) and a rotary
  /// table for positions [0, context_tokens + max_steps). Throws InvalidArgument for a bad config.
  explicit HeadZoo(ZooConfig config, int max_steps = 64);
  ~HeadZoo();
  HeadZoo(HeadZoo&&) noexcept;
  HeadZoo& operator=(HeadZoo&&) noexcept;

  const ZooConfig& config() const noexcept { return config_; }
  /// The generated shape: the model's heads with layers = number of generated layers.
  const ModelShape& shape() const noexcept { return shape_; }
  int model_layer(int layer) const { return config_.layers.at(static_cast<std::size_t>(layer)); }
  int max_steps() const noexcept { return max_steps_; }
  float scale() const noexcept;

  HeadKind kind(int layer, int kv_head) const;
  /// Every needle span planted in the head (empty unless kRetrieval), one per group.
  std::span<const Span> needles(int layer, int kv_head) const;
  /// Distractor spans of the head (near duplicates of the needles).
  std::span<const Span> distractors(int layer, int kv_head) const;
  /// The needle span the head's query looks for at decode step `step`: the ground truth of the
  /// needle hit rate. Empty unless kRetrieval.
  std::vector<Span> targets(int layer, int kv_head, int step) const;
  /// Topic cluster of token `position` in a clustered head, and the cluster its query looks for.
  int cluster_of(int layer, int kv_head, std::int64_t position) const;
  int target_cluster(int layer, int kv_head, int step) const;

  /// Keys and values of tokens [begin, begin + n) of generated layer `layer`, written as
  /// [n][kv_heads][head_dim] bf16 (the layout attention projections produce). Positions may reach
  /// context_tokens + max_steps - 1.
  void tokens(int layer, std::int64_t begin, std::int64_t n, std::span<bfloat16_t> keys,
              std::span<bfloat16_t> values) const;
  /// The query of decode step `step` (at position context_tokens + step): [q_heads][head_dim] fp32.
  void query(int layer, int step, std::span<float> q) const;
  /// Position of the token decode step `step` appends (and queries from).
  std::int64_t step_position(int step) const noexcept { return config_.context_tokens + step; }

 private:
  struct Head;
  const Head& head(int layer, int kv_head) const;
  void key_value(const Head& h, int layer, int kv_head, std::int64_t p, bfloat16_t* k, bfloat16_t* v) const;

  ZooConfig config_;
  ModelShape shape_;
  int max_steps_;
  std::vector<float> cos_, sin_;  // [positions][head_dim / 2]
  std::vector<Head> heads_;       // [layers][kv_heads]
};

/// Number of KV heads of `model_layer` that the zoo makes local (streaming), for a model with
/// `layers` layers and `kv_heads` KV heads: DuoAttention's Llama-3.1-8B counts, rescaled.
int local_heads_in_layer(int model_layer, int layers, int kv_heads);

}  // namespace hattn::zoo
