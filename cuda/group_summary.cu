// Coarse summaries of groups of pages, rebuilt on the device from the fine page summaries (the coarse
// level of two-level scoring, SPIN's metadata): what launch_score_pages prunes groups with.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "detail/dispatch.cuh"
#include "detail/launch_check.cuh"
#include "detail/pdl.cuh"
#include "hattn/kernels/cuda_score.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;

template <class T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return __half2float(v);
}

// One block per (group, request); a thread per (KV head, dim) element, looping over the group's pages
// in page order so the mean sums in the order compute_group_summary uses (no fused multiply-add:
// the host sums the same products rounded the same way).
template <class T>
__global__ void __launch_bounds__(kThreads) BuildGroupSummariesKernel(const __grid_constant__ GroupSummaryParams p) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();  // the page summaries may come from the kernels before
  const int b = blockIdx.y;
  const int first = p.page_indptr[b];
  const int n = p.page_indptr[b + 1] - first;
  const int group_first = p.group_indptr[b];
  const int groups = p.group_indptr[b + 1] - group_first;
  const int len = p.seq_len[b];
  const int begin = p.first_group ? max(p.first_group[b], 0) : 0;
  const int dim = p.head_dim;
  const int elems = p.kv_heads * dim;
  const T* fine = static_cast<const T*>(p.summaries);
  for (int g = begin + static_cast<int>(blockIdx.x); g < groups; g += gridDim.x) {
    const int page_begin = g * kPagesPerSummaryGroup;
    const int page_end = min(page_begin + kPagesPerSummaryGroup, n);
    float* out = p.group_summaries + static_cast<long long>(p.group_table[group_first + g]) * elems * 3;
    for (int e = threadIdx.x; e < elems; e += blockDim.x) {
      const int h = e / dim, d = e % dim;
      float lo = INFINITY, hi = -INFINITY, mean = 0.0f;
      int total = 0;
      for (int i = page_begin; i < page_end; ++i) {
        const int tokens = min(p.page_size, len - i * p.page_size);
        if (tokens <= 0) continue;
        const T* s = fine + (static_cast<long long>(p.page_table[first + i]) * p.kv_heads + h) * 3 * dim + d;
        lo = fminf(lo, to_float(s[0]));
        hi = fmaxf(hi, to_float(s[dim]));
        mean = __fadd_rn(mean, __fmul_rn(static_cast<float>(tokens), to_float(s[2 * dim])));
        total += tokens;
      }
      if (total == 0) lo = hi = 0.0f;
      else mean /= static_cast<float>(total);
      float* row = out + static_cast<long long>(h) * 3 * dim + d;
      row[0] = lo;
      row[dim] = hi;
      row[2 * dim] = mean;
    }
  }
}

}  // namespace

void launch_build_group_summaries(const GroupSummaryParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_build_group_summaries";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.batch <= 65535, kWhere, "batch", p.batch, "<= 65535");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  hattn::detail::require(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, kWhere, "page_size",
                         p.page_size, "16, 32 or 64");
  if (p.batch == 0) return;
  hattn::detail::require(p.summaries && p.page_table && p.page_indptr && p.seq_len && p.group_table &&
                             p.group_indptr && p.group_summaries,
                         kWhere, "pointers", "null", "all set (first_group may be null)");
  int device = 0, sms = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  hattn::detail::require(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, kWhere, "head_dim",
                         p.head_dim, "64, 128 or 256");
  detail::dispatch_kv_dtype(p.dtype, kWhere, [&]<class T>() {
    // A full rebuild of a 128K-token request is 512 groups; an append's is one per request.
    const int blocks = std::max(1, 4 * sms / p.batch);
    detail::launch_programmatic(BuildGroupSummariesKernel<T>, dim3(blocks, p.batch), dim3(kThreads), 0, stream, p);
  });
}

}  // namespace hattn::cuda
