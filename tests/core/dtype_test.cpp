// Conversions between fp32 and the 16-bit KV dtypes, checked exhaustively over every 16-bit pattern
// and against an independent long-double rounding (nearbyintl under the default round-to-nearest-even
// mode), on ties, subnormals, overflow and a sweep over the fp32 bit space.
#include <gtest/gtest.h>

#include <bit>
#include <cfenv>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "hattn/core/dtype.hpp"

namespace hattn {
namespace {

// Format of an IEEE-like binary type with an implicit leading bit.
struct Format {
  int mant_bits;  // stored mantissa bits
  int exp_bits;
  int bias;
};
constexpr Format kHalf{10, 5, 15};
constexpr Format kBf16{7, 8, 127};

// Value of a finite bit pattern, computed from the definition (not by bit shuffling into fp32).
long double decode_bits(std::uint16_t bits, Format f) {
  const int sign = bits >> 15;
  const int exp = (bits >> f.mant_bits) & ((1 << f.exp_bits) - 1);
  const int mant = bits & ((1 << f.mant_bits) - 1);
  const long double mag = exp == 0 ? std::ldexp(static_cast<long double>(mant), 1 - f.bias - f.mant_bits)
                                   : std::ldexp(static_cast<long double>(mant + (1 << f.mant_bits)),
                                                exp - f.bias - f.mant_bits);
  return sign ? -mag : mag;
}

bool is_nan_bits(std::uint16_t bits, Format f) {
  const int exp_all = (1 << f.exp_bits) - 1;
  return ((bits >> f.mant_bits) & exp_all) == exp_all && (bits & ((1 << f.mant_bits) - 1)) != 0;
}
bool is_inf_bits(std::uint16_t bits, Format f) {
  const int exp_all = (1 << f.exp_bits) - 1;
  return ((bits >> f.mant_bits) & exp_all) == exp_all && (bits & ((1 << f.mant_bits) - 1)) == 0;
}

// Round-to-nearest-even of a finite float into the format, computed with long double arithmetic.
std::uint16_t round_reference(float x, Format f) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const long double a = std::fabs(static_cast<long double>(x));
  if (a == 0) return sign;
  int e = 0;
  std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): the unbiased exponent is e - 1
  const int min_exp = 1 - f.bias;
  int unbiased = std::max(e - 1, min_exp);
  long double q = std::nearbyint(std::ldexp(a, f.mant_bits - unbiased));  // ties to even
  if (q == std::ldexp(1.0L, f.mant_bits + 1)) {  // rounding carried into the next binade
    q /= 2;
    ++unbiased;
  }
  const int max_exp = (1 << f.exp_bits) - 2 - f.bias;
  if (unbiased > max_exp) return static_cast<std::uint16_t>(sign | (((1 << f.exp_bits) - 1) << f.mant_bits));
  const auto qi = static_cast<std::uint32_t>(q);
  if (qi < (1u << f.mant_bits)) return static_cast<std::uint16_t>(sign | qi);  // subnormal or zero
  return static_cast<std::uint16_t>(sign | ((unbiased + f.bias) << f.mant_bits) | (qi - (1u << f.mant_bits)));
}

std::uint16_t convert(float x, Format f) {
  return f.mant_bits == kHalf.mant_bits ? to_half(x).bits : to_bfloat16(x).bits;
}
float widen(std::uint16_t bits, Format f) {
  return f.mant_bits == kHalf.mant_bits ? to_float(half_t{bits}) : to_float(bfloat16_t{bits});
}

// Every float of interest for one format: all of its values, the midpoints between neighbours
// (exact ties) and the floats just either side of each midpoint.
struct Probe {
  float x;
  bool tie;
};
std::vector<Probe> boundary_floats(Format f) {
  std::vector<Probe> out;
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    if (is_nan_bits(bits, f) || is_inf_bits(bits, f)) continue;
    const long double lo = decode_bits(bits, f);
    out.push_back({static_cast<float>(lo), false});
    if (bits == 0x8000u) continue;  // -0 has the same successor magnitude as +0
    const auto next = static_cast<std::uint16_t>(bits + 1);  // next magnitude of the same sign
    const long double hi = is_inf_bits(next, f)
                               ? std::ldexp(1.0L, (1 << f.exp_bits) - 1 - f.bias) * (std::signbit(lo) ? -1 : 1)
                               : decode_bits(next, f);
    const long double mid_ld = (lo + hi) / 2;
    const auto mid = static_cast<float>(mid_ld);
    // Midpoints need one bit more than the format: always exact in fp32 for fp16 and bf16.
    EXPECT_EQ(static_cast<long double>(mid), mid_ld);
    const float away = mid < 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
    out.push_back({mid, true});
    out.push_back({std::nextafter(mid, 0.0f), false});
    out.push_back({std::nextafter(mid, away), false});
  }
  return out;
}

