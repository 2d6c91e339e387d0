#pragma once
// The per-ISA decode kernel over one contiguous piece of one work item's page list, as xsimd's
// examples shape it: a functor templated on the arch, defined in one source file per ISA (compiled
// with only that ISA's flags) and declared here with extern templates. Internal to src/cpu.
#include <cstddef>
#include <cstdint>

#include "arch.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/kv/page_layout.hpp"

namespace hattn::detail::cpu {

/// Tokens of one page are handled as one block; 64 is the largest supported page size.
constexpr int kMaxPageTokens = 64;

/// One task: pages [0, n_pages) of `pages`, for the `group` query heads sharing one KV head.
struct PageRange {
  const std::byte* pages_base = nullptr;  ///< HostKVPool::pages_base()
  std::size_t page_bytes = 0;
  std::size_t key_offset_bytes = 0;    ///< from a page's start to K[kv_head][0][0]
  std::size_t value_offset_bytes = 0;  ///< from a page's start to V[kv_head][0][0]
  int page_size = 16;
  int head_dim = 128;
  DType dtype = DType::kBFloat16;
  int group = 1;
  float scale_log2 = 0;  ///< scale * log2(e): the kernel's logits are in base 2
  const float* q = nullptr;  ///< [group][head_dim], unscaled
  const PageId* pages = nullptr;
  const std::uint64_t* token_masks = nullptr;  ///< nullptr or [n_pages]
  int n_pages = 0;
  int last_page_tokens = 0;  ///< valid tokens of pages[n_pages - 1]; the others are full
  float* out = nullptr;  ///< [group][head_dim], normalised
  float* lse = nullptr;  ///< [group], natural log; -inf with out = 0 when nothing is attended
  float* work = nullptr;  ///< work_floats(group, head_dim) floats, 64-byte aligned, owned by the worker
};

/// Scratch one worker needs for one PageRange: accumulators, the block's logits, the scaled query
/// (and its bf16 halves for the BF16 path), running max and sum. A multiple of 16 floats.
constexpr std::size_t work_floats(int group, int head_dim) noexcept {
  const std::size_t g = static_cast<std::size_t>(group), d = static_cast<std::size_t>(head_dim);
  return g * d          // accumulators
         + g * kMaxPageTokens  // logits, then probabilities, of the current page
         + g * d        // query scaled by scale * log2(e)
         + g * d        // its bf16 high and low halves (2 x uint16 per element)
         + 2 * ((g + 15) / 16 * 16);  // running max and sum
}

/// Computes out and lse of one PageRange on the path `Tag`.
struct DecodePages {
  template <class Tag>
  void operator()(Tag, const PageRange& range) const;
};

extern template void DecodePages::operator()<xsimd::sse2>(xsimd::sse2, const PageRange&) const;
#if HATTN_CPU_HAVE_AVX2
extern template void DecodePages::operator()<xsimd::fma3<xsimd::avx2>>(xsimd::fma3<xsimd::avx2>,
                                                                        const PageRange&) const;
#endif
#if HATTN_CPU_HAVE_AVX512
extern template void DecodePages::operator()<xsimd::avx512bw>(xsimd::avx512bw, const PageRange&) const;
#endif
#if HATTN_CPU_HAVE_AVX512BF16
extern template void DecodePages::operator()<avx512bf16>(avx512bf16, const PageRange&) const;
#endif

}  // namespace hattn::detail::cpu
