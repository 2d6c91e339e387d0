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

std::size_t arena_alignment(std::size_t bytes) { return bytes >= kHugePage ? kHugePage : kArenaAlignment; }
// What allocate_arena really allocates for `bytes` (and what registration must cover).
std::size_t arena_bytes(std::size_t bytes) { return round_up(bytes, arena_alignment(bytes)); }

std::byte* allocate_arena(std::size_t bytes) {
  const std::size_t align = arena_alignment(bytes);
  auto* p = static_cast<std::byte*>(std::aligned_alloc(align, arena_bytes(bytes)));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Advice only: where THP is off (or "always" already) this changes nothing, so failure is ignored.
  if (p != nullptr && align == kHugePage)
    (void)madvise(p, arena_bytes(bytes), MADV_HUGEPAGE);
#endif
  return p;
}


struct Arenas {
  std::byte* pages = nullptr;
  std::byte* summaries = nullptr;
  bool allocated_by_cuda = false;  // cudaHostAlloc, not registered aligned memory
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
bool allocate_pinned_plain(std::size_t page_bytes, std::size_t summary_bytes, Arenas& out, std::string& note) {
  const unsigned flags = cudaHostAllocMapped | cudaHostAllocPortable;
  void* pages = nullptr;
  void* summaries = nullptr;
  cudaError_t e = cudaHostAlloc(&pages, page_bytes, flags);
  if (e == cudaSuccess) e = cudaHostAlloc(&summaries, summary_bytes, flags);
  if (e != cudaSuccess) {
    if (pages) cudaFreeHost(pages);
    note = detail::concat("cudaHostAlloc of ", page_bytes + summary_bytes, " bytes failed (", cudaGetErrorString(e),
                          "); using aligned host memory");
    cudaGetLastError();
    return false;
  }
  out.pages = static_cast<std::byte*>(pages);
  out.summaries = static_cast<std::byte*>(summaries);
  out.allocated_by_cuda = true;
  note = "pinned mapped host memory (cudaHostAlloc)";
  return true;
}

// The arenas are allocated like aligned ones (2 MB aligned, offered to transparent huge pages) and
// then registered with CUDA (pinned, mapped): the CPU kernels keep huge-page TLB reach over the pool,
// which cudaHostAlloc's 4 KB pages lose, and GPU kernels still read the pages in place.
bool try_allocate_pinned(std::size_t page_bytes, std::size_t summary_bytes, Arenas& out, std::string& note) {
  int devices = 0;
  if (cudaError_t e = cudaGetDeviceCount(&devices); e != cudaSuccess || devices == 0) {
    note = detail::concat("no CUDA device (cudaGetDeviceCount: ",
                          e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), "); using aligned host memory");
    cudaGetLastError();
    return false;
  }
  int device = 0, host_pointer_ok = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&host_pointer_ok, cudaDevAttrCanUseHostPointerForRegisteredMem, device);
  if (!host_pointer_ok) {  // registered memory would need a separate device address: plain pinned memory
    cudaGetLastError();
    return allocate_pinned_plain(page_bytes, summary_bytes, out, note);
  }
  Arenas a = allocate_aligned(page_bytes, summary_bytes);
  const unsigned flags = cudaHostRegisterMapped | cudaHostRegisterPortable;
  cudaError_t e = cudaHostRegister(a.pages, arena_bytes(page_bytes), flags);
  const bool pages_registered = e == cudaSuccess;
  if (e == cudaSuccess) e = cudaHostRegister(a.summaries, arena_bytes(summary_bytes), flags);
  if (e != cudaSuccess) {
    if (pages_registered) cudaHostUnregister(a.pages);
    note = detail::concat("cudaHostRegister of ", page_bytes + summary_bytes, " bytes failed (", cudaGetErrorString(e),
                          "); using aligned host memory");
    cudaGetLastError();
    out = a;  // still usable by the CPU
    return false;
  }
  out = a;
  note = detail::concat("pinned mapped host memory (registered, huge-page advised) on ", devices, " CUDA device(s)");
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
                  ">= one page plus its summary (", per_page, " bytes)");
  detail::require(capacity_pages_ <= INT32_MAX, "HostKVPool", "pool_bytes", pool_bytes,
                  "small enough for 32-bit page ids");
  const std::size_t page_arena = static_cast<std::size_t>(capacity_pages_) * layout_.page_bytes();
  const std::size_t summary_arena = static_cast<std::size_t>(capacity_pages_) * layout_.summary_bytes();

  // The bookkeeping first: once the arenas exist nothing here may throw (the destructor would not run).
  free_list_.resize(static_cast<std::size_t>(capacity_pages_));
  // Hand out low ids first so a fresh pool fills its arena front to back.
  for (std::int64_t i = 0; i < capacity_pages_; ++i) free_list_[i] = static_cast<PageId>(capacity_pages_ - 1 - i);
  allocated_.assign(static_cast<std::size_t>(capacity_pages_), 0);

  Arenas arenas;
  bool pinned = false;
#if HATTN_WITH_CUDA
  if (request == HostMemoryRequest::kAuto) pinned = try_allocate_pinned(page_arena, summary_arena, arenas, note_);
  else note_ = "aligned host memory, as requested";
#else
  note_ = request == HostMemoryRequest::kAuto ? "built without CUDA; using aligned host memory"
                                              : "aligned host memory, as requested";
#endif
  if (arenas.pages == nullptr) arenas = allocate_aligned(page_arena, summary_arena);
  pages_ = arenas.pages;
  summaries_ = arenas.summaries;
  kind_ = pinned ? HostMemoryKind::kPinnedMapped : HostMemoryKind::kAligned;
  allocated_by_cuda_ = arenas.allocated_by_cuda;
}

HostKVPool::~HostKVPool() {
#if HATTN_WITH_CUDA
  if (allocated_by_cuda_) {
    cudaFreeHost(pages_);
    cudaFreeHost(summaries_);
    return;
  }
  if (kind_ == HostMemoryKind::kPinnedMapped) {
    cudaHostUnregister(pages_);
    cudaHostUnregister(summaries_);
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
                    "in [0, ", capacity_pages_, ")");
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