class NarrowFormat : public ::testing::TestWithParam<int> {
 protected:
  Format format() const { return GetParam() == 0 ? kHalf : kBf16; }
};

TEST_P(NarrowFormat, EveryBitPatternWidensExactlyAndRoundTrips) {
  const Format f = format();
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float wide = widen(bits, f);
    if (is_nan_bits(bits, f)) {
      EXPECT_TRUE(std::isnan(wide)) << std::hex << b;
      const std::uint16_t back = convert(wide, f);
      EXPECT_TRUE(is_nan_bits(back, f)) << std::hex << b << " -> " << back;
      EXPECT_EQ(back >> 15, bits >> 15) << "NaN sign is kept, bits " << std::hex << b;
      continue;
    }
    if (is_inf_bits(bits, f)) {
      EXPECT_TRUE(std::isinf(wide)) << std::hex << b;
      EXPECT_EQ(std::signbit(wide), (bits >> 15) != 0);
    } else {
      EXPECT_EQ(static_cast<long double>(wide), decode_bits(bits, f)) << "bits 0x" << std::hex << b;
      EXPECT_EQ(std::signbit(wide), (bits >> 15) != 0) << "bits 0x" << std::hex << b;
    }
    EXPECT_EQ(convert(wide, f), bits) << "round trip of 0x" << std::hex << b;
  }
}

TEST_P(NarrowFormat, TiesAndNeighboursRoundToNearestEven) {
  const Format f = format();
  std::int64_t ties = 0;
  for (const Probe& p : boundary_floats(f)) {
    const std::uint16_t want = round_reference(p.x, f);
    ASSERT_EQ(convert(p.x, f), want) << "x = " << std::hexfloat << p.x << " (fp32 bits 0x" << std::hex
                                     << std::bit_cast<std::uint32_t>(p.x) << ")";
    if (!p.tie) continue;
    ++ties;
    // Independently of the reference: just below a tie rounds to the smaller magnitude, just above to
    // the larger, and the tie itself to whichever of the two has an even last bit (inf counts as even).
    const float away = p.x < 0 ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
    const std::uint16_t below = convert(std::nextafter(p.x, 0.0f), f);
    const std::uint16_t above = convert(std::nextafter(p.x, away), f);
    EXPECT_EQ(above, below + 1) << std::hexfloat << p.x;
    EXPECT_EQ(want, (below & 1u) == 0 ? below : above) << "tie at " << std::hexfloat << p.x;
  }
  EXPECT_GT(ties, f.mant_bits == kHalf.mant_bits ? 60000 : 65000) << "every midpoint is a tie";
}

