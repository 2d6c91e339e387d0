// Two-level scoring (hattn/kernels/cuda_two_level.hpp): the four launches, built from one
// description so that the engine, the benchmark and the tests run the same pipeline, and the fused
// form that also selects: the coarse scores, then one kernel that keeps each segment's groups, scores
// their pages and selects among them.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "detail/block_top_k.cuh"
#include "detail/dispatch.cuh"
#include "detail/launch_check.cuh"
#include "detail/launch_checks.hpp"
#include "detail/pdl.cuh"
#include "detail/phase_marks.cuh"
#include "detail/score_item.cuh"
#include "hattn/core/error.hpp"
#include "hattn/kernels/cuda_two_level.hpp"
#include "hattn/kv/page_summary.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerBlock = kThreads / detail::kLanesPerItem;

struct KeepScoreSelectParams {
  ScoreParams fine;     // candidate mode; kept_groups / kept_count unused (the kernel keeps them itself)
  SelectParams keep;    // the group selection: its outputs receive the kept groups, for the caller
  SelectParams select;  // the page selection among the candidates
  int max_groups = 0;   // staging room for a request's groups
  std::uint32_t* arrivals = nullptr;  // [batch * kv_heads], zero between launches (select.workspace)
  unsigned long long* marks = nullptr;  // TwoLevelScoreParams::phase_ns
};

