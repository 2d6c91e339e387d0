// CPU page scoring from summaries (Quest bound, mean-key mass estimate) and page selection (top-k and
// PSA's mass threshold), each O(n) in the number of pages.
#include "hattn/kernels/cpu_select.hpp"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/kv/page_summary.hpp"
#include "score_kernel.hpp"

namespace hattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// A candidate of the rank order as one integer: the score's order-preserving bits above the
// complement of its position, so a larger key ranks higher and equal scores go to the lower
// position; NaN counts as -inf and -0 as +0, as the comparator these keys replaced compared them.
// nth_element then compares integers in place: comparing scores through positions, each tested for
// NaN, had made the mass rule's passes cost about what the decode of the pages they pick does.
std::uint64_t rank_key(float v, std::int32_t position) noexcept {
  float x = std::isnan(v) ? kNegInf : v;
  if (x == 0.0f) x = 0.0f;
  std::uint32_t u = std::bit_cast<std::uint32_t>(x);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return std::uint64_t{u} << 32 | (0xffffffffu - static_cast<std::uint32_t>(position));
}

std::int32_t key_position(std::uint64_t key) noexcept {
  return static_cast<std::int32_t>(0xffffffffu - static_cast<std::uint32_t>(key));
}

void check_range(const char* where, std::size_t n, int sink_pages, int local_pages, int begin, int end) {
  detail::require(sink_pages >= 0, where, "sink_pages", sink_pages, ">= 0");
  detail::require(local_pages >= 0, where, "local_pages", local_pages, ">= 0");
  detail::require(begin >= 0 && begin <= end && static_cast<std::size_t>(end) <= n, where, "[begin, end)",
                  [&] { return detail::concat("[", begin, ", ", end, ")"); }, "inside [0, ", n, "]");
}

bool is_forced(std::int64_t i, std::int64_t n, int sink_pages, int local_pages) noexcept {
  return i < sink_pages || i >= n - local_pages;
}

// The rank keys of the non-forced positions of [begin, end), in keys (cleared first).
void candidate_keys(std::span<const float> rank, int sink_pages, int local_pages, int begin, int end,
                    std::vector<std::uint64_t>& keys) {
  keys.clear();
  const auto n = static_cast<std::int64_t>(rank.size());
  for (int i = begin; i < end; ++i)
    if (!is_forced(i, n, sink_pages, local_pages)) keys.push_back(rank_key(rank[i], i));
}

// Scratch of the selections, one per thread (the engine selects segments on its pool's threads), so
// a step allocates nothing once the longest segment has been seen.
std::vector<std::uint64_t>& key_scratch() {
  thread_local std::vector<std::uint64_t> keys;
  return keys;
}

void append_forced_and_sort(std::size_t n, int sink_pages, int local_pages, int begin, int end,
                            std::vector<std::int32_t>& out) {
  for (int i = begin; i < end; ++i)
    if (is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages)) out.push_back(i);
  std::sort(out.begin(), out.end());
}

}  // namespace

