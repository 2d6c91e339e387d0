// CPU page scoring from summaries (Quest bound, mean-key mass estimate) and page selection (top-k and
// PSA's mass threshold), each O(n) in the number of pages.
#include "hattn/kernels/cpu_select.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "hattn/core/error.hpp"
#include "hattn/kv/page_summary.hpp"

namespace hattn {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Descending by value, ties to the lower position; NaN ranks below everything so the order stays a
// strict weak order whatever the scores hold.
struct Higher {
  const float* v;
  bool operator()(std::int32_t a, std::int32_t b) const noexcept {
    const float x = std::isnan(v[a]) ? kNegInf : v[a];
    const float y = std::isnan(v[b]) ? kNegInf : v[b];
    return x > y || (x == y && a < b);
  }
};

void check_range(const char* where, std::size_t n, int sink_pages, int local_pages, int begin, int end) {
  detail::require(sink_pages >= 0, where, "sink_pages", sink_pages, ">= 0");
  detail::require(local_pages >= 0, where, "local_pages", local_pages, ">= 0");
  detail::require(begin >= 0 && begin <= end && static_cast<std::size_t>(end) <= n, where, "[begin, end)",
                  [&] { return detail::concat("[", begin, ", ", end, ")"); }, "inside [0, ", n, "]");
}

bool is_forced(std::int64_t i, std::int64_t n, int sink_pages, int local_pages) noexcept {
  return i < sink_pages || i >= n - local_pages;
}

// Writes the non-forced positions of [begin, end) to out and returns how many; appends nothing else.
std::size_t candidates(std::size_t n, int sink_pages, int local_pages, int begin, int end,
                       std::vector<std::int32_t>& out) {
  out.clear();
  for (int i = begin; i < end; ++i)
    if (!is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages)) out.push_back(i);
  return out.size();
}

void append_forced_and_sort(std::size_t n, int sink_pages, int local_pages, int begin, int end,
                            std::vector<std::int32_t>& out) {
  for (int i = begin; i < end; ++i)
    if (is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages)) out.push_back(i);
  std::sort(out.begin(), out.end());
}

}  // namespace

namespace {

// Bound and log estimated mass of one summary (rows lo, hi, mean of head_dim fp32 values) for the
// query heads of a GQA group: the formulas of cpu_score_pages, shared with cpu_score_groups.
// Each sum runs in kLanes partial sums, added at the end: independent lanes the compiler turns into
// vector registers, where one running sum is a serial chain it may not reorder (no -ffast-math).
void score_summary(const float* lo, const float* hi, const float* mean, int dim, std::span<const float> q,
                   int group_size, float scale, float log_tokens, float log_group, float& upper, float& estimate) {
  constexpr int kLanes = 16;
  const int vec_dim = dim / kLanes * kLanes;
  float best = kNegInf;
  float est_max = kNegInf;
  float est_sum = 0.0f;
  for (int g = 0; g < group_size; ++g) {
    const float* qg = q.data() + static_cast<std::size_t>(g) * dim;
    float bound_lanes[kLanes] = {}, dot_lanes[kLanes] = {};
    for (int d0 = 0; d0 < vec_dim; d0 += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const int d = d0 + j;
        bound_lanes[j] += std::max(qg[d] * lo[d], qg[d] * hi[d]);
        dot_lanes[j] += qg[d] * mean[d];
      }
    float bound = 0.0f, dot = 0.0f;
    for (int j = 0; j < kLanes; ++j) bound += bound_lanes[j], dot += dot_lanes[j];
    for (int d = vec_dim; d < dim; ++d) {
      bound += std::max(qg[d] * lo[d], qg[d] * hi[d]);
      dot += qg[d] * mean[d];
    }
    best = std::max(best, scale * bound);
    const float logit = scale * dot;
    // Running log-sum-exp so no group head overflows exp.
    if (logit > est_max) {
      est_sum = est_sum * std::exp(est_max - logit) + 1.0f;
      est_max = logit;
    } else {
      est_sum += std::exp(logit - est_max);
    }
  }
  upper = best;
  estimate = log_tokens + est_max + std::log(est_sum) - log_group;
}

// A summary row of T widened to fp32; the dtype is fixed per call, so the loop has no switch in it.
template <class T>
void widen_row(const std::byte* summary, std::size_t offset, int dim, float* out) {
  const T* row = reinterpret_cast<const T*>(summary) + offset;
  for (int d = 0; d < dim; ++d) out[d] = to_float(row[d]);
}

void check_score_args(const char* where, const PageLayout& layout, int kv_head, std::span<const float> q,
                      int group_size, std::size_t items, std::span<float> upper, std::span<float> estimate) {
  detail::require(kv_head >= 0 && kv_head < layout.kv_heads, where, "kv_head", kv_head,
                  "in [0, ", layout.kv_heads, ")");
  detail::require(group_size >= 1, where, "group_size", group_size, ">= 1");
  detail::require(q.size() == static_cast<std::size_t>(group_size) * layout.head_dim, where, "q.size()", q.size(),
                  "group_size * head_dim = ", group_size * layout.head_dim);
  detail::require(upper.size() == items && estimate.size() == items, where, "upper/estimate size",
                  [&] { return detail::concat(upper.size(), "/", estimate.size()); }, "one per item = ", items);
}

}  // namespace

