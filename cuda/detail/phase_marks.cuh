#pragma once
// Profiling marks: %globaltimer (ns) at a kernel's phase boundaries, reduced over blocks into a
// caller's array with atomicMin (the earliest block to get there) or atomicMax (the latest). A
// chained step (programmatic launches) cannot be cut by CUDA events without serialising it, so the
// benchmarks read where its time goes from these. Off where the array is null: one uniform branch.
#include <cuda_runtime.h>

namespace hattn::cuda::detail {

__device__ __forceinline__ unsigned long long globaltimer_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

/// Thread 0 of the block records; callers place the mark after a barrier where the block's (not one
/// thread's) progress matters.
__device__ __forceinline__ void mark_earliest(unsigned long long* marks, int i) {
  if (marks != nullptr && threadIdx.x == 0) atomicMin(marks + i, globaltimer_ns());
}

__device__ __forceinline__ void mark_latest(unsigned long long* marks, int i) {
  if (marks != nullptr && threadIdx.x == 0) atomicMax(marks + i, globaltimer_ns());
}

}  // namespace hattn::cuda::detail
