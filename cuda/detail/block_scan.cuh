#pragma once
// Block-wide prefix sums and reductions from warp shuffles plus one shared array of warp totals:
// the few primitives selection needs, without pulling CUB's headers into every CI compile.
#include <cuda_runtime.h>

namespace hattn::cuda::detail {

inline constexpr int kWarp = 32;

template <class V>
__device__ __forceinline__ V warp_inclusive_sum(V v) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int off = 1; off < kWarp; off *= 2) {
    const V u = __shfl_up_sync(0xffffffffu, v, off);
    if (lane >= off) v += u;
  }
  return v;
}

/// Exclusive prefix sum of v over the block in thread order, and the block total. `scratch` holds
/// blockDim.x / 32 + 1 values; all threads must call it. Ends with a barrier, so scratch is reusable.
template <class V>
__device__ __forceinline__ V block_exclusive_sum(V v, V* scratch, V& total) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  const V incl = warp_inclusive_sum(v);
  if (lane == kWarp - 1) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    V w = lane < warps ? scratch[lane] : V(0);
    const V wi = warp_inclusive_sum(w);
    if (lane < warps) scratch[lane] = wi - w;
    if (lane == kWarp - 1) scratch[kWarp] = wi;
  }
  __syncthreads();
  const V result = scratch[warp] + incl - v;
  total = scratch[kWarp];
  __syncthreads();
  return result;
}

/// Block-wide reduction with `op`; every thread gets the result. `scratch` holds 33 values.
template <class V, class Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* scratch) {
  // Requires a power-of-two number of whole warps (the butterfly stays within them).
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    V w = scratch[lane < warps ? lane : lane % warps];
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
      const V u = __shfl_xor_sync(0xffffffffu, w, off);
      if (off < warps) w = op(w, u);  // butterfly within the first `warps` lanes only
    }
    if (lane == 0) scratch[kWarp] = w;
  }
  __syncthreads();
  const V result = scratch[kWarp];
  __syncthreads();
  return result;
}

}  // namespace hattn::cuda::detail