// Grid (blocks per segment, segments). Every block of segment s = (request b, KV head h):
//  1. selects the groups to keep from the coarse scores, as launch_select_pages would (all blocks of
//     the segment alike: 512 entries at 128K tokens, cheaper than a launch and its wait);
//  2. scores its share of the kept groups' pages, each (page, head) summary read by eight lanes, the
//     next item's rows loaded before the current one is scored, as in the scoring kernel;
//  3. counts itself in; the last of the segment's blocks to arrive selects the pages among the
//     segment's candidates from the scores the others wrote (L2-resident) and resets the count.
// Steps 1 and 3 replace two launches, each a launch latency plus a grid-wide wait.
template <class T, int D>
__global__ void __launch_bounds__(kThreads, D <= 128 ? 2 : 1) KeepScoreSelectKernel(
    const __grid_constant__ KeepScoreSelectParams p) {
  using Lanes = detail::SummaryLanes<T, D>;
  constexpr int kLanes = detail::kLanesPerItem;
  detail::pdl_launch_dependents();
  detail::mark_earliest(p.marks, kTwoLevelEarliestStart);
  const ScoreParams& f = p.fine;
  // Tables, budgets, exclusions and q are the caller's; read before the wait only on its word.
  if (!f.inputs_ready) detail::pdl_wait();
  __shared__ detail::TopKShared<kThreads> sh;
  __shared__ int is_last;
  extern __shared__ float4 smem[];
  const int group = f.q_heads / f.kv_heads;
  float4* q_smem = smem;  // [group][quad][lane]
  const int room = max(p.max_groups, f.candidates);
  auto* keys = reinterpret_cast<std::uint32_t*>(smem + group * (D / 4));
  auto* at = reinterpret_cast<std::int32_t*>(keys + room);
  std::int32_t* kept = at + room;  // [max_groups]

  const int s = blockIdx.y, b = s / f.kv_heads, h = s % f.kv_heads;
  const int first = f.page_indptr[b];
  const int n = f.page_indptr[b + 1] - first;
  const int len = f.seq_len[b];
  const int group_first = f.group_indptr[b];
  const int groups = f.group_indptr[b + 1] - group_first;
  detail::TopKRule keep_rule;
  keep_rule.budget = p.keep.budget_pages[s];
  keep_rule.sink_end = min(max(p.keep.sink_pages, 0), groups);
  keep_rule.local_begin = max(groups - max(p.keep.local_pages, 0), 0);
  const bool blended = f.blended != nullptr && f.blended[s] != 0;
  detail::stage_q<T, D>(f.q + (static_cast<long long>(b) * f.q_heads + static_cast<long long>(h) * group) * D, group,
                        q_smem);
  detail::pdl_wait();
  detail::mark_latest(p.marks, kTwoLevelLatestWaited);
  // max_groups understated the longest group segment.
  if (groups > p.max_groups) __trap();

  // 1. The groups to keep.
  const long long group_offset = static_cast<long long>(group_first) * f.kv_heads + static_cast<long long>(h) * groups;
  for (int i = threadIdx.x; i < groups; i += kThreads) {
    keys[i] = detail::order_key(p.keep.scores[group_offset + i]);
    at[i] = i;
  }
  __syncthreads();
  const int kept_count = detail::block_top_k<kThreads>(keys, at, groups, keep_rule, sh, kept);
  // More kept groups than candidate room would drop the last ones (the forced local groups).
  if (kept_count * kPagesPerSummaryGroup > f.candidates) __trap();
  __syncthreads();  // kept[] complete
  detail::mark_latest(p.marks, kTwoLevelLatestKept);
  if (blockIdx.x == 0) {
    for (int i = threadIdx.x; i < kept_count; i += kThreads) p.keep.selected[group_offset + i] = kept[i];
    if (threadIdx.x == 0) p.keep.selected_count[s] = kept_count;
  }

  // 2. Scores of this block's candidates: entry j of the segment is page kept[j / 16] x 16 + j % 16.
  const int lane = threadIdx.x % kLanes;
  const int stride = gridDim.x * kItemsPerBlock;
  const long long out = static_cast<long long>(s) * f.candidates;
  const bool want_upper = f.upper != nullptr, want_estimate = f.estimate != nullptr;
  auto position_of = [&](int j) {
    const int g = j / kPagesPerSummaryGroup;
    if (g >= kept_count) return -1;
    const int i = kept[g] * kPagesPerSummaryGroup + j % kPagesPerSummaryGroup;
    return i < n ? i : -1;
  };
  auto page_of = [&](int j) {
    const int i = j < f.candidates ? position_of(j) : -1;
    return i >= 0 ? f.page_table[first + i] : -1;
  };
  uint4 raw[3][Lanes::kLoads] = {};
  auto load = [&](int page) {
    if (page < 0) return;
    const T* rows = static_cast<const T*>(f.summaries) + (static_cast<long long>(page) * f.kv_heads + h) * 3 * D;
    detail::load_summary_rows<T, D>(rows, lane, want_upper, want_estimate, raw);
  };
  int j = blockIdx.x * kItemsPerBlock + static_cast<int>(threadIdx.x) / kLanes;
  const int first_j = j - static_cast<int>(threadIdx.x) / kLanes;
  load(page_of(j));
  int next_page = page_of(j + stride);
  // Trip count from the block's first item so every lane of a warp runs the shuffles together.
  for (int base = first_j; base < f.candidates; base += stride, j += stride) {
    uint4 rows[3][Lanes::kLoads];
#pragma unroll
    for (int r = 0; r < 3; ++r)
#pragma unroll
      for (int l = 0; l < Lanes::kLoads; ++l) rows[r][l] = raw[r][l];
    load(next_page);
    next_page = page_of(j + 2 * stride);
    float best_upper, est_max, est_sum;
    detail::score_item<T, D>(rows, q_smem, group, f.scale, want_estimate, best_upper, est_max, est_sum);
    if (j < f.candidates && lane == 0) {
      const int i = position_of(j);
      f.position_of[out + j] = i;
      if (i < 0) {  // padding past the kept groups' pages: never selected
        if (want_estimate) f.estimate[out + j] = -INFINITY;
        if (want_upper) f.upper[out + j] = -INFINITY;
        continue;
      }
      const float estimate = detail::item_estimate(min(f.page_size, len - i * f.page_size), est_max, est_sum, group);
      if (want_estimate) f.estimate[out + j] = estimate;
      if (want_upper) f.upper[out + j] = blended ? estimate + f.blend * (best_upper - estimate) : best_upper;
    }
  }

  // 3. The last block of the segment selects. Each writer fences its scores before the block counts
  // itself in, so the last block sees every block's.
  __threadfence();
  __syncthreads();
  detail::mark_latest(p.marks, kTwoLevelLatestScored);
  if (threadIdx.x == 0) is_last = atomicAdd(&p.arrivals[s], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  for (int i = threadIdx.x; i < f.candidates; i += kThreads) {
    keys[i] = detail::order_key(__ldcg(p.select.scores + out + i));
    at[i] = __ldcg(f.position_of + out + i);
  }
  __syncthreads();
  detail::mark_latest(p.marks, kTwoLevelLatestSelectLoaded);
  detail::TopKRule page_rule;
  page_rule.budget = p.select.budget_pages[s];
  page_rule.sink_end = min(max(p.select.sink_pages, 0), n);
  page_rule.local_begin = max(n - max(p.select.local_pages, 0), 0);
  page_rule.exclude_begin = p.select.exclude_begin ? p.select.exclude_begin[b] : 0;
  page_rule.exclude_end = p.select.exclude_end ? p.select.exclude_end[b] : 0;
  const long long page_offset = static_cast<long long>(first) * f.kv_heads + static_cast<long long>(h) * n;
  const int written = detail::block_top_k<kThreads>(keys, at, f.candidates, page_rule, sh, p.select.selected + page_offset);
  if (threadIdx.x == 0) {
    p.select.selected_count[s] = written;
    p.arrivals[s] = 0;  // every block of the segment has counted itself in
  }
  detail::mark_latest(p.marks, kTwoLevelLatestSelected);
}

}  // namespace

