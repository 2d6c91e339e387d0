// LSE merge of partial outputs (DESIGN.md step 6): the flash-decoding splits of the GPU and, if
// given, one extra partial per row from the CPU side (possibly in mapped host memory).
#include <cuda_runtime.h>

#include <cmath>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_decode.hpp"

namespace hattn::cuda {
namespace {

constexpr int kRowsPerBlock = 4;

// One warp per row; lanes cover the head dim with float4. Weights exp(lse - max) are 0 for empty
// partials (lse = -inf); a row with only empty partials is written as (0, -inf), never NaN.
__global__ void __launch_bounds__(kRowsPerBlock * 32) MergePartialsKernel(const __grid_constant__ MergeParams p) {
  const int row = blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.rows) return;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, p.partial_lse[static_cast<long long>(s) * p.rows + row]);
  const float extra_lse = p.extra_out ? p.extra_lse[row] : -INFINITY;
  mx = fmaxf(mx, extra_lse);
  const int vecs = p.head_dim / 4;
  if (mx == -INFINITY) {
    for (int c = lane; c < vecs; c += 32)
      reinterpret_cast<float4*>(p.out + static_cast<long long>(row) * p.head_dim)[c] = make_float4(0, 0, 0, 0);
    if (p.lse && lane == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.0f;
  for (int s = 0; s < p.splits; ++s) total += __expf(p.partial_lse[static_cast<long long>(s) * p.rows + row] - mx);
  if (p.extra_out) total += __expf(extra_lse - mx);
  const float inv = 1.0f / total;
  for (int c = lane; c < vecs; c += 32) {
    float4 o = make_float4(0, 0, 0, 0);
    for (int s = 0; s < p.splits; ++s) {
      const long long r = static_cast<long long>(s) * p.rows + row;
      const float w = __expf(p.partial_lse[r] - mx) * inv;
      if (w == 0.0f) continue;  // an empty split's output is 0 but skip the read anyway
      const float4 v = reinterpret_cast<const float4*>(p.partial_out + r * p.head_dim)[c];
      o.x = fmaf(w, v.x, o.x);
      o.y = fmaf(w, v.y, o.y);
      o.z = fmaf(w, v.z, o.z);
      o.w = fmaf(w, v.w, o.w);
    }
    if (p.extra_out) {
      const float w = __expf(extra_lse - mx) * inv;
      if (w != 0.0f) {
        const float4 v = reinterpret_cast<const float4*>(p.extra_out + static_cast<long long>(row) * p.head_dim)[c];
        o.x = fmaf(w, v.x, o.x);
        o.y = fmaf(w, v.y, o.y);
        o.z = fmaf(w, v.z, o.z);
        o.w = fmaf(w, v.w, o.w);
      }
    }
    reinterpret_cast<float4*>(p.out + static_cast<long long>(row) * p.head_dim)[c] = o;
  }
  if (p.lse && lane == 0) p.lse[row] = mx + logf(total);
}

}  // namespace

void launch_merge_partials(const MergeParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_merge_partials";
  hattn::detail::require(p.rows >= 0, kWhere, "rows", p.rows, ">= 0");
  hattn::detail::require(p.splits >= 0, kWhere, "splits", p.splits, ">= 0");
  hattn::detail::require(p.head_dim > 0 && p.head_dim % 4 == 0, kWhere, "head_dim", p.head_dim,
                         "a positive multiple of 4");
  hattn::detail::require((p.extra_out == nullptr) == (p.extra_lse == nullptr), kWhere, "extra_out/extra_lse",
                         "one null", "both set or both null");
  if (p.rows == 0) return;
  hattn::detail::require(p.out != nullptr && (p.splits == 0 || (p.partial_out && p.partial_lse)), kWhere,
                         "pointers", "null", "out and the partials set");
  const int blocks = (p.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  MergePartialsKernel<<<blocks, kRowsPerBlock * 32, 0, stream>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
