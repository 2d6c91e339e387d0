// Page scoring from the page summaries (DESIGN.md step 1): Quest's upper bound and PSA's mean-key
// estimate for every page of every (request, KV head) segment, all query heads of a GQA group at once.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "detail/dispatch.cuh"
#include "detail/launch_check.cuh"
#include "detail/vec.cuh"
#include "hattn/kernels/cuda_score.hpp"

namespace hattn::cuda {
namespace {

// Eight lanes per page: a page's three summary rows are read as 16-byte vectors by lanes that then
// reduce with three shuffles, and a warp scores four pages per instruction (one page per warp would
// cost five shuffles per value and dominate the kernel).
constexpr int kLanesPerPage = 8;
constexpr int kThreads = 256;

template <class T, int D>
__global__ void __launch_bounds__(kThreads) ScorePagesKernel(const __grid_constant__ ScoreParams p) {
  constexpr int kDimsPerLane = D / kLanesPerPage;   // 8, 16 or 32
  constexpr int kLoads = kDimsPerLane / 8;          // 16-byte loads per lane and row
  const int group = p.q_heads / p.kv_heads;
  const int segment = blockIdx.y;
  const int b = segment / p.kv_heads;
  const int h = segment % p.kv_heads;
  const int first = p.page_indptr[b];
  const int n = p.page_indptr[b + 1] - first;
  const int len = p.seq_len[b];

  extern __shared__ float q_smem[];  // [group][D], the group's queries
  for (int i = threadIdx.x; i < group * D; i += blockDim.x)
    q_smem[i] = p.q[(static_cast<long long>(b) * p.q_heads + h * group) * D + i];
  __syncthreads();

  const int lane_in_page = threadIdx.x % kLanesPerPage;
  const int pages_per_block = blockDim.x / kLanesPerPage;
  const int stride = gridDim.x * pages_per_block;
  const long long out_base = static_cast<long long>(first) * p.kv_heads + static_cast<long long>(h) * n;
  const bool want_upper = p.upper != nullptr, want_estimate = p.estimate != nullptr;
  // Raw rows of the next page are loaded before the current one is scored (software pipelining),
  // so each lane keeps two pages of loads in flight.
  uint4 raw[3][kLoads] = {};
  auto load = [&](int i) {
    if (i >= n) return;
    const int page = p.page_table[first + i];
    const uint4* s = reinterpret_cast<const uint4*>(static_cast<const T*>(p.summaries) +
                                                    (static_cast<long long>(page) * p.kv_heads + h) * 3 * D +
                                                    lane_in_page * kDimsPerLane);
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      if (want_upper) {
        raw[0][l] = s[l];
        raw[1][l] = s[D / 8 + l];
      }
      if (want_estimate) raw[2][l] = s[2 * D / 8 + l];
    }
  };
  int i = blockIdx.x * pages_per_block + static_cast<int>(threadIdx.x) / kLanesPerPage;
  const int first_i = i - static_cast<int>(threadIdx.x) / kLanesPerPage;
  load(i);
  // Trip count from the block's first page so every lane of a warp runs the shuffles together.
  for (int base = first_i; base < n; base += stride, i += stride) {
    float lo[kDimsPerLane], hi[kDimsPerLane], mean[kDimsPerLane];
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      float f[8];
      detail::unpack8<T>(raw[0][l], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) lo[l * 8 + e] = f[e];
      detail::unpack8<T>(raw[1][l], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) hi[l * 8 + e] = f[e];
      detail::unpack8<T>(raw[2][l], f);
#pragma unroll
      for (int e = 0; e < 8; ++e) mean[l * 8 + e] = f[e];
    }
    const bool live = i < n;
    load(i + stride);
    float best_upper = -INFINITY;
    float est_max = -INFINITY, est_sum = 0.0f;
    for (int g = 0; g < group; ++g) {
      const float* q = q_smem + g * D + lane_in_page * kDimsPerLane;
      float up = 0.0f, dot = 0.0f;
#pragma unroll
      for (int e = 0; e < kDimsPerLane; ++e) {
        const float qe = q[e];
        up = fmaf(qe, qe >= 0.0f ? hi[e] : lo[e], up);
        dot = fmaf(qe, mean[e], dot);
      }
#pragma unroll
      for (int off = kLanesPerPage / 2; off > 0; off /= 2) {
        up += __shfl_xor_sync(0xffffffffu, up, off);
        dot += __shfl_xor_sync(0xffffffffu, dot, off);
      }
      best_upper = fmaxf(best_upper, p.scale * up);
      // log-mean-exp over the group, kept stable with a running max.
      const float x = p.scale * dot;
      if (x > est_max) {
        est_sum = est_sum * __expf(est_max - x) + 1.0f;
        est_max = x;
      } else {
        est_sum += __expf(x - est_max);
      }
    }
    if (live && lane_in_page == 0) {
      const int tokens = min(p.page_size, len - i * p.page_size);
      if (want_upper) p.upper[out_base + i] = best_upper;
      if (want_estimate) p.estimate[out_base + i] = logf(static_cast<float>(tokens)) + est_max + logf(est_sum / group);
    }
  }
}

}  // namespace

void launch_score_pages(const ScoreParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_score_pages";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0, kWhere, "q_heads",
                         p.q_heads, "a positive multiple of kv_heads");
  hattn::detail::require(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, kWhere, "page_size",
                         p.page_size, "16, 32 or 64");
  if (p.batch == 0) return;
  hattn::detail::require(p.q && p.summaries && p.page_table && p.page_indptr && p.seq_len, kWhere, "pointers",
                         "null", "all set");
  hattn::detail::require(p.upper != nullptr || p.estimate != nullptr, kWhere, "upper/estimate", "both null",
                         "at least one set");
  const int segments = p.batch * p.kv_heads;
  hattn::detail::require(segments <= 65535, kWhere, "batch * kv_heads", segments, "<= 65535");
  // About 4 pages per lane group at 16-token pages and 128K tokens: enough blocks to fill an H100
  // (132 SMs) at batch 1, each looping long enough for the prefetch to pay; fewer per segment at
  // larger batches.
  const int blocks_per_segment = std::max(1, std::min(64, 512 / segments));
  const std::size_t smem = static_cast<std::size_t>(p.q_heads / p.kv_heads) * p.head_dim * sizeof(float);
  hattn::detail::require(smem <= 48 * 1024, kWhere, "group_size * head_dim", smem / sizeof(float), "<= 12288");
  detail::dispatch_kv_dtype(p.dtype, kWhere, [&]<class T>() {
    detail::dispatch_head_dim(p.head_dim, kWhere, [&]<int D>() {
      ScorePagesKernel<T, D><<<dim3(blocks_per_segment, segments), kThreads, smem, stream>>>(p);
      HATTN_CUDA_CHECK_LAUNCH();
    });
  });
}

}  // namespace hattn::cuda