// Where the fused kernel applies: top-k over the candidates of the two-level scores, with room for
// the arrival counts, and segments small enough for one block's shared memory.
bool select_two_level_fuses(const TwoLevelScoreParams& p, const SelectParams& sel) {
  return sel.mass_threshold == 0.0f && sel.workspace != nullptr && p.max_groups > 0 &&
         p.max_groups <= kFusedMaxGroups && p.candidates <= kFusedMaxCandidates && p.pages.dtype != DType::kFloat32 &&
         static_cast<long long>(p.pages.batch) * p.pages.kv_heads <= 65535;  // segments along the grid's y
}

TwoLevelStages two_level_stages(const TwoLevelScoreParams& p) {
  constexpr const char* kWhere = "two_level_stages";
  const ScoreParams& sp = p.pages;
  hattn::detail::require(sp.kept_groups == nullptr && sp.position_of == nullptr && sp.candidates == 0, kWhere,
                         "pages.kept_groups/position_of/candidates", "set", "unset (they come from the group level)");
  hattn::detail::require(p.group_table && p.group_indptr && p.group_summaries && p.group_upper && p.group_budget &&
                             p.kept && p.kept_count && p.position_of,
                         kWhere, "pointers", "null", "all set (first_group and group_estimate may be null)");
  hattn::detail::require(sp.blended == nullptr || p.group_estimate != nullptr, kWhere, "group_estimate", "null",
                         "set where pages.blended ranks by the blend");
  hattn::detail::require(p.sink_pages >= 0, kWhere, "sink_pages", p.sink_pages, ">= 0");
  hattn::detail::require(p.local_pages >= 0, kWhere, "local_pages", p.local_pages, ">= 0");
  TwoLevelStages t;

  GroupSummaryParams& g = t.rebuild;
  g.summaries = sp.summaries;
  g.page_table = sp.page_table;
  g.page_indptr = sp.page_indptr;
  g.seq_len = sp.seq_len;
  g.group_table = p.group_table;
  g.group_indptr = p.group_indptr;
  g.first_group = p.first_group;
  g.batch = sp.batch;
  g.kv_heads = sp.kv_heads;
  g.head_dim = sp.head_dim;
  g.page_size = sp.page_size;
  g.dtype = sp.dtype;
  g.group_summaries = p.group_summaries;

  // The coarse pass is the page launch over the group summaries: groups as pages of 16x the tokens.
  ScoreParams& c = t.coarse;
  c = sp;
  c.summaries = p.group_summaries;
  c.dtype = DType::kFloat32;
  c.page_table = p.group_table;
  c.page_indptr = p.group_indptr;
  c.page_size = sp.page_size * kPagesPerSummaryGroup;
  c.upper = p.group_upper;
  c.estimate = sp.blended ? p.group_estimate : nullptr;

  SelectParams& k = t.keep;
  k.scores = p.group_upper;
  k.page_indptr = p.group_indptr;
  k.batch = sp.batch;
  k.kv_heads = sp.kv_heads;
  k.budget_pages = p.group_budget;
  k.sink_pages = summary_groups(p.sink_pages);
  k.local_pages = max_groups_spanned(p.local_pages);
  k.selected = p.kept;
  k.selected_count = p.kept_count;
  k.max_entries = p.max_groups;
  k.inputs_ready = sp.inputs_ready;

  ScoreParams& f = t.fine;
  f = sp;
  f.kept_groups = p.kept;
  f.kept_count = p.kept_count;
  f.group_indptr = p.group_indptr;
  f.candidates = p.candidates;
  f.position_of = p.position_of;
  return t;
}

