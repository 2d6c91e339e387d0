#pragma once
// Accuracy metrics of one decode step of one layer against exact attention: output relative L2
// error, LSE error, attention-mass recall of the selected pages, needle hit, budget used.
//
// The exact side is computed here in double over the same bf16 keys and values the object stores
// (tests check it equals reference::decode); it also yields each page's exact share of the softmax
// mass, which reference::decode does not expose. The selected pages of a run are replayed with the
// kernels' own CPU scoring and selection (cpu_score_pages, cpu_select_top_k / cpu_select_mass, the
// widening to aligned runs) under the rules the plan carried, and checked against the counts the
// object reports in StepStats::selected_pages.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <thread>
#include <utility>
#include <vector>

#include "hattn/core/dtype.hpp"
#include "hattn/core/error.hpp"
#include "hattn/core/model_shape.hpp"
#include "hattn/detail/select_by_rule.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn::eval {

/// Exact attention of one query over every token of one layer.
struct ExactLayer {
  int pages = 0;                  ///< pages of page_size tokens (the last may be partial)
  std::vector<double> out;        ///< [q_heads][head_dim]
  std::vector<double> lse;        ///< [q_heads], natural log of sum exp(scale * q.k)
  std::vector<double> page_mass;  ///< [q_heads][pages]: each page's share of the softmax mass
};

/// keys, values: [n][kv_heads][head_dim] bf16 (the zoo's and the engine's append layout); q:
/// [q_heads][head_dim] fp32. Accumulates in double; KV heads run on up to `threads` threads.
inline ExactLayer exact_layer(std::span<const bfloat16_t> keys, std::span<const bfloat16_t> values, std::int64_t n,
                              const ModelShape& shape, std::span<const float> q, double scale, int page_size,
                              int threads = 0) {
  const int dim = shape.head_dim, heads = shape.kv_heads, group = shape.group_size();
  const std::size_t need = static_cast<std::size_t>(n) * heads * dim;
  detail::require(keys.size() >= need && values.size() >= need, "exact_layer", "keys/values size",
                  std::min(keys.size(), values.size()), ">= n * kv_heads * head_dim = ", need);
  detail::require(q.size() == static_cast<std::size_t>(shape.q_heads) * dim, "exact_layer", "q.size()", q.size(),
                  "q_heads * head_dim");
  detail::require(page_size > 0, "exact_layer", "page_size", page_size, "> 0");
  ExactLayer r;
  r.pages = static_cast<int>((n + page_size - 1) / page_size);
  r.out.assign(static_cast<std::size_t>(shape.q_heads) * dim, 0.0);
  r.lse.assign(static_cast<std::size_t>(shape.q_heads), -std::numeric_limits<double>::infinity());
  r.page_mass.assign(static_cast<std::size_t>(shape.q_heads) * r.pages, 0.0);
  auto one_head = [&](int kvh) {
    std::vector<double> logits(static_cast<std::size_t>(n));
    for (int g = 0; g < group; ++g) {
      const int qh = kvh * group + g;
      const float* qv = &q[static_cast<std::size_t>(qh) * dim];
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t i = 0; i < n; ++i) {
        const bfloat16_t* k = &keys[(static_cast<std::size_t>(i) * heads + kvh) * dim];
        double s = 0;
        for (int d = 0; d < dim; ++d) s += static_cast<double>(qv[d]) * to_float(k[d]);
        logits[i] = s * scale;
        m = std::max(m, logits[i]);
      }
      if (n == 0) continue;
      double sum = 0;
      double* out = &r.out[static_cast<std::size_t>(qh) * dim];
      double* mass = &r.page_mass[static_cast<std::size_t>(qh) * r.pages];
      for (std::int64_t i = 0; i < n; ++i) {
        const double p = std::exp(logits[i] - m);
        sum += p;
        mass[i / page_size] += p;
        const bfloat16_t* v = &values[(static_cast<std::size_t>(i) * heads + kvh) * dim];
        for (int d = 0; d < dim; ++d) out[d] += p * to_float(v[d]);
      }
      for (int d = 0; d < dim; ++d) out[d] /= sum;
      for (int p = 0; p < r.pages; ++p) mass[p] /= sum;
      r.lse[qh] = m + std::log(sum);
    }
  };
  const int workers = std::max(1, std::min(heads, threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (int h = w; h < heads; h += workers) one_head(h);
    });
  for (int h = 0; h < heads; h += workers) one_head(h);
  for (auto& t : pool) t.join();
  return r;
}

/// ||out - ref|| / ||ref|| over one row of head_dim values (0 when both are zero).
inline double relative_l2(std::span<const float> out, std::span<const double> ref) {
  detail::require(out.size() == ref.size(), "relative_l2", "out.size()", out.size(),
                  "ref.size() = ", ref.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double e = static_cast<double>(out[i]) - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
  }
  if (den == 0) return num == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(num / den);
}

/// Exact softmax mass of the selected pages: sum of page_mass over `selected` (page positions).
inline double mass_recall(std::span<const double> page_mass, std::span<const std::int32_t> selected) {
  double s = 0;
  for (std::int32_t p : selected) {
    detail::require(p >= 0 && static_cast<std::size_t>(p) < page_mass.size(), "mass_recall", "selected page", p,
                    "in [0, ", page_mass.size(), ")");
    s += page_mass[static_cast<std::size_t>(p)];
  }
  return s;
}

/// LSE error of attending only the selected set: |lse(selected) - lse(all)| = -log(mass recall),
/// natural log. Infinite when nothing was selected.
inline double lse_error_of_recall(double recall) {
  return recall > 0 ? std::abs(std::log(std::min(1.0, recall))) : std::numeric_limits<double>::infinity();
}