void cpu_score_pages(const HostKVPool& pool, int kv_head, std::span<const float> q, int group_size, float scale,
                     std::span<const PageId> pages, int last_page_tokens, std::span<float> upper,
                     std::span<float> estimate) {
  const PageLayout& layout = pool.layout();
  constexpr const char* where = "cpu_score_pages";
  const int dim = layout.head_dim;
  check_score_args(where, layout, kv_head, q, group_size, pages.size(), upper, estimate);
  if (pages.empty()) return;
  detail::require(last_page_tokens >= 1 && last_page_tokens <= layout.page_size, where, "last_page_tokens",
                  last_page_tokens, "in [1, ", layout.page_size, "]");

  // Rows widened to fp32 once per page, then plain loops the compiler vectorises. head_dim <= 256
  // (PageLayout::validate), so the rows fit on the stack: no allocation per call.
  float rows[3 * 256];
  float* lo = rows;
  float* hi = lo + dim;
  float* mean = hi + dim;
  const float log_full = std::log(static_cast<float>(layout.page_size));
  const float log_group = std::log(static_cast<float>(group_size));
  auto score_all = [&]<class T>() {
    for (std::size_t i = 0; i < pages.size(); ++i) {
      const std::byte* s = pool.summary(pages[i]);
      widen_row<T>(s, layout.summary_offset(kv_head, 0), dim, lo);
      widen_row<T>(s, layout.summary_offset(kv_head, 1), dim, hi);
      widen_row<T>(s, layout.summary_offset(kv_head, 2), dim, mean);
      const float log_tokens = i + 1 == pages.size() ? std::log(static_cast<float>(last_page_tokens)) : log_full;
      score_summary(lo, hi, mean, dim, q, group_size, scale, log_tokens, log_group, upper[i], estimate[i]);
    }
  };
  switch (layout.dtype) {
    case DType::kFloat32: score_all.template operator()<float>(); break;
    case DType::kFloat16: score_all.template operator()<half_t>(); break;
    case DType::kBFloat16: score_all.template operator()<bfloat16_t>(); break;
  }
}