namespace {

using detail::cpu::SummaryRange;
using ScoreKernel = void (*)(const SummaryRange&);

template <class Tag>
void run_score_kernel(const SummaryRange& r) {
  detail::cpu::ScoreSummaries{}(Tag{}, r);
}

// The kernel of `isa`; the BF16 path's dot product is for keys, so scoring takes plain AVX-512 there.
ScoreKernel score_kernel(const char* where, CpuIsa isa) {
  detail::require(cpu_supports(isa), where, "isa", to_string(isa), "a path this CPU runs (cpu_supports)");
  switch (isa) {
#if HATTN_CPU_HAVE_AVX512
    case CpuIsa::kAvx512Bf16:
    case CpuIsa::kAvx512: return &run_score_kernel<xsimd::avx512bw>;
#endif
#if HATTN_CPU_HAVE_AVX2
    case CpuIsa::kAvx2: return &run_score_kernel<xsimd::fma3<xsimd::avx2>>;
#endif
    default: return &run_score_kernel<xsimd::sse2>;
  }
}

void check_score_args(const char* where, const PageLayout& layout, int kv_head, std::span<const float> q,
                      int group_size, std::size_t items, std::span<float> upper, std::span<float> estimate) {
  detail::require(kv_head >= 0 && kv_head < layout.kv_heads, where, "kv_head", kv_head,
                  "in [0, ", layout.kv_heads, ")");
  detail::require(group_size >= 1 && group_size <= detail::cpu::kMaxScoreGroup, where, "group_size", group_size,
                  "in [1, ", detail::cpu::kMaxScoreGroup, "]");
  detail::require(q.size() == static_cast<std::size_t>(group_size) * layout.head_dim, where, "q.size()", q.size(),
                  "group_size * head_dim = ", group_size * layout.head_dim);
  detail::require(upper.size() == items && estimate.size() == items, where, "upper/estimate size",
                  [&] { return detail::concat(upper.size(), "/", estimate.size()); }, "one per item = ", items);
}

// What a scoring call of one KV head shares, pages or groups: the head's rows, the group's query,
// the outputs (one per item, as check_score_args made sure). The caller adds where the summaries are.
SummaryRange head_rows(const PageLayout& layout, int kv_head, std::span<const float> q, int group_size, float scale,
                       std::span<float> upper, std::span<float> estimate) {
  SummaryRange r;
  r.n = upper.size();
  r.lo = layout.summary_offset(kv_head, 0);
  r.hi = layout.summary_offset(kv_head, 1);
  r.mean = layout.summary_offset(kv_head, 2);
  r.head_dim = layout.head_dim;
  r.q = q.data();
  r.group = group_size;
  r.scale = scale;
  r.upper = upper.data();
  r.estimate = estimate.data();
  return r;
}

}  // namespace

void cpu_score_pages(const HostKVPool& pool, int kv_head, std::span<const float> q, int group_size, float scale,
                     std::span<const PageId> pages, int last_page_tokens, std::span<float> upper,
                     std::span<float> estimate, CpuIsa isa) {
  const PageLayout& layout = pool.layout();
  constexpr const char* where = "cpu_score_pages";
  check_score_args(where, layout, kv_head, q, group_size, pages.size(), upper, estimate);
  const ScoreKernel kernel = score_kernel(where, isa);
  if (pages.empty()) return;
  detail::require(last_page_tokens >= 1 && last_page_tokens <= layout.page_size, where, "last_page_tokens",
                  last_page_tokens, "in [1, ", layout.page_size, "]");

  SummaryRange r = head_rows(layout, kv_head, q, group_size, scale, upper, estimate);
  r.base = pool.summary(0);
  r.stride = layout.summary_bytes();
  r.ids = pages.data();
  r.dtype = layout.dtype;
  r.full_tokens = layout.page_size;
  r.last_tokens = last_page_tokens;
  kernel(r);
}

void cpu_score_groups(const PageLayout& layout, std::span<const float> group_summaries, int kv_head,
                      std::span<const float> q, int group_size, float scale, std::int64_t tokens,
                      std::span<float> upper, std::span<float> estimate, CpuIsa isa) {
  constexpr const char* where = "cpu_score_groups";
  const std::size_t elems = layout.summary_elems();
  const std::int64_t group_tokens = static_cast<std::int64_t>(layout.page_size) * kPagesPerSummaryGroup;
  const auto groups = static_cast<std::size_t>((tokens + group_tokens - 1) / group_tokens);
  detail::require(tokens >= 0, where, "tokens", tokens, ">= 0");
  detail::require(group_summaries.size() >= groups * elems, where, "group_summaries.size()", group_summaries.size(),
                  ">= groups x summary elements = ", groups * elems);
  check_score_args(where, layout, kv_head, q, group_size, groups, upper, estimate);
  const ScoreKernel kernel = score_kernel(where, isa);
  if (groups == 0) return;
  SummaryRange r = head_rows(layout, kv_head, q, group_size, scale, upper, estimate);
  r.base = reinterpret_cast<const std::byte*>(group_summaries.data());
  r.stride = elems * sizeof(float);
  r.dtype = DType::kFloat32;
  r.full_tokens = static_cast<int>(group_tokens);
  r.last_tokens = static_cast<int>(tokens - static_cast<std::int64_t>(groups - 1) * group_tokens);
  kernel(r);
}

