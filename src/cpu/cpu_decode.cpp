// CpuDecoder: ISA resolution, the split of work items into tasks along their page lists, and the LSE
// merge of the pieces. The kernels themselves live in the per-ISA files (decode_*.cpp).
#include "hattn/kernels/cpu_decode.hpp"

#include <cpuid.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "decode_kernel.hpp"
#include "hattn/core/error.hpp"

namespace hattn {
namespace {

using detail::cpu::PageRange;
using Kernel = void (*)(const PageRange&);

template <class Tag>
void run_kernel(const PageRange& r) {
  detail::cpu::DecodePages{}(Tag{}, r);
}

Kernel kernel_for(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kGeneric: return &run_kernel<xsimd::sse2>;
#if HATTN_CPU_HAVE_AVX2
    case CpuIsa::kAvx2: return &run_kernel<xsimd::fma3<xsimd::avx2>>;
#endif
#if HATTN_CPU_HAVE_AVX512
    case CpuIsa::kAvx512: return &run_kernel<xsimd::avx512bw>;
#endif
#if HATTN_CPU_HAVE_AVX512BF16
    case CpuIsa::kAvx512Bf16: return &run_kernel<detail::cpu::avx512bf16>;
#endif
    default: return nullptr;
  }
}

// What the paths need beyond what xsimd 8.1 reports: it reads the CPUID feature bits but not whether
// the OS saves the wider registers (XCR0), and it knows nothing of AVX-512 VL, F16C or BF16.
struct CpuFeatures {
  bool os_avx = false, os_avx512 = false;
  bool fma = false, f16c = false, avx2 = false;
  bool avx512f = false, avx512cd = false, avx512dq = false, avx512bw = false, avx512vl = false, avx512bf16 = false;
};

CpuFeatures read_cpu_features() noexcept {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  f.fma = (c >> 12) & 1u;
  f.f16c = (c >> 29) & 1u;
  const bool osxsave = (c >> 27) & 1u;
  if (osxsave) {
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    f.os_avx = (lo & 0x6u) == 0x6u;        // SSE and AVX state
    f.os_avx512 = (lo & 0xe6u) == 0xe6u;   // and opmask, ZMM0-15 upper halves, ZMM16-31
  }
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = (b >> 5) & 1u;
  f.avx512f = (b >> 16) & 1u;
  f.avx512dq = (b >> 17) & 1u;
  f.avx512cd = (b >> 28) & 1u;
  f.avx512bw = (b >> 30) & 1u;
  f.avx512vl = (b >> 31) & 1u;
  __cpuid_count(7, 1, a, b, c, d);
  f.avx512bf16 = (a >> 5) & 1u;
  return f;
}

bool runtime_has(CpuIsa isa) noexcept {
  static const CpuFeatures f = read_cpu_features();
  const auto xs = xsimd::available_architectures();
  switch (isa) {
    case CpuIsa::kGeneric: return true;
    case CpuIsa::kAvx2: return xs.fma3_avx2 && f.os_avx && f.avx2 && f.fma && f.f16c;
    case CpuIsa::kAvx512:
      return xs.avx512bw && runtime_has(CpuIsa::kAvx2) && f.os_avx512 && f.avx512f && f.avx512cd && f.avx512dq &&
             f.avx512bw && f.avx512vl;
    case CpuIsa::kAvx512Bf16: return runtime_has(CpuIsa::kAvx512) && f.avx512bf16;
  }
  return false;
}

// Sizing of the split, tuned for the device host (16 Sapphire Rapids cores): 128K tokens x 8 KV heads
// at a 5% budget is 3,280 pages of 16 tokens (27 MB of bf16 K and V); 8 tasks per worker gives 128
// tasks of ~26 pages (~210 KB, ~35 us at 6 GB/s per core), small enough to balance dynamically on a
// host whose cores are not all equally fast (its memory bandwidth is shared with other tenants) and
// large enough that one merge per task costs little. One sweep there, 5% budget, 16 threads: 1, 2,
// 4, 8 tasks per worker took 814, 779, 661, 632 us. Below 256 tokens a piece is not worth a merge.
// Pieces are capped at ~1 MB of K and V so the last one to start ends soon after the others: without
// the cap a 100% budget over 128K tokens gives 4 MB pieces (~0.6 ms each at a thread's share of
// DRAM). Not measured on its own (the device host moves more than that between instances).
constexpr int kTasksPerWorker = 8;
constexpr int kMinChunkTokens = 256;
constexpr std::size_t kMaxChunkBytes = std::size_t{1} << 20;

struct Task {
  std::int32_t item;
  std::int32_t first_page;
  std::int32_t n_pages;
  std::int32_t slot;  // partial slot of a split item, or -1: write the item's out and lse directly
};

struct AlignedFree {
  void operator()(float* p) const noexcept { std::free(p); }
};

}  // namespace

