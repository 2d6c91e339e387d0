#pragma once
// The instruction sets the CPU kernels (decode and scoring) are built for, chosen at run time.
// Resolved in src/cpu/cpu_decode.cpp.
#include <cstdint>

namespace hattn {

enum class CpuIsa : std::uint8_t { kGeneric, kAvx2, kAvx512, kAvx512Bf16 };
const char* to_string(CpuIsa isa) noexcept;
/// The fastest path this CPU supports among those compiled in: AVX-512, else AVX2, else generic. The
/// AVX-512 BF16 path runs only when asked for: on Sapphire Rapids its VDPBF16PS q.k made the kernel
/// ~2x slower in cache and ~1.2x slower from DRAM than the AVX-512 path's fp32 q.k
/// (docs/performance.md, "CPU kernel").
CpuIsa detect_cpu_isa() noexcept;
/// Whether `isa` can run on this CPU (and was compiled in).
bool cpu_supports(CpuIsa isa) noexcept;

}  // namespace hattn