TEST_P(NarrowFormat, SweepOfTheFp32BitSpaceMatchesLongDoubleRounding) {
  const Format f = format();
  // A prime stride visits every exponent and many mantissa patterns; the random part adds the rest.
  std::mt19937 rng(7);
  std::vector<std::uint32_t> patterns;
  for (std::uint64_t u = 0; u <= 0xffffffffull; u += 2147) patterns.push_back(static_cast<std::uint32_t>(u));
  for (int i = 0; i < 200000; ++i) patterns.push_back(rng());
  for (std::uint32_t u : patterns) {
    const float x = std::bit_cast<float>(u);
    if (std::isnan(x)) {
      EXPECT_TRUE(is_nan_bits(convert(x, f), f)) << std::hex << u;
      continue;
    }
    if (std::isinf(x)) {
      EXPECT_TRUE(is_inf_bits(convert(x, f), f)) << std::hex << u;
      continue;
    }
    ASSERT_EQ(convert(x, f), round_reference(x, f)) << "fp32 bits 0x" << std::hex << u;
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, NarrowFormat, ::testing::Values(0, 1),
                         [](const auto& info) { return info.param == 0 ? "fp16" : "bf16"; });

TEST(Half, KnownValuesOverflowAndSubnormals) {
  EXPECT_EQ(to_half(1.0f).bits, 0x3c00);
  EXPECT_EQ(to_half(-2.0f).bits, 0xc000);
  EXPECT_EQ(to_half(65504.0f).bits, 0x7bff);                            // largest finite
  EXPECT_EQ(to_half(std::nextafter(65520.0f, 0.0f)).bits, 0x7bff);     // just below the tie
  EXPECT_EQ(to_half(65520.0f).bits, 0x7c00);                            // tie with 65536: odd 0x3ff loses
  EXPECT_EQ(to_half(1e30f).bits, 0x7c00);
  EXPECT_EQ(to_half(-1e30f).bits, 0xfc00);
  EXPECT_EQ(to_half(std::ldexp(1.0f, -24)).bits, 0x0001);  // smallest subnormal
  EXPECT_EQ(to_half(std::ldexp(1.0f, -25)).bits, 0x0000);  // tie with zero rounds to even (zero)
  EXPECT_EQ(to_half(std::nextafter(std::ldexp(1.0f, -25), 1.0f)).bits, 0x0001);
  EXPECT_EQ(to_half(std::ldexp(3.0f, -25)).bits, 0x0002);  // 1.5 ulp: tie between 1 and 2, even is 2
  EXPECT_EQ(to_half(-0.0f).bits, 0x8000);
  EXPECT_EQ(to_half(std::ldexp(1.0f, -14)).bits, 0x0400);  // smallest normal
  EXPECT_EQ(to_half(std::ldexp(1023.5f, -24)).bits, 0x0400);  // largest subnormal + half ulp: carries
  static_assert(to_half(1.0f).bits == 0x3c00, "usable in constant expressions");
}

TEST(BFloat16, KnownValuesOverflowAndSubnormals) {
  EXPECT_EQ(to_bfloat16(1.0f).bits, 0x3f80);
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x3f808000u)).bits, 0x3f80);  // tie, even stays
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x3f818000u)).bits, 0x3f82);  // tie, odd rounds up
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x3f808001u)).bits, 0x3f81);
  EXPECT_EQ(to_bfloat16(std::numeric_limits<float>::max()).bits, 0x7f80);  // rounds past the largest bf16
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x7f7f7fffu)).bits, 0x7f7f);
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x00008000u)).bits, 0x0000);  // subnormal tie to even zero
  EXPECT_EQ(to_bfloat16(std::bit_cast<float>(0x00018000u)).bits, 0x0002);
  EXPECT_EQ(to_bfloat16(-0.0f).bits, 0x8000);
  const std::uint16_t nan = to_bfloat16(std::bit_cast<float>(0x7f800001u)).bits;  // signalling, low bits only
  EXPECT_TRUE(is_nan_bits(nan, kBf16)) << "a NaN whose payload is only in the dropped bits stays NaN";
  static_assert(to_bfloat16(1.0f).bits == 0x3f80, "usable in constant expressions");
}

#if defined(__FLT16_MANT_DIG__)
// The compiler's own _Float16 conversion is a third, independent opinion where it exists.
TEST(Half, AgreesWithCompilerFloat16) {
  for (const Probe& p : boundary_floats(kHalf)) {
    const auto h = static_cast<_Float16>(p.x);
    ASSERT_EQ(to_half(p.x).bits, std::bit_cast<std::uint16_t>(h)) << std::hexfloat << p.x;
  }
}
#endif

TEST(DTypeBuffers, LoadAndStoreUseEachDTypesRounding) {
  const float values[] = {1.0f, -0.1f, 3.14159265f, 65519.0f, std::ldexp(1.0f, -20), -0.0f};
  for (DType t : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    std::vector<std::byte> buf(sizeof(values) / sizeof(float) * dtype_bytes(t));
    for (std::size_t i = 0; i < std::size(values); ++i) store_from_float(buf.data(), i, t, values[i]);
    for (std::size_t i = 0; i < std::size(values); ++i) {
      const float want = t == DType::kFloat32   ? values[i]
                         : t == DType::kFloat16 ? to_float(to_half(values[i]))
                                                : to_float(to_bfloat16(values[i]));
      const float got = load_as_float(buf.data(), i, t);
      EXPECT_EQ(std::bit_cast<std::uint32_t>(got), std::bit_cast<std::uint32_t>(want)) << t << " " << values[i];
    }
  }
  EXPECT_EQ(dtype_bytes(DType::kFloat32), 4u);
  EXPECT_EQ(dtype_bytes(DType::kFloat16), 2u);
  EXPECT_EQ(dtype_bytes(DType::kBFloat16), 2u);
  EXPECT_EQ(to_string(DType::kBFloat16), "bf16");
  EXPECT_EQ(to_string(DType::kFloat16), "fp16");
  EXPECT_EQ(to_string(DType::kFloat32), "fp32");
}

}  // namespace
}  // namespace hattn
