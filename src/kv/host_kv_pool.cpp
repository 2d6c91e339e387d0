#include "hattn/kv/host_kv_pool.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "hattn/core/error.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if HATTN_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace hattn {
namespace {

constexpr std::size_t kArenaAlignment = 4096;
// Arenas of at least one huge page are aligned to it and offered to transparent huge pages: a CPU
// decode pass touches a separate 2-16 KB run of every selected page, a fresh 4 KB TLB entry for
// almost every run, where one 2 MB entry covers 32 pages of 64 KB.
constexpr std::size_t kHugePage = std::size_t{2} << 20;

std::size_t round_up(std::size_t n, std::size_t a) { return (n + a - 1) / a * a; }

std::byte* allocate_arena(std::size_t bytes) {
  const std::size_t align = bytes >= kHugePage ? kHugePage : kArenaAlignment;
  auto* p = static_cast<std::byte*>(std::aligned_alloc(align, round_up(bytes, align)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: where THP is off (or "always" already) this changes nothing, so failure is ignored.
  if (p != nullptr && align == kHugePage)
    (void)madvise(p, round_up(bytes, align), MADV_HUGEPAGE);
#endif
  return p;
}


struct Arenas {
  std::byte* pages = nullptr;
  std::byte* summaries = nullptr;
};

Arenas allocate_aligned(std::size_t page_bytes, std::size_t summary_bytes) {
  Arenas a;
  a.pages = allocate_arena(page_bytes);
  a.summaries = allocate_arena(summary_bytes);
  if (a.pages == nullptr || a.summaries == nullptr) {
    std::free(a.pages);
    std::free(a.summaries);
    throw OutOfCapacity(detail::concat("HostKVPool: cannot allocate ", page_bytes + summary_bytes,
                                       " bytes of host memory"));
  }
  return a;
}

#if HATTN_WITH_CUDA
// Pinned, mapped and portable: any context's kernels read the pages through UVA.
bool try_allocate_pinned(std::size_t page_bytes, std::size_t summary_bytes, Arenas& out, std::string& note) {
  int devices = 0;
  if (cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    note = detail::concat("no CUDA device (cudaGetDeviceCount: ",
                          e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), "); using aligned host memory");
    cudaGetLastError();
    return false;
  }
  const unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable;
  void* pages = nullptr;
  void* summaries = nullptr;
  cudaError_t e = cudaHostAlloc(&pages, page_bytes, flags);
  if (e == cudaSuccess) e = cudaHostAlloc(&summaries, summary_bytes, flags);
  if (e != cudaSuccess) {
    if (pages) cudaFreeHost(pages);
    note = detail::concat("cudaHostAlloc of ", page_bytes + summary_bytes,
                          " bytes failed (", cudaGetErrorString(e), "); using aligned host memory");
    cudaGetLastError();
    return false;
  }
  out.pages = static_cast<std::byte*>(pages);
  out.summaries = static_cast<std::byte*>(summaries);
  note = detail::concat("pinned mapped host memory on ", devices, " CUDA device(s)");
  return true;
}
#endif

}  // namespace

HostKVPool::HostKVPool(const PageLayout& layout, std::size_t pool_bytes, HostMemoryRequest request)
    : layout_(layout) {
  layout_.validate();
  const std::size_t per_page = layout_.page_bytes() + layout_.summary_bytes();
  capacity_pages_ = static_cast<std::int64_t>(pool_bytes / per_page);
  detail::require(capacity_pages_ >= 1, "HostKVPool", "pool_bytes", pool_bytes,
                  detail::concat(">= one page plus its summary (", per_page, " bytes)").c_str());
  detail::require(capacity_pages_ <= INT32_MAX, "HostKVPool", "pool_bytes", pool_bytes,
                  "small enough for 32-bit page ids");
  const std::size_t page_arena = static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes();
  const std::size_t summary_arena = static_cast<std::size_t>(capacity_pages_) * layout_.summary_bytes();

  Arenas arenas;
  bool pinned = false;
#if HATTN_WITH_CUDA
  if (request == HostMemoryRequest::kAuto) pinned = try_allocate_pinned(page_arena, summary_arena, arenas, note_);
  else note_ = "aligned host memory, as requested";
#else
  note_ = request == HostMemoryRequest::kAuto ? "built without CUDA; using aligned host memory"
                                              : "aligned host memory, as requested";
#endif
  if (!pinned) arenas = allocate_aligned(page_arena, summary_arena);
  pages_ = arenas.pages;
  summaries_ = arenas.summaries;
  kind_ = pinned ? HostMemoryKind::kPinnedMapped : HostMemoryKind::kAligned;

  free_list_.resize(static_cast<std::size_t>(capacity_pages_));
  // Hand out low ids first so a fresh pool fills its arena front to back.
  for (std::int64_t i = 0; i < capacity_pages_; ++i) free_list_[i] = static_cast<PageId>(capacity_pages_ - 1 - i);
  allocated_.assign(static_cast<std::size_t>(capacity_pages_), 0);
}

HostKVPool::~HostKVPool() {
#if HATTN_WITH_CUDA
  if (kind_ == HostMemoryKind::kPinnedMapped) {
    cudaFreeHost(pages_);
    cudaFreeHost(summaries_);
    return;
  }
#endif
  std::free(pages_);
  std::free(summaries_);
}

std::vector<PageId> HostKVPool::allocate(std::int64_t n) {
  detail::require(n >= 0, "HostKVPool::allocate", "n", n, ">= 0");
  std::lock_guard lock(mutex_);
  if (n > static_cast<std::int64_t>(free_list_.size()))
    throw OutOfCapacity(detail::concat("HostKVPool::allocate: pool exhausted: need ", n, " pages, ",
                                       free_list_.size(), " free of ", capacity_pages_, " (page_bytes ",
                                       layout_.page_bytes(), ")"));
  std::vector<PageId> out(free_list_.end() - n, free_list_.end());
  std::reverse(out.begin(), out.end());
  free_list_.resize(free_list_.size() - static_cast<std::size_t>(n));
  for (PageId id : out) allocated_[id] = 1;
  return out;
}

void HostKVPool::free(std::span<const PageId> pages) {
  std::lock_guard lock(mutex_);
  for (PageId id : pages) {
    detail::require(id >= 0 && id < capacity_pages_, "HostKVPool::free", "page id", id,
                    detail::concat("in [0, ", capacity_pages_, ")").c_str());
    detail::require(allocated_[id] == 1, "HostKVPool::free", "page id", id, "an allocated page");
  }
  // Two equal ids in one call would pass the check above and corrupt the free list.
  std::vector<PageId> sorted(pages.begin(), pages.end());
  std::sort(sorted.begin(), sorted.end());
  const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  detail::require(dup == sorted.end(), "HostKVPool::free", "page id", dup == sorted.end() ? -1 : *dup,
                  "listed once");
  for (PageId id : pages) {
    allocated_[id] = 0;
    free_list_.push_back(id);
  }
}

PoolStats HostKVPool::stats() const {
  std::lock_guard lock(mutex_);
  return {capacity_pages_, capacity_pages_ - static_cast<std::int64_t>(free_list_.size()),
          static_cast<std::int64_t>(layout_.page_bytes())};
}

bool HostKVPool::is_allocated(PageId id) const {
  std::lock_guard lock(mutex_);
  return id >= 0 && id < capacity_pages_ && allocated_[id] == 1;
}

}  // namespace hattn
