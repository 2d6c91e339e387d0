#pragma once
// The LSE merge folded into the decode (SparseDecodeParams::out): each split block counts itself in
// when its partial rows are written, and the last of a segment's blocks merges the segment's rows
// from every split (L2-resident) into the output. It replaces the merge kernel's launch and its
// wait on the whole decode grid where no partial comes from elsewhere (a GPU-only step).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "hattn/kernels/cuda_decode.hpp"

namespace hattn::cuda::detail {

/// Called by every thread of a decode block of segment `segment` after its partial rows are written
/// (no thread may have returned). The rule is launch_merge_partials' without an extra partial:
/// weights exp(lse - max) over the splits, empty splits weigh 0, a row without any mass is (0, -inf).
/// Register pressure: unrolled by 8 (or not inlined) it made ptxas spill in the tensor-core decode loop
/// before it (233 registers without spills became 168 with 12-40 bytes of spills); by 4, 185 without.
/// The decode kernels instantiate it only where the merge is folded (their kMerge flag).
template <int D>
__device__ __forceinline__ void merge_segment_if_last(const SparseDecodeParams& p, int segment) {
  __shared__ int is_last;
  // Each writer fences its partials before the block counts itself in, so the last block sees all.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(p.arrivals + segment, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  constexpr int kVecs = D / 4;                              // float4 columns of a row
  constexpr int kVecsPerLane = kVecs >= 32 ? kVecs / 32 : 1;  // 1 (dims 64, 128) or 2 (256)
  const int group = p.q_heads / p.kv_heads;
  const int b = segment / p.kv_heads, h = segment % p.kv_heads;
  const long long rows = static_cast<long long>(p.batch) * p.q_heads;
  const int lane = threadIdx.x % 32;
  // A warp per query head of the group: its lanes hold 32 splits' LSEs at a time and the row's columns.
  for (int g = threadIdx.x / 32; g < group; g += blockDim.x / 32) {
    const long long row = static_cast<long long>(b) * p.q_heads + static_cast<long long>(h) * group + g;
    float mx = -INFINITY;
    for (int s = lane; s < p.splits; s += 32) mx = fmaxf(mx, __ldcg(p.partial_lse + s * rows + row));
#pragma unroll
    for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
    float4* out = reinterpret_cast<float4*>(p.out + row * D);
    if (mx == -INFINITY) {
      for (int c = lane; c < kVecs; c += 32) out[c] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (p.lse != nullptr && lane == 0) p.lse[row] = -INFINITY;
      continue;
    }
    float total = 0.f;
    float4 acc[kVecsPerLane];
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) acc[v] = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < p.splits; s0 += 32) {
      const int mine = s0 + lane;
      const float w = mine < p.splits ? __expf(__ldcg(p.partial_lse + mine * rows + row) - mx) : 0.f;
      total += w;
      const int n = min(32, p.splits - s0);
      // Every split writes its rows (an empty one writes zeros), so no split's read is skipped. Four
      // splits' loads in flight per lane.
#pragma unroll 4
      for (int k = 0; k < n; ++k) {
        const float wk = __shfl_sync(0xffffffffu, w, k);
        const float4* src = reinterpret_cast<const float4*>(p.partial_out + ((s0 + k) * rows + row) * D);
#pragma unroll
        for (int v = 0; v < kVecsPerLane; ++v) {
          const int c = lane + 32 * v;
          if (c >= kVecs) continue;
          const float4 x = __ldcg(src + c);
          acc[v].x = fmaf(wk, x.x, acc[v].x);
          acc[v].y = fmaf(wk, x.y, acc[v].y);
          acc[v].z = fmaf(wk, x.z, acc[v].z);
          acc[v].w = fmaf(wk, x.w, acc[v].w);
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
    const float inv = 1.f / total;
#pragma unroll
    for (int v = 0; v < kVecsPerLane; ++v) {
      const int c = lane + 32 * v;
      if (c < kVecs) out[c] = make_float4(acc[v].x * inv, acc[v].y * inv, acc[v].z * inv, acc[v].w * inv);
    }
    if (p.lse != nullptr && lane == 0) p.lse[row] = mx + logf(total);
  }
  if (threadIdx.x == 0) p.arrivals[segment] = 0;  // every split block of the segment has counted itself in
}

}  // namespace hattn::cuda::detail
