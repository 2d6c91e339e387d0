#pragma once
// Byte layout of one page: page_size tokens of one layer, K then V, each HND [kv_heads][page_size][dim],
// and of its summary: per KV head the element-wise min, max and mean of the page's keys.
#include <cstddef>
#include <cstdint>
#include <ostream>

#include "hattn/core/dtype.hpp"
#include "hattn/core/error.hpp"

namespace hattn {

/// Index of a page in a HostKVPool. Pages never move, so an id stays valid until freed.
using PageId = std::int32_t;

/// Tokens per page that the kernels are built for.
constexpr bool is_supported_page_size(int p) noexcept { return p == 16 || p == 32 || p == 64; }

struct PageLayout {
  int page_size = 16;  ///< tokens per page: 16, 32 or 64
  int kv_heads = 0;
  int head_dim = 0;  ///< 64, 128 or 256
  DType dtype = DType::kBFloat16;

  friend constexpr bool operator==(const PageLayout&, const PageLayout&) = default;

  /// Elements of K (or V) of one KV head in one page: [page_size][head_dim].
  constexpr std::size_t head_block_elems() const noexcept {
    return static_cast<std::size_t>(page_size) * head_dim;
  }
  /// Elements of a whole page: K and V of every KV head.
  constexpr std::size_t page_elems() const noexcept { return 2 * kv_heads * head_block_elems(); }
  constexpr std::size_t page_bytes() const noexcept { return page_elems() * dtype_bytes(dtype); }
  /// Element offset of K[head][token][0] inside a page.
  constexpr std::size_t key_offset(int head, int token) const noexcept {
    return (static_cast<std::size_t>(head) * page_size + token) * head_dim;
  }
  /// Element offset of V[head][token][0] inside a page.
  constexpr std::size_t value_offset(int head, int token) const noexcept {
    return static_cast<std::size_t>(kv_heads) * head_block_elems() + key_offset(head, token);
  }

  /// Summary of one page: [kv_heads][3][head_dim] in the KV dtype; rows are min, max, mean.
  static constexpr int kSummaryRows = 3;
  constexpr std::size_t summary_elems() const noexcept {
    return static_cast<std::size_t>(kv_heads) * kSummaryRows * head_dim;
  }
  constexpr std::size_t summary_bytes() const noexcept { return summary_elems() * dtype_bytes(dtype); }
  constexpr std::size_t summary_offset(int head, int row) const noexcept {
    return (static_cast<std::size_t>(head) * kSummaryRows + row) * head_dim;
  }

  void validate() const {
    detail::require(is_supported_page_size(page_size), "PageLayout", "page_size", page_size, "16, 32 or 64");
    detail::require(kv_heads > 0, "PageLayout", "kv_heads", kv_heads, "> 0");
    detail::require(head_dim == 64 || head_dim == 128 || head_dim == 256, "PageLayout", "head_dim", head_dim,
                    "64, 128 or 256");
  }
};

/// Rows of a page summary.
enum class SummaryRow : int { kMin = 0, kMax = 1, kMean = 2 };

inline std::ostream& operator<<(std::ostream& os, const PageLayout& l) {
  return os << "{page_size=" << l.page_size << ", kv_heads=" << l.kv_heads << ", head_dim=" << l.head_dim
            << ", dtype=" << l.dtype << "}";
}

}  // namespace hattn
