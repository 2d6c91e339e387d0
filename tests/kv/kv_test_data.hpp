#pragma once
// Structured K/V for the kv/ tests, and a plain host model of what a store should hold.
// Keys look like a transformer's: a few outlier channels with a large constant offset, a slow
// position-dependent rotation of channel pairs (RoPE-like), per-head scales, occasional outlier tokens,
// repeated tokens (ties in min/max) and exact zeros of both signs. Values ramp with position so a
// misplaced token is visible in readback.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/tensor_view.hpp"
#include "hattn/kv/page_layout.hpp"

namespace hattn::test {

/// n tokens of K and V, [n][kv_heads][head_dim] in the layout's dtype, as raw bytes.
struct TokenBlock {
  std::int64_t n = 0;
  std::vector<std::byte> keys;
  std::vector<std::byte> values;

  TensorView key_view(const PageLayout& l) const {
    return TensorView::contiguous(keys.data(), l.dtype, {n, l.kv_heads, l.head_dim});
  }
  TensorView value_view(const PageLayout& l) const {
    return TensorView::contiguous(values.data(), l.dtype, {n, l.kv_heads, l.head_dim});
  }
};

/// Key element of token `pos`, head h, channel d, before rounding to the KV dtype.
inline float structured_key(std::int64_t pos, int h, int d, int dim, std::mt19937& rng) {
  std::normal_distribution<float> noise(0.0f, 1.0f);
  const float head_scale = 0.5f + 0.25f * static_cast<float>(h);
  // RoPE-like: channel pair (2i, 2i+1) rotates with frequency 10000^(-2i/dim).
  const int pair = d / 2;
  const double freq = std::pow(10000.0, -2.0 * pair / dim);
  const double angle = static_cast<double>(pos) * freq;
  float base = static_cast<float>((d % 2 == 0) ? std::cos(angle) : std::sin(angle));
  base = head_scale * (base + 0.3f * noise(rng));
  if (d % 37 == 5) base += 8.0f;  // outlier channel with a constant offset
  if (pos % 97 == 13) base *= 6.0f;  // outlier token
  if (d % 29 == 3) base = 0.0f;  // exact zeros
  if (d % 29 == 4) base = -0.0f;
  return base;
}

/// Tokens [first_pos, first_pos + n) of one (sequence, layer) stream; `seed` separates streams.
inline TokenBlock make_tokens(const PageLayout& l, std::int64_t first_pos, std::int64_t n, std::uint32_t seed) {
  TokenBlock b;
  b.n = n;
  const std::size_t elems = static_cast<std::size_t>(n) * l.kv_heads * l.head_dim;
  b.keys.resize(elems * dtype_bytes(l.dtype));
  b.values.resize(elems * dtype_bytes(l.dtype));
  std::size_t i = 0;
  for (std::int64_t t = 0; t < n; ++t) {
    const std::int64_t pos = first_pos + t;
    std::mt19937 rng(seed * 1000003u + static_cast<std::uint32_t>(pos));
    // Every 11th token repeats the previous one's keys: equal values exercise min/max ties.
    if (pos % 11 == 10) rng.seed(seed * 1000003u + static_cast<std::uint32_t>(pos - 1));
    for (int h = 0; h < l.kv_heads; ++h) {
      for (int d = 0; d < l.head_dim; ++d, ++i) {
        store_from_float(b.keys.data(), i, l.dtype, structured_key(pos, h, d, l.head_dim, rng));
        store_from_float(b.values.data(), i, l.dtype,
                         0.01f * static_cast<float>(pos % 1000) - 0.5f * static_cast<float>(h) +
                             0.001f * static_cast<float>(d));
      }
    }
  }
  return b;
}

/// What one (sequence, layer) of a store should hold: all appended K and V bytes in token order.
struct StreamModel {
  std::int64_t length = 0;
  std::vector<std::byte> keys;
  std::vector<std::byte> values;

  void append(const TokenBlock& b) {
    keys.insert(keys.end(), b.keys.begin(), b.keys.end());
    values.insert(values.end(), b.values.begin(), b.values.end());
    length += b.n;
  }
};

/// Key (head h, channel d) of token pos of a model stream, as fp32.
inline float model_key(const StreamModel& m, const PageLayout& l, std::int64_t pos, int h, int d) {
  return load_as_float(m.keys.data(), (static_cast<std::size_t>(pos) * l.kv_heads + h) * l.head_dim + d, l.dtype);
}

inline std::vector<DType> all_dtypes() { return {DType::kFloat32, DType::kFloat16, DType::kBFloat16}; }

/// Unit roundoff of a dtype: the largest relative error of one rounding to nearest.
inline double unit_roundoff(DType t) {
  switch (t) {
    case DType::kFloat32: return std::ldexp(1.0, -24);
    case DType::kFloat16: return std::ldexp(1.0, -11);
    case DType::kBFloat16: return std::ldexp(1.0, -8);
  }
  return 1.0;
}

}  // namespace hattn::test
