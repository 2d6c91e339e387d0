#pragma once
// CPU page scoring from summaries and CPU page selection (top-k and attention-mass threshold), so the
// library runs end to end without a GPU and the CPU side selects its own share of pages.
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/kernels/cpu_isa.hpp"
#include "hattn/kv/host_kv_pool.hpp"

namespace hattn {

/// Query heads per KV head the CPU scoring takes (its log-sum-exp holds a batch of summaries' logits
/// for every head of the group); Config::validate asks the same of a model.
inline constexpr int kMaxCpuScoreGroup = 256;

/// Scores of pages for the query heads of one GQA group, from the page summaries:
///   upper[i]    = max over group heads of scale * sum_d max(q_d * min_d, q_d * max_d)  (Quest bound)
///   estimate[i] = log(tokens_i) + log(mean over group heads of exp(scale * q . mean_i))
/// (log of the estimated unnormalised attention mass of the page; natural log).
/// q: [group][head_dim] fp32, group_size in [1, kMaxCpuScoreGroup]. pages: ids in token order; last_page_tokens
/// valid tokens in the last.
/// isa: the path that computes them (sums differ in rounding between paths); one this CPU supports
/// (cpu_supports), else InvalidArgument. kAvx512Bf16 scores on the AVX-512 path.
void cpu_score_pages(const HostKVPool& pool, int kv_head, std::span<const float> q, int group_size, float scale,
                     std::span<const PageId> pages, int last_page_tokens, std::span<float> upper,
                     std::span<float> estimate, CpuIsa isa = detect_cpu_isa());

/// The same scores for the coarse groups of a sequence of `tokens` tokens (two-level scoring):
/// group_summaries as PagedKVStore::group_summaries() holds them (fp32 [groups][kv_heads][3][head_dim]);
/// a group's tokens are page_size x kPagesPerSummaryGroup, fewer in the last. upper/estimate: one per group.
void cpu_score_groups(const PageLayout& layout, std::span<const float> group_summaries, int kv_head,
                      std::span<const float> q, int group_size, float scale, std::int64_t tokens,
                      std::span<float> upper, std::span<float> estimate, CpuIsa isa = detect_cpu_isa());

/// Positions (indices into `scores`) of the k highest scores, plus the forced positions
/// [0, sink_pages) and [n - local_pages, n), all restricted to [begin, end); ascending, no duplicates.
/// Ties go to the lower position; NaN ranks lowest. k counts the forced positions too (k < forced ->
/// forced only). O(n): one nth_element.
void cpu_select_top_k(std::span<const float> scores, int k, int sink_pages, int local_pages, int begin, int end,
                      std::vector<std::int32_t>& out);

/// The mass-threshold rule (PSA's, with Quest's ranking): positions in descending `rank` (ties to
/// the lower position, NaN lowest) until the estimated mass exp(log_mass) they add reaches
/// `threshold` in (0, 1] of the total estimated mass over [begin, end), capped at max_pages, plus the
/// forced positions as in cpu_select_top_k; ascending, no duplicates. The forced positions are
/// attended anyway, so their mass counts toward the threshold; max_pages caps the positions added
/// beyond them (the highest-ranked max_pages of the prefix). The added positions are the shortest
/// prefix of the rank order that reaches the threshold. O(n) expected: repeated halving with
/// nth_element. `rank` is the Quest bound and `log_mass` the mean-key estimate (cpu_score_pages):
/// ranking by the mean key itself dilutes a few-token needle inside a page and drops it, while the
/// bound keeps it; the estimate still says how much mass has been covered.
void cpu_select_mass(std::span<const float> rank, std::span<const float> log_mass, float threshold, int max_pages,
                     int sink_pages, int local_pages, int begin, int end, std::vector<std::int32_t>& out);

}  // namespace hattn
