// LSE merge of partial outputs (DESIGN.md step 6): the flash-decoding splits of the GPU and, if
// given, one extra partial per row from the CPU side (possibly in mapped host memory).
//
// The merge is small (a Llama-3-8B layer at batch 1: 32 rows x ~33 splits x 128 dims, 0.5 MB) and
// so bound by latency, not bandwidth: the first version gave each row one warp that read the split
// LSEs one after another (24 us in the engine). Here a block owns a row and has at most three
// dependent global round trips: all split LSEs at once (one per thread), then all partial rows at
// once (threads split the head dim into float4 columns and the splits among them), then the store.
#include <cuda_runtime.h>

#include <cmath>

#include "detail/launch_check.cuh"
#include "detail/pdl.cuh"
#include "hattn/kernels/cuda_decode.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 128;
// Split weights kept in shared memory; splits beyond it (more than suggest_decode_splits ever
// plans) recompute their weight from the LSE in global memory.
constexpr int kCachedSplits = 1024;
// Partial rows each thread keeps in flight: loads are issued kUnroll at a time before their FMAs, so
// 33 splits at dim 128 (4 parts of 32 columns) take 2 round trips, not 9.
constexpr int kUnroll = 8;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

/// Block-wide reduction of one value per thread; `scratch` holds kThreads / 32 floats and is free
/// again when this returns.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) r = kMax ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

__device__ __forceinline__ void fma4(float4& o, float w, const float4& v) {
  o.x = fmaf(w, v.x, o.x);
  o.y = fmaf(w, v.y, o.y);
  o.z = fmaf(w, v.z, o.z);
  o.w = fmaf(w, v.w, o.w);
}

// One block per row. Weights exp(lse - max) are 0 for empty partials (lse = -inf); a row with only
// empty partials is written as (0, -inf), never NaN.
__global__ void __launch_bounds__(kThreads) MergePartialsKernel(const __grid_constant__ MergeParams p) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();  // the partials are the decode's until then
  __shared__ float weight[kCachedSplits];
  __shared__ float scratch[kThreads / 32];
  __shared__ float4 part_sum[kThreads];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const long long rows = p.rows;

  // 1. Every split's LSE in one round trip, the extra partial's beside them.
  float mx = -INFINITY;
  for (int s = tid; s < p.splits; s += kThreads) {
    const float lse = p.partial_lse[s * rows + row];
    if (s < kCachedSplits) weight[s] = lse;
    mx = fmaxf(mx, lse);
  }
  const float extra_lse = p.extra_out ? p.extra_lse[row] : -INFINITY;
  mx = fmaxf(block_reduce<true>(mx, scratch), extra_lse);
  const int vecs = p.head_dim / 4;
  float4* out = reinterpret_cast<float4*>(p.out + row * static_cast<long long>(p.head_dim));
  if (mx == -INFINITY) {
    for (int c = tid; c < vecs; c += kThreads) out[c] = make_float4(0.f, 0.f, 0.f, 0.f);
    if (p.lse && tid == 0) p.lse[row] = -INFINITY;
    return;
  }
  float total = 0.f;
  for (int s = tid; s < p.splits; s += kThreads) {
    const float w = __expf((s < kCachedSplits ? weight[s] : p.partial_lse[s * rows + row]) - mx);
    if (s < kCachedSplits) weight[s] = w;
    total += w;
  }
  const float extra_w = p.extra_out ? __expf(extra_lse - mx) : 0.f;
  total = block_reduce<false>(total, scratch) + extra_w;  // its barriers publish the weights too
  const float inv = 1.f / total;

  // 2. Thread (column c, part j) sums splits j, j + parts, ... of float4 column c; with fewer
  // columns than threads the parts' sums meet in shared memory.
  const int parts = vecs >= kThreads ? 1 : kThreads / vecs;
  const int part = parts == 1 ? 0 : tid / vecs;
  for (int c0 = 0; c0 < vecs; c0 += parts == 1 ? kThreads : vecs) {
    const int c = parts == 1 ? c0 + tid : tid % vecs;
    const bool active = part < parts && c < vecs;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    if (active) {
      for (int s = part; s < p.splits; s += kUnroll * parts) {
        float w[kUnroll];
        float4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int su = s + u * parts;
          w[u] = su >= p.splits           ? 0.f
                 : su < kCachedSplits     ? weight[su]
                                          : __expf(p.partial_lse[su * rows + row] - mx);
          // An empty split's row is 0 and its weight too: its read is skipped.
          v[u] = w[u] != 0.f ? reinterpret_cast<const float4*>(p.partial_out + (su * rows + row) * p.head_dim)[c]
                             : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) fma4(o, w[u], v[u]);
      }
      if (part == 0 && extra_w != 0.f)
        fma4(o, extra_w, reinterpret_cast<const float4*>(p.extra_out + row * static_cast<long long>(p.head_dim))[c]);
    }
    if (parts == 1) {
      if (active) out[c] = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
      continue;
    }
    part_sum[tid] = o;
    __syncthreads();
    if (part == 0 && c < vecs) {
      for (int j = 1; j < parts; ++j) {
        const float4 u = part_sum[tid + j * vecs];
        o.x += u.x;
        o.y += u.y;
        o.z += u.z;
        o.w += u.w;
      }
      out[c] = make_float4(o.x * inv, o.y * inv, o.z * inv, o.w * inv);
    }
    __syncthreads();
  }
  if (p.lse && tid == 0) p.lse[row] = mx + logf(total);
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
  // Set up while the kernel before it finishes (detail/pdl.cuh): the decode, or the engine's wait for
  // the CPU partials (launch_wait_host_value), which waits for the decode itself first.
  detail::launch_programmatic(MergePartialsKernel, dim3(static_cast<unsigned>(p.rows)), dim3(kThreads), 0, stream, p);
}

}  // namespace hattn::cuda