void cpu_score_groups(const PageLayout& layout, std::span<const float> group_summaries, int kv_head,
                      std::span<const float> q, int group_size, float scale, std::int64_t tokens,
                      std::span<float> upper, std::span<float> estimate) {
  constexpr const char* where = "cpu_score_groups";
  const std::size_t elems = layout.summary_elems();
  const std::int64_t group_tokens = static_cast<std::int64_t>(layout.page_size) * kPagesPerSummaryGroup;
  const auto groups = static_cast<std::size_t>((tokens + group_tokens - 1) / group_tokens);
  detail::require(tokens >= 0, where, "tokens", tokens, ">= 0");
  detail::require(group_summaries.size() >= groups * elems, where, "group_summaries.size()", group_summaries.size(),
                  ">= groups x summary elements = ", groups * elems);
  check_score_args(where, layout, kv_head, q, group_size, groups, upper, estimate);
  const float log_group = std::log(static_cast<float>(group_size));
  for (std::size_t g = 0; g < groups; ++g) {
    const float* s = group_summaries.data() + g * elems;
    const std::int64_t in_group = std::min(group_tokens, tokens - static_cast<std::int64_t>(g) * group_tokens);
    score_summary(s + layout.summary_offset(kv_head, 0), s + layout.summary_offset(kv_head, 1),
                  s + layout.summary_offset(kv_head, 2), layout.head_dim, q, group_size, scale,
                  std::log(static_cast<float>(in_group)), log_group, upper[g], estimate[g]);
  }
}

void cpu_select_top_k(std::span<const float> scores, int k, int sink_pages, int local_pages, int begin, int end,
                      std::vector<std::int32_t>& out) {
  constexpr const char* where = "cpu_select_top_k";
  check_range(where, scores.size(), sink_pages, local_pages, begin, end);
  detail::require(k >= 0, where, "k", k, ">= 0");
  const std::size_t n = scores.size();
  std::int64_t forced = 0;
  for (int i = begin; i < end; ++i) forced += is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages);
  const std::size_t free = candidates(n, sink_pages, local_pages, begin, end, out);
  const std::size_t take = std::min<std::size_t>(free, static_cast<std::size_t>(std::max<std::int64_t>(0, k - forced)));
  if (take < free) {
    std::nth_element(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(take), out.end(), Higher{scores.data()});
    out.resize(take);
  }
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
  // Masses relative to the largest, in double so a long tail of small pages still adds up.
  float top = kNegInf;
  for (int i = begin; i < end; ++i)
    if (!std::isnan(lm[i])) top = std::max(top, lm[i]);
  auto mass = [&](std::int32_t i) {
    return top == kNegInf || std::isnan(lm[i]) ? 0.0 : std::exp(static_cast<double>(lm[i]) - top);
  };
  double total = 0.0, forced_mass = 0.0;
  for (int i = begin; i < end; ++i) {
    total += mass(i);
    if (is_forced(i, static_cast<std::int64_t>(n), sink_pages, local_pages)) forced_mass += mass(i);
  }
  const std::size_t free = candidates(n, sink_pages, local_pages, begin, end, out);
  // The forced pages are attended anyway, so their mass counts; the rest is the shortest prefix of
  // the rank order whose estimated mass reaches what is missing. Found by repeated halving with
  // nth_element (n + n/2 + ... comparisons), so no sort of all pages.
  double need = static_cast<double>(threshold) * total - forced_mass;
  // Invariant: out[0, lo) are taken and rank above out[lo, hi), which rank above out[hi, free); the
  // answer takes between lo and hi positions.
  std::size_t lo = 0, hi = free;
  const Higher higher{rank.data()};
  while (need > 0.0 && lo < hi) {
    if (hi - lo == 1) {
      lo = hi;
      break;
    }
    const std::size_t mid = lo + (hi - lo) / 2;
    std::nth_element(out.begin() + static_cast<std::ptrdiff_t>(lo), out.begin() + static_cast<std::ptrdiff_t>(mid),
                     out.begin() + static_cast<std::ptrdiff_t>(hi), higher);
    double upper_mass = 0.0;  // of the mid - lo highest-ranked of [lo, hi)
    for (std::size_t j = lo; j < mid; ++j) upper_mass += mass(out[j]);
    if (upper_mass >= need) {
      hi = mid;
    } else {
      need -= upper_mass;
      lo = mid;
    }
  }
  std::size_t take = lo;
  if (take > static_cast<std::size_t>(max_pages)) {
    std::nth_element(out.begin(), out.begin() + max_pages, out.begin() + static_cast<std::ptrdiff_t>(take), higher);
    take = static_cast<std::size_t>(max_pages);
  }
  out.resize(take);
  append_forced_and_sort(n, sink_pages, local_pages, begin, end, out);
}

}  // namespace hattn
