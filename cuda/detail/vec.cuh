#pragma once
// 16-byte vectors of KV elements and their conversion to fp32, the unit every kernel loads.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace hattn::cuda::detail {

/// Elements of T in one 16-byte load.
template <class T>
inline constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

__device__ __forceinline__ float2 to_float2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __forceinline__ float2 to_float2(__half2 v) { return __half22float2(v); }

template <class T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};
template <>
struct Pair<__half> {
  using type = __half2;
};

/// Converts the 8 half-precision elements held in a uint4 to fp32.
template <class T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&out)[8]) {
  using P = typename Pair<T>::type;
  const P* pairs = reinterpret_cast<const P*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = to_float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

/// Float bits mapped to an unsigned key with the same order (larger float, larger key); NaN maps to
/// 0, below every number, so it ranks lowest (as the CPU selection does).
__device__ __forceinline__ std::uint32_t order_key(float f) {
  if (f != f) return 0u;
  const std::uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(std::uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

}  // namespace hattn::cuda::detail
