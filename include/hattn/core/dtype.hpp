#pragma once
// Element types of stored KV and their exact conversions to and from fp32.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <ostream>
#include <string_view>

namespace hattn {

/// Element type of keys and values in the pools. Queries and partial outputs are always fp32.
enum class DType : std::uint8_t { kFloat32, kFloat16, kBFloat16 };

constexpr std::size_t dtype_bytes(DType t) noexcept { return t == DType::kFloat32 ? 4 : 2; }

constexpr std::string_view to_string(DType t) noexcept {
  switch (t) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
  }
  return "unknown";
}

inline std::ostream& operator<<(std::ostream& os, DType t) { return os << to_string(t); }

/// IEEE binary16 stored as its bits; conversions below are exact (fp16 -> fp32) or
/// round-to-nearest-even (fp32 -> fp16), matching CUDA's __float2half_rn.
struct half_t {
  std::uint16_t bits;
  friend constexpr bool operator==(half_t, half_t) = default;
};

/// bfloat16 stored as its bits (the high half of an fp32); fp32 -> bf16 rounds to nearest even,
/// matching CUDA's __float2bfloat16_rn.
struct bfloat16_t {
  std::uint16_t bits;
  friend constexpr bool operator==(bfloat16_t, bfloat16_t) = default;
};

/// The identity, so that code templated on the KV element type widens fp32, fp16 and bf16 alike.
constexpr float to_float(float v) noexcept { return v; }

constexpr float to_float(bfloat16_t v) noexcept {
  return std::bit_cast<float>(static_cast<std::uint32_t>(v.bits) << 16);
}

constexpr bfloat16_t to_bfloat16(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>((u + rounding) >> 16)};
}

constexpr float to_float(half_t v) noexcept {
  const std::uint32_t sign = static_cast<std::uint32_t>(v.bits & 0x8000u) << 16;
  std::uint32_t exp = (v.bits >> 10) & 0x1fu;
  std::uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));  // inf, NaN
  if (exp == 0) {
    if (mant == 0) return std::bit_cast<float>(sign);
    // Subnormal: shift the mantissa up until its leading one becomes the implicit bit.
    exp = 113;  // 127 - 15 + 1
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    mant &= 0x3ffu;
    return std::bit_cast<float>(sign | (exp << 23) | (mant << 13));
  }
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

constexpr half_t to_half(float f) noexcept {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {static_cast<std::uint16_t>(sign | 0x7e00u)};  // NaN
  if (abs >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value / 2^-24, rounded to nearest even.
    if (abs < 0x33000000u) return {sign};  // below half the smallest subnormal
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - exp;  // 113 - exp + 13
    const std::uint32_t q = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1);
    const std::uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return {static_cast<std::uint16_t>(sign | r)};
  }
  // Normal: rebias the exponent, then round the 13 dropped mantissa bits to nearest even.
  const std::uint32_t rebased = abs - 0x38000000u;  // (127 - 15) << 23
  const std::uint32_t rounded = rebased + 0xfffu + ((rebased >> 13) & 1u);
  return {static_cast<std::uint16_t>(sign | (rounded >> 13))};
}

/// Loads element i of a buffer of the given dtype as fp32.
inline float load_as_float(const void* base, std::size_t i, DType t) noexcept {
  switch (t) {
    case DType::kFloat32: return static_cast<const float*>(base)[i];
    case DType::kFloat16: return to_float(static_cast<const half_t*>(base)[i]);
    case DType::kBFloat16: return to_float(static_cast<const bfloat16_t*>(base)[i]);
  }
  return 0.0f;
}

/// Stores fp32 v as element i of a buffer of the given dtype (round to nearest even).
inline void store_from_float(void* base, std::size_t i, DType t, float v) noexcept {
  switch (t) {
    case DType::kFloat32: static_cast<float*>(base)[i] = v; return;
    case DType::kFloat16: static_cast<half_t*>(base)[i] = to_half(v); return;
    case DType::kBFloat16: static_cast<bfloat16_t*>(base)[i] = to_bfloat16(v); return;
  }
}

}  // namespace hattn
