// Page scoring from the page summaries (DESIGN.md step 1): Quest's upper bound and PSA's mean-key
// estimate for every page of every (request, KV head) segment, all query heads of a GQA group at once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "detail/dispatch.cuh"
#include "detail/fast_divmod.cuh"
#include "detail/launch_check.cuh"
#include "detail/launch_checks.hpp"
#include "detail/pdl.cuh"
#include "detail/score_item.cuh"
#include "detail/vec.cuh"
#include "hattn/kernels/cuda_score.hpp"

namespace hattn::cuda {
namespace {

constexpr int kLanesPerPage = detail::kLanesPerItem;
constexpr int kThreads = 256;

// Items are (page, KV head) pairs of one request in summary order (page-major, heads inner), so a
// block's lane groups stream consecutive 768-byte (page, head) summaries of a page's KV heads: one
// contiguous run per page instead of one 256-byte row per page and head 6 KB apart (the per-head
// grid read 1.2 TB/s on an H100). q of all heads sits in shared memory as float4s ordered
// [q_head][quad][lane], so the eight lanes of an item read 128 contiguous bytes: no bank conflicts
// (a lane-major layout was 4-way conflicted, 16 loads per head and item). In candidate mode (two-level
// scoring) a block's items are (KV head, candidate) pairs instead, a head's candidates being the pages
// of its kept groups.
//
// Two resident blocks of 256 threads (126 registers): cutting the budget for three or four spills and
// was slower (H100, 2026-12-07, 128K bound + estimate rows: 25.5 us at two, 36.2 at three, 50.0 at four).
template <class T, int D>
__global__ void __launch_bounds__(kThreads, D <= 128 ? 2 : 1) ScorePagesKernel(const __grid_constant__ ScoreParams p) {
  using Lanes = detail::SummaryLanes<T, D>;
  constexpr int kLoads = Lanes::kLoads;
  constexpr int kQuads = Lanes::kQuads;
  detail::pdl_launch_dependents();
  // Where the caller vouches for its inputs (inputs_ready, detail/pdl.cuh), the tables and q are
  // read, and q staged, while the kernel before finishes. Summaries and kept groups only after the wait.
  if (!p.inputs_ready) detail::pdl_wait();
  const int group = p.q_heads / p.kv_heads;
  const int b = blockIdx.y;
  const int first = p.page_indptr[b];
  const int n = p.page_indptr[b + 1] - first;
  const bool by_candidate = p.kept_groups != nullptr;
  // A request of more pages than an int counts (page_indptr is the caller's, on the device): the
  // launcher bounds the candidate mode's count, a request's pages only the kernel can see.
  if (!by_candidate && static_cast<long long>(n) * p.kv_heads > 0x7fffffffLL) __trap();
  const int items = (by_candidate ? p.candidates : n) * p.kv_heads;
  const int len = p.seq_len[b];
  const int group_first = by_candidate ? p.group_indptr[b] : 0;
  const int groups = by_candidate ? p.group_indptr[b + 1] - group_first : 0;
  extern __shared__ float4 q_smem[];  // [q_heads][kQuads][kLanesPerPage]
  detail::stage_q<T, D>(p.q + static_cast<long long>(b) * p.q_heads * D, p.q_heads, q_smem);
  detail::pdl_wait();
  // More kept groups than candidate room would drop the last ones (the forced local groups).
  if (by_candidate && threadIdx.x < p.kv_heads &&
      p.kept_count[b * p.kv_heads + threadIdx.x] * kPagesPerSummaryGroup > p.candidates)
    __trap();
  __syncthreads();

  const int lane = threadIdx.x % kLanesPerPage;
  const int items_per_block = blockDim.x / kLanesPerPage;
  const int stride = gridDim.x * items_per_block;
  const long long out_base = static_cast<long long>(first) * p.kv_heads;
  const bool want_upper = p.upper != nullptr, want_estimate = p.estimate != nullptr;
  const bool blended = p.blended != nullptr;
  // Raw rows of the next item are loaded before the current one is scored (software pipelining),
  // so each lane keeps two items of loads in flight.
  uint4 raw[3][kLoads] = {};
  // Item w is (page w / kv_heads, head w % kv_heads), or (head w / candidates, entry w % candidates)
  // in candidate mode: one FastDivmod instead of several run-time divisions per item.
  const detail::FastDivmod per(by_candidate ? p.candidates : p.kv_heads);
  auto head_of = [&](int w) { return by_candidate ? per.div(w) : per.mod(w); };
  // Page position of item w, -1 for a candidate entry past the kept groups' pages.
  auto position_of = [&](int w) {
    if (!by_candidate) return per.div(w);
    const int h = per.div(w), j = w - h * p.candidates;
    const int kept = j / kPagesPerSummaryGroup;
    if (kept >= p.kept_count[b * p.kv_heads + h]) return -1;
    const long long at = static_cast<long long>(group_first) * p.kv_heads + static_cast<long long>(h) * groups + kept;
    const int i = p.kept_groups[at] * kPagesPerSummaryGroup + j % kPagesPerSummaryGroup;
    return i < n ? i : -1;
  };
  // Page ids are read one item further ahead than the summaries, so a summary load never waits for
  // its page-table load first (H100, 128K tokens, min/max rows only: 24.6 -> 22.8 us).
  auto page_of = [&](int w) {
    const int i = w < items ? position_of(w) : -1;
    return i >= 0 ? p.page_table[first + i] : -1;
  };
  auto load = [&](int w, int page) {
    if (page < 0) return;
    const T* rows =
        static_cast<const T*>(p.summaries) + (static_cast<long long>(page) * p.kv_heads + head_of(w)) * 3 * D;
    detail::load_summary_rows<T, D>(rows, lane, want_upper, want_estimate, raw);
  };
  int w = blockIdx.x * items_per_block + static_cast<int>(threadIdx.x) / kLanesPerPage;
  const int first_w = w - static_cast<int>(threadIdx.x) / kLanesPerPage;
  load(w, page_of(w));
  int next_page = page_of(w + stride);
  // Trip count from the block's first item so every lane of a warp runs the shuffles together.
  for (int base = first_w; base < items; base += stride, w += stride) {
    const bool live = w < items;
    const int h = live ? head_of(w) : 0;
    // The rows are copied out before the next item's loads overwrite `raw`.
    uint4 rows[3][kLoads];
#pragma unroll
    for (int r = 0; r < 3; ++r)
#pragma unroll
      for (int l = 0; l < kLoads; ++l) rows[r][l] = raw[r][l];
    load(w + stride, next_page);
    next_page = page_of(w + 2 * stride);
    float best_upper, est_max, est_sum;
    detail::score_item<T, D>(rows, q_smem + h * group * kQuads * kLanesPerPage, group, p.scale, want_estimate,
                             best_upper, est_max, est_sum);
    if (live && lane == 0) {
      const int i = position_of(w);
      const long long at = by_candidate ? static_cast<long long>(b * p.kv_heads + h) * p.candidates + (w - h * p.candidates)
                                        : out_base + static_cast<long long>(h) * n + i;
      if (by_candidate) {
        p.position_of[at] = i;
        if (i < 0) {  // padding past the kept groups' pages: never selected
          if (want_estimate) p.estimate[at] = -INFINITY;
          if (want_upper) p.upper[at] = -INFINITY;
          continue;
        }
      }
      const float estimate = detail::item_estimate(min(p.page_size, len - i * p.page_size), est_max, est_sum, group);
      if (want_estimate) p.estimate[at] = estimate;
      if (want_upper)
        p.upper[at] = blended && p.blended[b * p.kv_heads + h] ? estimate + p.blend * (best_upper - estimate) : best_upper;
    }
  }
}

}  // namespace

namespace detail {

bool check_score_params(const ScoreParams& p, const char* where) {
  const bool by_group = p.dtype == DType::kFloat32;  // the coarse pass over group summaries
  hattn::detail::require(p.batch >= 0, where, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0, where, "q_heads",
                         p.q_heads, "a positive multiple of kv_heads");
  if (by_group)
    hattn::detail::require(p.page_size > 0, where, "page_size (tokens of a group)", p.page_size, "> 0");
  else
    hattn::detail::require(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, where, "page_size",
                           p.page_size, "16, 32 or 64");
  if (p.batch == 0) return false;
  hattn::detail::require(p.q && p.summaries && p.page_table && p.page_indptr && p.seq_len, where, "pointers",
                         "null", "all set");
  hattn::detail::require(p.upper != nullptr || p.estimate != nullptr, where, "upper/estimate", "both null",
                         "at least one set");
  hattn::detail::require(p.batch <= 65535, where, "batch", p.batch, "<= 65535");
  hattn::detail::require(p.blended == nullptr || (p.upper != nullptr && p.estimate != nullptr), where, "blended",
                         "set", "upper and estimate set too");
  if (p.kept_groups != nullptr) {
    hattn::detail::require(p.kept_count && p.group_indptr && p.position_of, where,
                           "kept_count/group_indptr/position_of", "null", "all set with kept_groups");
    hattn::detail::require(p.candidates > 0 && p.candidates % kPagesPerSummaryGroup == 0, where, "candidates",
                           p.candidates, "a positive multiple of ", kPagesPerSummaryGroup);
    hattn::detail::require(!by_group, where, "dtype", p.dtype, "the KV dtype (the fine pass reads page summaries)");
    const long long entries = static_cast<long long>(p.batch) * p.kv_heads * p.candidates;
    hattn::detail::require(entries <= 0x7fffffffLL, where, "batch * kv_heads * candidates", entries, "< 2^31");
  } else {
    hattn::detail::require(p.candidates == 0 && p.position_of == nullptr, where, "candidates/position_of",
                           p.candidates, "0 and null without kept_groups");
  }
  constexpr std::size_t kMaxQFloats = 96 * 1024 / sizeof(float);  // q of every head in shared memory
  const std::size_t q_floats = static_cast<std::size_t>(p.q_heads) * p.head_dim;
  hattn::detail::require(q_floats <= kMaxQFloats, where, "q_heads * head_dim", q_floats, "<= 24576");
  return true;
}

}  // namespace detail

void launch_score_pages(const ScoreParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_score_pages";
  if (!detail::check_score_params(p, kWhere)) return;
  const std::size_t smem = static_cast<std::size_t>(p.q_heads) * p.head_dim * sizeof(float);
  int device = 0, sms = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto launch = [&]<class T>() {
    detail::dispatch_head_dim(p.head_dim, kWhere, [&]<int D>() {
      const auto kernel = ScorePagesKernel<T, D>;
      if (smem > 48 * 1024)
        HATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(smem)));
      // One wave of resident blocks shared by the requests, each block looping with its prefetch:
      // a second partial wave left most SMs idle at its end (512 blocks of which ~260 fit at once).
      int per_sm = 0;
      HATTN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
      const int blocks_per_request = std::max(1, std::max(per_sm, 1) * sms / p.batch);
      detail::launch_programmatic(kernel, dim3(blocks_per_request, p.batch), dim3(kThreads), smem, stream, p);
    });
  };
  if (p.dtype == DType::kFloat32) launch.template operator()<float>();  // the coarse pass over group summaries
  else detail::dispatch_kv_dtype(p.dtype, kWhere, launch);
}

}  // namespace hattn::cuda
