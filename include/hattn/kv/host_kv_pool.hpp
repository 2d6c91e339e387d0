#pragma once
// Pages of KV in one big host arena (pinned and mapped for GPU access when a GPU is present),
// with a parallel arena of page summaries and a thread-safe free list.
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "hattn/kv/page_layout.hpp"

namespace hattn {

/// Where the arenas of a HostKVPool live.
enum class HostMemoryKind : std::uint8_t {
  kPinnedMapped,  ///< pinned and mapped for CUDA (registered aligned memory, else cudaHostAlloc): GPU kernels read pages in place (zero-copy)
  kAligned,       ///< page-aligned pageable memory: no GPU, a CPU-only build, or asked for
};

constexpr const char* to_string(HostMemoryKind k) noexcept {
  return k == HostMemoryKind::kPinnedMapped ? "pinned-mapped" : "aligned";
}

/// What the caller asks for; kAuto takes pinned mapped memory when CUDA and a GPU are present.
enum class HostMemoryRequest : std::uint8_t { kAuto, kAligned };

struct PoolStats {
  std::int64_t capacity_pages = 0;
  std::int64_t used_pages = 0;
  std::int64_t page_bytes = 0;
  std::int64_t free_pages() const noexcept { return capacity_pages - used_pages; }
};

/// Owns `capacity_pages` pages of `layout.page_bytes()` each, allocated once. Never one allocation
/// per page; pages never move, so pointers and device addresses stay valid while allocated.
class HostKVPool {
 public:
  /// Sizes the pool to floor(pool_bytes / (page_bytes + summary_bytes)) pages.
  /// Throws InvalidArgument for a bad layout or a pool smaller than one page.
  HostKVPool(const PageLayout& layout, std::size_t pool_bytes, HostMemoryRequest request = HostMemoryRequest::kAuto);
  ~HostKVPool();
  HostKVPool(const HostKVPool&) = delete;
  HostKVPool& operator=(const HostKVPool&) = delete;

  /// Takes `n` pages, all or none: throws OutOfCapacity (and takes nothing) when fewer are free.
  std::vector<PageId> allocate(std::int64_t n);
  /// Returns pages to the free list. Throws InvalidArgument for an id out of range or not allocated
  /// (checked for every id before any is freed).
  void free(std::span<const PageId> pages);

  const PageLayout& layout() const noexcept { return layout_; }
  PoolStats stats() const;
  std::int64_t capacity_pages() const noexcept { return capacity_pages_; }
  bool is_allocated(PageId id) const;

  std::byte* page(PageId id) noexcept { return pages_ + static_cast<std::size_t>(id) * layout_.page_bytes(); }
  const std::byte* page(PageId id) const noexcept {
    return pages_ + static_cast<std::size_t>(id) * layout_.page_bytes();
  }
  std::byte* summary(PageId id) noexcept {
    return summaries_ + static_cast<std::size_t>(id) * layout_.summary_bytes();
  }
  const std::byte* summary(PageId id) const noexcept {
    return summaries_ + static_cast<std::size_t>(id) * layout_.summary_bytes();
  }

  /// Base of the page arena ([capacity][page_bytes]) and of the summary arena
  /// ([capacity][kv_heads][3][head_dim]); with kPinnedMapped both are valid device addresses too (UVA).
  const std::byte* pages_base() const noexcept { return pages_; }
  const std::byte* summaries_base() const noexcept { return summaries_; }

  HostMemoryKind memory_kind() const noexcept { return kind_; }
  /// Why this kind was chosen, e.g. "no CUDA device (cudaGetDeviceCount: no CUDA-capable device)".
  const std::string& memory_note() const noexcept { return note_; }

 private:
  PageLayout layout_;
  std::int64_t capacity_pages_ = 0;
  std::byte* pages_ = nullptr;
  std::byte* summaries_ = nullptr;
  HostMemoryKind kind_ = HostMemoryKind::kAligned;
  bool allocated_by_cuda_ = false;  // cudaHostAlloc (freed by CUDA), else aligned memory, maybe registered
  std::string note_;
  mutable std::mutex mutex_;
  std::vector<PageId> free_list_;       // stack of free ids
  std::vector<std::uint8_t> allocated_;  // 1 when handed out
};

}  // namespace hattn
