// The kernels' division by a fixed divisor (cuda/detail/fast_divmod.cuh) against the compiler's `/`
// and `%`, on the host: every divisor up to 4096 and the large ones the kernels can meet, over the
// small numerators, the top of the int range and random ones. Runs without a GPU.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "../../cuda/detail/fast_divmod.cuh"

namespace hattn::test {
namespace {

using cuda::detail::FastDivmod;

// Counts mismatches so that a failure names the first few cases instead of flooding the log.
void check_divisor(int d, std::mt19937& rng, int randoms, int& failures) {
  const FastDivmod f(d);
  auto check = [&](int n) {
    if (f.div(n) == n / d && f.mod(n) == n % d) return;
    if (++failures <= 5) ADD_FAILURE() << "divisor " << d << ", numerator " << n << ": got " << f.div(n) << " r "
                                       << f.mod(n) << ", want " << n / d << " r " << n % d;
  };
  for (int n = 0; n < 1024; ++n) check(n);
  for (int n = 0; n < 1024; ++n) check(0x7fffffff - n);
  // Around the multiples of d, where a quotient rounded the wrong way shows first.
  for (int k = 1; k < 64; ++k) {
    const std::int64_t m = static_cast<std::int64_t>(d) * k * 9973;
    if (m + 1 >= 0x7fffffff) break;
    check(static_cast<int>(m - 1)), check(static_cast<int>(m)), check(static_cast<int>(m + 1));
  }
  std::uniform_int_distribution<int> any(0, 0x7fffffff);
  for (int i = 0; i < randoms; ++i) check(any(rng));
}

TEST(FastDivmod, MatchesDivisionForSmallDivisors) {
  std::mt19937 rng(7);
  int failures = 0;
  for (int d = 1; d <= 4096; ++d) check_divisor(d, rng, 256, failures);
  EXPECT_EQ(failures, 0);
}

TEST(FastDivmod, MatchesDivisionForLargeDivisors) {
  std::mt19937 rng(11);
  int failures = 0;
  const std::vector<int> divisors = {65535,      65536,      65537,      100003,     (1 << 20) - 1, 1 << 20,
                                     (1 << 20) + 1, 0x3fffffff, 0x40000000, 0x40000001, 0x7ffffffe,    0x7fffffff};
  for (int d : divisors) check_divisor(d, rng, 100000, failures);
  EXPECT_EQ(failures, 0);
}

TEST(FastDivmod, PowersOfTwoAreShifts) {
  for (int s = 0; s < 31; ++s) {
    const FastDivmod f(1 << s);
    EXPECT_EQ(f.shift, static_cast<std::uint32_t>(s));
    EXPECT_EQ(f.div(0x7fffffff), 0x7fffffff >> s);
  }
}

}  // namespace
}  // namespace hattn::test