void cpu_select_top_k(std::span<const float> scores, int k, int sink_pages, int local_pages, int begin, int end,
                      std::vector<std::int32_t>& out) {
  constexpr const char* where = "cpu_select_top_k";
  check_range(where, scores.size(), sink_pages, local_pages, begin, end);
  detail::require(k >= 0, where, "k", k, ">= 0");
  const std::size_t n = scores.size();
  std::vector<std::uint64_t>& keys = key_scratch();
  candidate_keys(scores, sink_pages, local_pages, begin, end, keys);
  const std::size_t free = keys.size();
  const std::int64_t forced = (end - begin) - static_cast<std::int64_t>(free);  // the range's other positions
  const std::size_t take = std::min<std::size_t>(free, static_cast<std::size_t>(std::max<std::int64_t>(0, k - forced)));
  if (take < free)
    std::nth_element(keys.begin(), keys.begin() + static_cast<std::ptrdiff_t>(take), keys.end(), std::greater<>{});
  out.clear();
  for (std::size_t j = 0; j < take; ++j) out.push_back(key_position(keys[j]));
  append_forced_and_sort(n, sink_pages, local_pages, begin, end, out);
}

void cpu_select_mass(std::span<const float> rank, std::span<const float> log_mass, float threshold, int max_pages,
                     int sink_pages, int local_pages, int begin, int end, std::vector<std::int32_t>& out) {
  constexpr const char* where = "cpu_select_mass";
  detail::require(rank.size() == log_mass.size(), where, "rank.size()", rank.size(),
                  "log_mass.size() = ", log_mass.size());
  check_range(where, log_mass.size(), sink_pages, local_pages, begin, end);
  detail::require(threshold > 0.0f && threshold <= 1.0f, where, "threshold", threshold, "in (0, 1]");
  detail::require(max_pages >= 0, where, "max_pages", max_pages, ">= 0");
  const std::size_t n = log_mass.size();
  const float* lm = log_mass.data();
  // Masses relative to the largest, in double so a long tail of small pages still adds up; each
  // exp once, kept by position for the passes below.
  float top = kNegInf;
  for (int i = begin; i < end; ++i)
    if (!std::isnan(lm[i])) top = std::max(top, lm[i]);
  thread_local std::vector<double> masses;
  masses.resize(static_cast<std::size_t>(end - begin));
  double total = 0.0, forced_mass = 0.0;
  for (int i = begin; i < end; ++i) {
    const double m = top == kNegInf || std::isnan(lm[i]) ? 0.0 : std::exp(static_cast<double>(lm[i]) - top);
    masses[static_cast<std::size_t>(i - begin)] = m;
    total += m;
    if (is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages)) forced_mass += m;
  }
  auto mass = [&](std::uint64_t key) { return masses[static_cast<std::size_t>(key_position(key) - begin)]; };
  std::vector<std::uint64_t>& keys = key_scratch();
  candidate_keys(rank, sink_pages, local_pages, begin, end, keys);
  const std::size_t free = keys.size();
  // The forced pages are attended anyway, so their mass counts; the rest is the shortest prefix of
  // the rank order whose estimated mass reaches what is missing. Found by repeated halving with
  // nth_element (n + n/2 + ... comparisons), so no sort of all pages.
  double need = static_cast<double>(threshold) * total - forced_mass;
  // Invariant: keys[0, lo) are taken and rank above keys[lo, hi), which rank above keys[hi, free);
  // the answer takes between lo and hi of them.
  std::size_t lo = 0, hi = free;
  const auto first = keys.begin();
  while (need > 0.0 && lo < hi) {
    if (hi - lo == 1) {
      lo = hi;
      break;
    }
    const std::size_t mid = lo + (hi - lo) / 2;
    std::nth_element(first + static_cast<std::ptrdiff_t>(lo), first + static_cast<std::ptrdiff_t>(mid),
                     first + static_cast<std::ptrdiff_t>(hi), std::greater<>{});
    double upper_mass = 0.0;  // of the mid - lo highest-ranked of [lo, hi)
    for (std::size_t j = lo; j < mid; ++j) upper_mass += mass(keys[j]);
    if (upper_mass >= need) {
      hi = mid;
    } else {
      need -= upper_mass;
      lo = mid;
    }
  }
  std::size_t take = lo;
  if (take > static_cast<std::size_t>(max_pages)) {
    std::nth_element(first, first + max_pages, first + static_cast<std::ptrdiff_t>(take), std::greater<>{});
    take = static_cast<std::size_t>(max_pages);
  }
  out.clear();
  for (std::size_t j = 0; j < take; ++j) out.push_back(key_position(keys[j]));
  append_forced_and_sort(n, sink_pages, local_pages, begin, end, out);
}

}  // namespace hattn