const char* to_string(CpuIsa isa) noexcept {
  switch (isa) {
    case CpuIsa::kGeneric: return "generic";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

bool cpu_supports(CpuIsa isa) noexcept { return kernel_for(isa) != nullptr && runtime_has(isa); }

CpuIsa detect_cpu_isa() noexcept {
  // xsimd picks the best of the library's arch_list; the checks xsimd 8 lacks may step it down. BF16
  // dot products (not an xsimd 8 arch) do not step it up: measured slower (header).
  CpuIsa best = xsimd::dispatch<detail::cpu::arch_list>(
      []<class Arch>(Arch) { return detail::cpu::isa_of<Arch>(); })();
  for (CpuIsa isa : {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kGeneric})
    if (static_cast<int>(isa) <= static_cast<int>(best) && cpu_supports(isa)) return isa;
  return CpuIsa::kGeneric;
}

struct CpuDecoder::Impl {
  Impl(ThreadPool& t, CpuIsa i) : threads(t), isa(i), kernel(kernel_for(i)) {}

  void plan(int page_size, std::size_t page_kv_bytes) {
    tasks.clear();
    std::int64_t total = 0;
    for (const CpuDecodeItem& it : items) total += it.n_pages;
    const int workers = threads.size();
    // One worker gains nothing from a split, and an unsplit pass is what the split must equal.
    const std::int64_t even = (total + workers * kTasksPerWorker - 1) / (workers * kTasksPerWorker);
    const auto largest = static_cast<std::int64_t>(kMaxChunkBytes / page_kv_bytes);
    const std::int64_t chunk =
        workers == 1 ? std::numeric_limits<std::int32_t>::max()
                     : std::max<std::int64_t>({1, kMinChunkTokens / page_size, std::min(even, largest)});
    std::int32_t slots = 0;
    first_slot.assign(items.size(), -1);
    if (remaining_capacity < items.size()) {
      remaining_capacity = std::max<std::size_t>(items.size(), 2 * remaining_capacity);
      remaining = std::make_unique<std::atomic<std::int32_t>[]>(remaining_capacity);
      pieces.resize(remaining_capacity);
    }
    for (std::size_t i = 0; i < items.size(); ++i) {
      const std::int32_t n = items[i].n_pages;
      pieces[i] = n == 0 ? 0 : static_cast<std::int32_t>((n + chunk - 1) / chunk);
      remaining[i].store(pieces[i], std::memory_order_relaxed);
      if (pieces[i] == 1) tasks.push_back({static_cast<std::int32_t>(i), 0, n, -1});
      if (pieces[i] <= 1) continue;
      first_slot[i] = slots;
      for (std::int32_t p = 0; p < pieces[i]; ++p) {
        const auto first = static_cast<std::int32_t>(static_cast<std::int64_t>(n) * p / pieces[i]);
        const auto last = static_cast<std::int32_t>(static_cast<std::int64_t>(n) * (p + 1) / pieces[i]);
        tasks.push_back({static_cast<std::int32_t>(i), first, last - first, slots + p});
      }
      slots += pieces[i];
    }
    const std::size_t gd = static_cast<std::size_t>(group) * head_dim;
    if (partial_out.size() < static_cast<std::size_t>(slots) * gd) partial_out.resize(static_cast<std::size_t>(slots) * gd);
    if (partial_lse.size() < static_cast<std::size_t>(slots) * group)
      partial_lse.resize(static_cast<std::size_t>(slots) * group);
    const std::size_t need = detail::cpu::work_floats(group, head_dim);
    if (need > work_stride || !work) {
      work_stride = need;
      work.reset(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * need * workers)));
      if (!work) throw OutOfCapacity(detail::concat("CpuDecoder: cannot allocate ", sizeof(float) * need * workers,
                                                    " bytes of scratch"));
    }
  }

  void run_task(std::int64_t t, int worker) {
    const Task& task = tasks[static_cast<std::size_t>(t)];
    const CpuDecodeItem& it = items[static_cast<std::size_t>(task.item)];
    PageRange r = base;
    r.key_offset_bytes = layout.key_offset(it.kv_head, 0) * dtype_bytes(layout.dtype);
    r.value_offset_bytes = layout.value_offset(it.kv_head, 0) * dtype_bytes(layout.dtype);
    r.q = it.q;
    r.pages = it.pages + task.first_page;
    r.token_masks = it.token_masks ? it.token_masks + task.first_page : nullptr;
    r.n_pages = task.n_pages;
    r.last_page_tokens = task.first_page + task.n_pages == it.n_pages ? it.last_page_tokens : layout.page_size;
    const std::size_t gd = static_cast<std::size_t>(group) * head_dim;
    if (task.slot < 0) {
      r.out = it.out;
      r.lse = it.lse;
    } else {
      r.out = partial_out.data() + static_cast<std::size_t>(task.slot) * gd;
      r.lse = partial_lse.data() + static_cast<std::size_t>(task.slot) * group;
    }
    r.work = work.get() + static_cast<std::size_t>(worker) * work_stride;
    kernel(r);
    // The last piece of a split item to finish merges it, so no second pass over the pool is needed.
    if (task.slot >= 0 && remaining[task.item].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(task.item);
  }

  // Joint softmax of an item's pieces, natural-log LSE; empty pieces (lse = -inf) weigh nothing and
  // an item whose pieces are all empty gets out = 0, lse = -inf.
  void merge(std::int32_t item) {
    const CpuDecodeItem& it = items[static_cast<std::size_t>(item)];
    const std::int32_t first = first_slot[static_cast<std::size_t>(item)];
    const std::int32_t n = pieces[static_cast<std::size_t>(item)];
    const std::size_t gd = static_cast<std::size_t>(group) * head_dim;
    for (int h = 0; h < group; ++h) {
      float m = -std::numeric_limits<float>::infinity();
      for (std::int32_t p = 0; p < n; ++p) m = std::max(m, partial_lse[(first + p) * group + h]);
      float* out = it.out + static_cast<std::size_t>(h) * head_dim;
      std::fill(out, out + head_dim, 0.0f);
      if (m == -std::numeric_limits<float>::infinity()) {
        it.lse[h] = m;
        continue;
      }
      float sum = 0.0f;
      for (std::int32_t p = 0; p < n; ++p) {
        const float w = std::exp(partial_lse[(first + p) * group + h] - m);
        if (w == 0.0f) continue;
        sum += w;
        const float* po = partial_out.data() + (first + p) * gd + static_cast<std::size_t>(h) * head_dim;
        for (int d = 0; d < head_dim; ++d) out[d] += w * po[d];
      }
      const float inv = 1.0f / sum;
      for (int d = 0; d < head_dim; ++d) out[d] *= inv;
      it.lse[h] = m + std::log(sum);
    }
  }

  ThreadPool& threads;
  const CpuIsa isa;
  const Kernel kernel;

  // The call in progress.
  std::span<const CpuDecodeItem> items;
  PageLayout layout;
  int group = 0;
  int head_dim = 0;
  PageRange base;

  // Scratch, kept across calls.
  std::vector<Task> tasks;
  std::vector<std::int32_t> first_slot;  // [items]: first partial slot of a split item, or -1
  std::vector<std::int32_t> pieces;      // [items]: tasks the item was split into (0 when empty)
  std::vector<float> partial_out;  // [slots][group][head_dim]
  std::vector<float> partial_lse;  // [slots][group]
  std::unique_ptr<std::atomic<std::int32_t>[]> remaining;  // pieces of item i not yet finished
  std::size_t remaining_capacity = 0;
  std::unique_ptr<float[], AlignedFree> work;  // [workers][work_stride], 64-byte aligned
  std::size_t work_stride = 0;
};

CpuDecoder::CpuDecoder(ThreadPool& threads, CpuIsa isa) {
  detail::require(cpu_supports(isa), "CpuDecoder", "isa", to_string(isa),
                  "a path compiled in and supported by this CPU (see cpu_supports)");
  impl_ = std::make_unique<Impl>(threads, isa);
}

CpuDecoder::~CpuDecoder() = default;

CpuIsa CpuDecoder::isa() const noexcept { return impl_->isa; }

void CpuDecoder::run(const HostKVPool& pool, int group_size, float scale, std::span<const CpuDecodeItem> items) {
  const PageLayout& layout = pool.layout();
  constexpr const char* where = "CpuDecoder::run";
  detail::require(group_size >= 1, where, "group_size", group_size, ">= 1");
  detail::require(std::isfinite(scale), where, "scale", scale, "finite");
  for (std::size_t i = 0; i < items.size(); ++i) {
    const CpuDecodeItem& it = items[i];
    auto field = [i](const char* f) { return [i, f] { return detail::concat("items[", i, "].", f); }; };
    detail::require(it.n_pages >= 0, where, field("n_pages"), it.n_pages, ">= 0");
    detail::require(it.kv_head >= 0 && it.kv_head < layout.kv_heads, where, field("kv_head"), it.kv_head, "in [0, ",
                    layout.kv_heads, ")");
    detail::require(it.out != nullptr && it.lse != nullptr, where, field("out/lse"), "null", "non-null");
    if (it.n_pages > 0) {
      detail::require(it.q != nullptr && it.pages != nullptr, where, field("q/pages"), "null", "non-null");
      detail::require(it.last_page_tokens >= 1 && it.last_page_tokens <= layout.page_size, where,
                      field("last_page_tokens"), it.last_page_tokens, "in [1, ", layout.page_size, "]");
    }
  }
  Impl& s = *impl_;
  s.items = items;
  s.layout = layout;
  s.group = group_size;
  s.head_dim = layout.head_dim;
  s.base = PageRange{};
  s.base.pages_base = pool.pages_base();
  s.base.page_bytes = layout.page_bytes();
  s.base.page_size = layout.page_size;
  s.base.head_dim = layout.head_dim;
  s.base.dtype = layout.dtype;
  s.base.group = group_size;
  s.base.scale_log2 = scale * 1.44269504088896340736f;
  // One item's K and V of one page: what a task reads per page.
  s.plan(layout.page_size, 2 * static_cast<std::size_t>(layout.page_size) * layout.head_dim * dtype_bytes(layout.dtype));
  // Items with nothing to attend are answered here: out = 0, lse = -inf.
  for (const CpuDecodeItem& it : items) {
    if (it.n_pages > 0) continue;
    std::fill(it.out, it.out + static_cast<std::size_t>(group_size) * layout.head_dim, 0.0f);
    std::fill(it.lse, it.lse + group_size, -std::numeric_limits<float>::infinity());
  }
  if (s.tasks.empty()) return;
  // Captures one pointer, so std::function keeps it inline: no allocation per call.
  Impl* impl = impl_.get();
  s.threads.parallel_for(static_cast<std::int64_t>(s.tasks.size()),
                         [impl](std::int64_t task, int worker) { impl->run_task(task, worker); });
}

}  // namespace hattn
