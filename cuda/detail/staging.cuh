#pragma once
// The staging area (include/hattn/kernels/cuda_staging.hpp) as its readers see it on the device:
// the decode and the gather both look a block up there before falling back to the host pool.
#include <cuda_runtime.h>

#include "hattn/kernels/cuda_staging.hpp"

namespace hattn::cuda::detail {

/// Entries that hold a block: those taken, up to the capacity (0 without staging).
__device__ __forceinline__ int staged_entries(const StagingArea& s) {
  return s.capacity > 0 ? min(*s.count, s.capacity) : 0;
}

/// The entry among the first `staged` that holds block `key`, or -1. index_of keeps stale values
/// from earlier steps, so only an entry whose key_of names the key counts.
__device__ __forceinline__ int staged_entry(const StagingArea& s, int staged, int key) {
  if (staged <= 0) return -1;
  const int entry = s.index_of[key];
  return entry >= 0 && entry < staged && s.key_of[entry] == key ? entry : -1;
}

}  // namespace hattn::cuda::detail
