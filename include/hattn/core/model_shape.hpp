#pragma once
// The attention shape of a model: what every pool, kernel and policy is sized from.
#include <cstdint>
#include <ostream>

#include "hattn/core/dtype.hpp"
#include "hattn/core/error.hpp"

namespace hattn {

/// Shape of a model's attention. GQA: q_heads is a multiple of kv_heads; the query heads
/// [g * group, (g + 1) * group) share KV head g.
struct ModelShape {
  int layers = 0;
  int q_heads = 0;
  int kv_heads = 0;
  int head_dim = 0;  ///< 64, 128 or 256
  DType kv_dtype = DType::kBFloat16;

  constexpr int group_size() const noexcept { return kv_heads > 0 ? q_heads / kv_heads : 0; }
  friend constexpr bool operator==(const ModelShape&, const ModelShape&) = default;

  /// Throws InvalidArgument naming the first bad field.
  void validate() const {
    detail::require(layers > 0, "ModelShape", "layers", layers, "> 0");
    detail::require(kv_heads > 0, "ModelShape", "kv_heads", kv_heads, "> 0");
    detail::require(q_heads > 0 && q_heads % kv_heads == 0, "ModelShape", "q_heads", q_heads,
                    "a positive multiple of kv_heads");
    detail::require(head_dim == 64 || head_dim == 128 || head_dim == 256, "ModelShape", "head_dim",
                    head_dim, "64, 128 or 256");
  }
};

inline std::ostream& operator<<(std::ostream& os, const ModelShape& s) {
  return os << "{layers=" << s.layers << ", q_heads=" << s.q_heads << ", kv_heads=" << s.kv_heads
            << ", head_dim=" << s.head_dim << ", kv_dtype=" << s.kv_dtype << "}";
}

}  // namespace hattn
