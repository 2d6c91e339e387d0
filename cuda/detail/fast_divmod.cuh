#pragma once
// Quotient and remainder of non-negative ints by a divisor fixed for a whole kernel, as a multiply-
// high, an add and a shift. A `/` or `%` by a run-time int is a ~20-instruction sequence on the GPU,
// and the scoring loop's item -> (page, head) mapping had several per item (nvcc 13 PTX of the bf16
// D = 128 kernel: 13 div.s32 and 3 rem.s32). Host-callable so that a CPU test checks it.
//
// With s = ceil(log2 d) and m = floor(2^32 (2^s - d) / d) + 1, the quotient of n by d is
// (umulhi(n, m) + n) >> s for every 0 <= n < 2^31 (Granlund and Montgomery's round-up method; the
// sum cannot wrap because umulhi(n, m) <= n < 2^31).
#include <cstdint>

// A name of its own: cache_policy.hpp defines HATTN_HOST_DEVICE, which an #undef here would remove.
#if defined(__CUDACC__)
#define HATTN_FAST_DIVMOD_FN __host__ __device__ __forceinline__
#else
#define HATTN_FAST_DIVMOD_FN inline
#endif

namespace hattn::cuda::detail {

struct FastDivmod {
  std::uint32_t divisor = 1, magic = 0, shift = 0;

  FastDivmod() = default;
  /// d >= 1 (the caller's argument checks guarantee it).
  HATTN_FAST_DIVMOD_FN explicit FastDivmod(int d) : divisor(static_cast<std::uint32_t>(d)) {
    while ((std::uint64_t{1} << shift) < divisor) ++shift;
    magic = static_cast<std::uint32_t>((((std::uint64_t{1} << shift) - divisor) << 32) / divisor + 1);
  }

  /// n / divisor for 0 <= n < 2^31.
  HATTN_FAST_DIVMOD_FN int div(int n) const {
    const auto u = static_cast<std::uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const std::uint32_t hi = __umulhi(u, magic);
#else
    const auto hi = static_cast<std::uint32_t>((static_cast<std::uint64_t>(u) * magic) >> 32);
#endif
    return static_cast<int>((hi + u) >> shift);
  }
  /// n % divisor for 0 <= n < 2^31.
  HATTN_FAST_DIVMOD_FN int mod(int n) const { return n - div(n) * static_cast<int>(divisor); }
};

}  // namespace hattn::cuda::detail

#undef HATTN_FAST_DIVMOD_FN
