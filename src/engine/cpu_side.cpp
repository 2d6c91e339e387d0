#include "cpu_side.hpp"

#include <algorithm>
#include <limits>
#include <numeric>

#include "engine_clock.hpp"
#include "hattn/detail/select_by_rule.hpp"
#include "hattn/kernels/cpu_select.hpp"

namespace hattn::detail {

CpuSide::CpuSide(const Config& config, const PagedKVStore& store, ThreadPool& threads, CpuIsa isa)
    : config_(config), store_(store), threads_(threads), decoder_(threads, isa) {}


void CpuSide::select_segment(const LayerWork& work, int row, int head, const float* q, Segment& seg,
                             int& last_tokens) {
  const ModelShape& shape = config_.shape;
  const SeqId seq = work.rows[row];
  const auto table = store_.pages(seq, work.layer);
  const int n = static_cast<int>(table.size());
  const int tail_tokens = store_.last_page_tokens(seq, work.layer);
  seg.positions.clear();
  seg.pages.clear();
  last_tokens = config_.page_size;
  if (n == 0) return;

  const SegmentRule& rule = work.rules[static_cast<std::size_t>(row) * shape.kv_heads + head];
  seg.upper.resize(static_cast<std::size_t>(n));
  seg.estimate.resize(static_cast<std::size_t>(n));
  const int group = shape.group_size();
  const float* qg = q + (static_cast<std::size_t>(row) * shape.q_heads + static_cast<std::size_t>(head) * group) *
                            shape.head_dim;
  const std::span<const float> q_group{qg, static_cast<std::size_t>(group) * shape.head_dim};
  if (config_.coarse_keep > 0) {
    // Two-level scoring: the coarse level picks the groups, and only their pages' summaries are read.
    const auto groups = static_cast<std::size_t>(summary_groups(n));
    seg.group_upper.resize(groups);
    seg.group_estimate.resize(groups);
    cpu_score_groups(store_.layout(), store_.group_summaries(seq, work.layer), head, q_group, group,
                     config_.logit_scale(), store_.length(seq, work.layer), seg.group_upper, seg.group_estimate,
                     isa());
    seg.candidates = kept_group_pages(seg.group_upper, seg.group_estimate, rule, config_.coarse_keep, n,
                                      config_.sink_pages, config_.local_pages);
    seg.pages.clear();
    for (std::int32_t p : seg.candidates) seg.pages.push_back(table[static_cast<std::size_t>(p)]);
    seg.upper.resize(seg.pages.size());
    seg.estimate.resize(seg.pages.size());
    const int last = seg.candidates.back() == n - 1 ? tail_tokens : config_.page_size;
    cpu_score_pages(store_.pool(), head, q_group, group, config_.logit_scale(), seg.pages, last, seg.upper,
                    seg.estimate, isa());
    select_among_candidates(seg.candidates, seg.upper, seg.estimate, rule, n, config_.sink_pages,
                            config_.local_pages, /*widen=*/true, seg.positions);
    seg.pages.clear();
  } else {
    cpu_score_pages(store_.pool(), head, q_group, group, config_.logit_scale(), table, tail_tokens, seg.upper,
                    seg.estimate, isa());
    select_by_rule(seg.upper, seg.estimate, rule, config_.sink_pages, config_.local_pages, /*widen=*/true,
                   seg.positions);
  }
  for (std::int32_t p : seg.positions) seg.pages.push_back(table[p]);
  if (!seg.positions.empty() && seg.positions.back() == n - 1) last_tokens = tail_tokens;
}

void CpuSide::compute(const LayerWork& work, const float* q, float* out, float* lse, int* selected) {
  const int heads = config_.shape.kv_heads;
  const std::size_t segments = work.rows.size() * static_cast<std::size_t>(heads);
  if (segments_.size() < segments) segments_.resize(segments);
  std::vector<int> last_tokens(segments, config_.page_size);

  // Scoring and selection of every segment in parallel; each task owns its segment's scratch.
  threads_.parallel_for(static_cast<std::int64_t>(segments), [&](std::int64_t s, int) {
    select_segment(work, static_cast<int>(s / heads), static_cast<int>(s % heads), q, segments_[s], last_tokens[s]);
  });
  decode_segments(work, q, last_tokens, out, lse, selected);
}

void CpuSide::compute_selected(const LayerWork& work, const float* q, const std::int32_t* positions,
                               const std::int32_t* offsets, const std::int32_t* counts, float* out, float* lse,
                               int* selected) {
  const int heads = config_.shape.kv_heads;
  const std::size_t segments = work.rows.size() * static_cast<std::size_t>(heads);
  if (segments_.size() < segments) segments_.resize(segments);
  std::vector<int> last_tokens(segments, config_.page_size);
  for (std::size_t s = 0; s < segments; ++s) {
    const SeqId seq = work.rows[s / heads];
    const auto table = store_.pages(seq, work.layer);
    const int n = static_cast<int>(table.size());
    Segment& seg = segments_[s];
    seg.positions.clear();
    seg.pages.clear();
    const std::int32_t* list = positions + offsets[s];
    for (int i = 0; i < counts[s]; ++i) {
      require(list[i] >= 0 && list[i] < n, "HybridAttention::run", "CPU selection position", list[i],
              "in [0, ", n, ") (pages of the request)");
      seg.pages.push_back(table[list[i]]);
    }
    if (counts[s] > 0 && list[counts[s] - 1] == n - 1) last_tokens[s] = store_.last_page_tokens(seq, work.layer);
  }
  decode_segments(work, q, last_tokens, out, lse, selected);
}

void CpuSide::decode_segments(const LayerWork& work, const float* q, std::span<const int> last_tokens, float* out,
                              float* lse, int* selected) {
  const ModelShape& shape = config_.shape;
  const int heads = shape.kv_heads;
  const int group = shape.group_size();
  const std::size_t segments = work.rows.size() * static_cast<std::size_t>(heads);
  items_.clear();
  for (std::size_t s = 0; s < segments; ++s) {
    const int row = static_cast<int>(s / heads), head = static_cast<int>(s % heads);
    selected[s] = static_cast<int>(segments_[s].pages.size());
    const std::size_t qrow = static_cast<std::size_t>(row) * shape.q_heads + static_cast<std::size_t>(head) * group;
    if (segments_[s].pages.empty()) {
      std::fill(out + qrow * shape.head_dim, out + (qrow + group) * shape.head_dim, 0.0f);
      std::fill(lse + qrow, lse + qrow + group, -std::numeric_limits<float>::infinity());
      continue;
    }
    CpuDecodeItem item;
    item.q = q + qrow * shape.head_dim;
    item.pages = segments_[s].pages.data();
    item.n_pages = static_cast<std::int32_t>(segments_[s].pages.size());
    item.last_page_tokens = last_tokens[s];
    item.kv_head = head;
    item.out = out + qrow * shape.head_dim;
    item.lse = lse + qrow;
    items_.push_back(item);
  }
  // Longest lists first, so the tail of the step is short pieces (Fluxion's priority order).
  std::stable_sort(items_.begin(), items_.end(),
                   [](const CpuDecodeItem& a, const CpuDecodeItem& b) { return a.n_pages > b.n_pages; });
  const double begin = engine_clock_us();
  decoder_.run(store_.pool(), group, config_.logit_scale(), items_);
  last_kernel_us_ = engine_clock_us() - begin;
}

}  // namespace hattn::detail
