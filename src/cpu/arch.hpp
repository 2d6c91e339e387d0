#pragma once
// The instruction sets the CPU kernels are compiled for: the one xsimd arch_list of the library and
// the tag of the AVX-512 BF16 path (an ISA that xsimd 8 does not model). Internal to src/cpu.
#include <xsimd/xsimd.hpp>

#include "hattn/kernels/cpu_decode.hpp"

#if !(defined(__x86_64__) || defined(_M_X64))
#error "the CPU kernels are built for x86-64 (a generic SSE2 path plus AVX2, AVX-512 and AVX-512 BF16)"
#endif

namespace hattn::detail::cpu {

/// Best first, as xsimd::dispatch requires. fma3<avx2> rather than avx2: xsimd's avx2 arch computes
/// fma as a multiply and an add. avx512bw is xsimd's name for the Skylake-SP set (F, CD, DQ, BW).
using arch_list = xsimd::arch_list<xsimd::avx512bw, xsimd::fma3<xsimd::avx2>, xsimd::sse2>;

/// The AVX-512 path plus VDPBF16PS for q.k over bf16 keys (Cooper Lake, Sapphire Rapids and later).
/// Its vectors are xsimd::avx512bw batches.
struct avx512bf16 {
  using simd_arch = xsimd::avx512bw;
};

/// The xsimd arch whose batches a path's kernel computes with.
template <class Tag>
struct simd_arch {
  using type = Tag;
};
template <>
struct simd_arch<avx512bf16> {
  using type = xsimd::avx512bw;
};
template <class Tag>
using simd_arch_t = typename simd_arch<Tag>::type;

/// The CpuIsa a tag stands for.
template <class Tag>
constexpr CpuIsa isa_of() noexcept {
  if constexpr (std::is_same_v<Tag, avx512bf16>) return CpuIsa::kAvx512Bf16;
  else if constexpr (std::is_same_v<Tag, xsimd::avx512bw>) return CpuIsa::kAvx512;
  else if constexpr (std::is_same_v<Tag, xsimd::fma3<xsimd::avx2>>) return CpuIsa::kAvx2;
  else return CpuIsa::kGeneric;
}

}  // namespace hattn::detail::cpu