void launch_score_two_level(const TwoLevelScoreParams& p, Stream stream) {
  if (p.pages.batch == 0) return;
  const TwoLevelStages t = two_level_stages(p);
  if (p.rebuild_groups) launch_build_group_summaries(t.rebuild, stream);
  launch_score_pages(t.coarse, stream);
  launch_select_pages(t.keep, stream);
  launch_score_pages(t.fine, stream);
}

void launch_select_two_level(const TwoLevelScoreParams& p, const SelectParams& select, Stream stream) {
  constexpr const char* kWhere = "launch_select_two_level";
  if (p.pages.batch == 0) return;
  const ScoreParams& sp = p.pages;
  hattn::detail::require(sp.upper != nullptr, kWhere, "pages.upper", "null", "set (the selection ranks by it)");
  // The selection must be the one over these candidates, as a staged caller would set it.
  hattn::detail::require(select.scores == sp.upper && select.position_of == p.position_of &&
                             select.candidates == p.candidates,
                         kWhere, "select.scores/position_of/candidates", "other buffers",
                         "pages.upper, position_of and candidates of the two-level scores");
  hattn::detail::require(select.batch == sp.batch && select.kv_heads == sp.kv_heads &&
                             select.page_indptr == sp.page_indptr,
                         kWhere, "select.batch/kv_heads/page_indptr", "other values", "those of the scored pages");
  if (!select_two_level_fuses(p, select)) {
    launch_score_two_level(p, stream);
    launch_select_pages(select, stream);
    return;
  }
  const TwoLevelStages t = two_level_stages(p);
  // The fine pass and the selections run inside one kernel: their descriptions pass their launchers'
  // checks all the same (the coarse pass's are its launcher's).
  detail::check_score_params(t.fine, kWhere);
  detail::check_select_params(t.keep, kWhere);
  detail::check_select_params(select, kWhere);
  const long long segments = static_cast<long long>(sp.batch) * sp.kv_heads;
  if (p.rebuild_groups) launch_build_group_summaries(t.rebuild, stream);
  launch_score_pages(t.coarse, stream);

  KeepScoreSelectParams k;
  k.fine = t.fine;
  k.keep = t.keep;
  k.select = select;
  k.max_groups = p.max_groups;
  k.arrivals = static_cast<std::uint32_t*>(select.workspace);
  k.marks = p.phase_ns;
  const int group = sp.q_heads / sp.kv_heads;
  const int room = std::max(p.max_groups, p.candidates);
  const std::size_t smem = static_cast<std::size_t>(group) * sp.head_dim * sizeof(float) +
                           (2 * static_cast<std::size_t>(room) + p.max_groups) * sizeof(std::int32_t);
  int device = 0, sms = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  detail::dispatch_kv_dtype(sp.dtype, kWhere, [&]<class T>() {
    detail::dispatch_head_dim(sp.head_dim, kWhere, [&]<int D>() {
      const auto kernel = KeepScoreSelectKernel<T, D>;
      // Static and dynamic shared memory together may pass the 48 KB default below 48 KB of dynamic.
      HATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
      // One wave of resident blocks shared by the segments, none without a candidate to score.
      int per_sm = 0;
      HATTN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      const long long wave = static_cast<long long>(std::max(per_sm, 1)) * sms;
      // HATTN_FUSED_BLOCKS (tuning, read per launch): blocks per segment instead of the wave's share.
      const char* forced = std::getenv("HATTN_FUSED_BLOCKS");
      const long long want = forced != nullptr && std::atoi(forced) > 0 ? std::atoi(forced) : wave / segments;
      const int per_segment = static_cast<int>(
          std::clamp<long long>(want, 1, (p.candidates + kItemsPerBlock - 1) / kItemsPerBlock));
      detail::launch_programmatic(kernel, dim3(per_segment, static_cast<unsigned>(segments)), dim3(kThreads), smem,
                                  stream, k);
    });
  });
}

}  // namespace hattn::cuda