/// Whether every page holding a token of [begin, begin + length) is among `selected` (ascending).
inline bool needle_hit(std::span<const std::int32_t> selected, std::int64_t begin, int length, int page_size) {
  const auto first = static_cast<std::int32_t>(begin / page_size);
  const auto last = static_cast<std::int32_t>((begin + length - 1) / page_size);
  for (std::int32_t p = first; p <= last; ++p)
    if (!std::binary_search(selected.begin(), selected.end(), p)) return false;
  return true;
}

/// Replays the selection of one segment (request, KV head) under `rule`: the pages (positions in the
/// page table, ascending) the rule picks from the page summaries with the CPU kernels, over the whole
/// table, as both backends select (the GPU backend on the GPU, whatever the CPU/GPU split; only the
/// CPU backend widens to the rule's granularity). The harness checks the count against the object's.
inline std::vector<std::int32_t> replay_selection(const PagedKVStore& store, SeqId seq, int layer, int kv_head,
                                                  std::span<const float> q_group, float scale,
                                                  const SegmentRule& rule, int sink_pages, int local_pages,
                                                  bool widen, double coarse_keep = 0.0) {
  const ModelShape& shape = store.shape();
  const auto table = store.pages(seq, layer);
  const int n = static_cast<int>(table.size());
  const int tail = store.last_page_tokens(seq, layer);
  std::vector<float> upper(static_cast<std::size_t>(n)), estimate(static_cast<std::size_t>(n));
  cpu_score_pages(store.pool(), kv_head, q_group, shape.group_size(), scale, table, tail, upper, estimate);
  std::vector<std::int32_t> out;
  if (coarse_keep > 0) {  // two-level scoring (Config::coarse_keep)
    const auto groups = static_cast<std::size_t>(summary_groups(n));
    std::vector<float> group_upper(groups), group_estimate(groups);
    cpu_score_groups(store.layout(), store.group_summaries(seq, layer), kv_head, q_group, shape.group_size(), scale,
                     store.length(seq, layer), group_upper, group_estimate);
    detail::select_two_level(group_upper, group_estimate, upper, estimate, rule, coarse_keep, sink_pages, local_pages,
                             widen, out);
    return out;
  }
  detail::select_by_rule(upper, estimate, rule, sink_pages, local_pages, widen, out);
  return out;
}

/// The pages (per KV head, ascending) that maximise a layer's summed mass recall when its KV heads
/// share round(budget x pages x kv_heads) pages: the (head, page) pairs with the largest exact mass
/// summed over each head's GQA group. Recall is linear in the chosen pairs, so this is the ceiling of
/// every page selector at that average budget (ties to the lower pair).
inline std::vector<std::vector<std::int32_t>> oracle_selection(const ExactLayer& ex, int kv_heads, int group,
                                                              double budget) {
  const int pages = ex.pages;
  std::vector<std::pair<double, std::int32_t>> pairs;  // (group mass, h * pages + p)
  pairs.reserve(static_cast<std::size_t>(kv_heads) * pages);
  for (int h = 0; h < kv_heads; ++h)
    for (int p = 0; p < pages; ++p) {
      double m = 0;
      for (int g = 0; g < group; ++g) m += ex.page_mass[static_cast<std::size_t>(h * group + g) * pages + p];
      pairs.emplace_back(m, h * pages + p);
    }
  const auto k = static_cast<std::size_t>(
      std::clamp<double>(std::round(budget * pages * kv_heads), 0.0, static_cast<double>(pairs.size())));
  std::nth_element(pairs.begin(), pairs.begin() + static_cast<std::ptrdiff_t>(k), pairs.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  std::vector<std::vector<std::int32_t>> sel(static_cast<std::size_t>(kv_heads));
  for (std::size_t i = 0; i < k; ++i) sel[pairs[i].second / pages].push_back(pairs[i].second % pages);
  for (auto& s : sel) std::sort(s.begin(), s.end());
  return sel;
}

/// Running means of the metrics over (step, layer, head) samples.
struct MetricSums {
  double output_error = 0;  ///< sum of per-query-head relative L2 errors
  double lse_error = 0;     ///< sum of per-query-head |lse(selected) - lse(all)|
  double mass_recall = 0;   ///< sum of per-query-head mass recall
  double budget = 0;        ///< sum of per-segment selected share of pages
  std::int64_t q_samples = 0, segments = 0;
  std::int64_t needles = 0, needle_hits = 0;
  std::int64_t replay_checked = 0, replay_matched = 0;  ///< segments whose replayed count matched the object's
  bool has_output = true;   ///< false for selections no object computed (the oracle): no output error

  void add(const MetricSums& o) {
    output_error += o.output_error, lse_error += o.lse_error, mass_recall += o.mass_recall, budget += o.budget;
    q_samples += o.q_samples, segments += o.segments, needles += o.needles, needle_hits += o.needle_hits;
    replay_checked += o.replay_checked, replay_matched += o.replay_matched;
    has_output = has_output && o.has_output;
  }
  /// -1 when no output was computed.
  double mean_output_error() const { return !has_output ? -1 : q_samples ? output_error / q_samples : 0; }
  double mean_lse_error() const { return q_samples ? lse_error / q_samples : 0; }
  double mean_mass_recall() const { return q_samples ? mass_recall / q_samples : 0; }
  double mean_budget() const { return segments ? budget / segments : 0; }
  /// -1 when no needle was looked for.
  double needle_hit_rate() const { return needles ? static_cast<double>(needle_hits) / needles : -1; }
  double replay_match_rate() const { return replay_checked ? static_cast<double>(replay_matched) / replay_checked : -1; }
};

}  // namespace hattn::eval
