#pragma once
// A small structured layer for the object's tests: per KV head a query direction, attention sinks at
// the start, needles planted at fixed positions, a local window at the end, and noise elsewhere.
// Logits separate clearly, so a selection that misses a needle shows in the output.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/model_shape.hpp"

namespace hattn::test {

struct StructuredLayer {
  ModelShape shape;
  std::int64_t tokens = 0;
  std::vector<std::uint16_t> keys, values;  // bf16 bits [tokens][kv_heads][dim]
  std::vector<float> query;                 // [q_heads][dim]
  std::vector<std::int64_t> needles;        // positions
};

inline StructuredLayer make_structured_layer(const ModelShape& shape, std::int64_t tokens, std::uint32_t seed) {
  StructuredLayer l{shape, tokens, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int dim = shape.head_dim;
  std::vector<float> direction(static_cast<std::size_t>(shape.kv_heads) * dim);
  for (int h = 0; h < shape.kv_heads; ++h) {
    float norm = 0;
    for (int d = 0; d < dim; ++d) norm += std::pow(direction[h * dim + d] = normal(rng), 2.0f);
    for (int d = 0; d < dim; ++d) direction[h * dim + d] /= std::sqrt(norm);
  }
  for (int i = 1; i <= 3; ++i) l.needles.push_back(tokens * i / 4 + 7 * i);
  const float sqrt_dim = std::sqrt(static_cast<float>(dim));
  l.keys.resize(static_cast<std::size_t>(tokens) * shape.kv_heads * dim);
  l.values.resize(l.keys.size());
  for (std::int64_t t = 0; t < tokens; ++t) {
    float align = -2.0f;  // background: the query points away from it
    if (t < 4) align = 7.0f;                                             // sinks
    else if (t >= tokens - 24) align = 4.0f;                             // local window
    for (auto n : l.needles) if (t == n) align = 9.0f;                   // needles
    for (int h = 0; h < shape.kv_heads; ++h)
      for (int d = 0; d < dim; ++d) {
        const std::size_t i = (static_cast<std::size_t>(t) * shape.kv_heads + h) * dim + d;
        const float k = 0.6f * normal(rng) + align * sqrt_dim * direction[h * dim + d] / 2.0f;
        l.keys[i] = to_bfloat16(k).bits;
        l.values[i] = to_bfloat16(normal(rng) + (align > 8.0f ? 2.0f : 0.0f)).bits;
      }
  }
  l.query.resize(static_cast<std::size_t>(shape.q_heads) * dim);
  const int group = shape.group_size();
  for (int qh = 0; qh < shape.q_heads; ++qh)
    for (int d = 0; d < dim; ++d)
      l.query[qh * dim + d] = 2.0f * direction[(qh / group) * dim + d] + 0.1f * normal(rng);
  return l;
}

inline double relative_l2(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

}  // namespace hattn::test
