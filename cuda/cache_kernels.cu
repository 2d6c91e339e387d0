// The HBM page cache's step on the GPU (kv/DeviceKVCache, DESIGN.md step 7): lookup, age
// histograms and plan, eviction of whole age buckets, slot claims, publication after the gather.
// Mirrors CacheModel::step (src/kv/device_kv_cache_model.cpp) rule for rule; the GPU test compares
// the two call by call. No stage waits for the host: counts, thresholds and quotas stay on the device.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "detail/block_scan.cuh"
#include "detail/launch_check.cuh"
#include "hattn/kv/device_kv_cache_kernels.hpp"

namespace hattn::detail {
namespace {

using cuda::detail::block_exclusive_sum;
using cuda::detail::kWarp;

constexpr int kLookupThreads = 128;
constexpr int kSlotThreads = 256;
constexpr int kSlotsPerThread = 4;  // 100K slots -> 98 blocks: one wave on an H100's 132 SMs

__device__ __forceinline__ void add64(std::int64_t* p, std::int64_t v) {
  if (v != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

__device__ __forceinline__ int block_sum(int v, int* scratch) {
  int total;
  block_exclusive_sum(v, scratch, total);
  return total;
}

// What the slot scans need of the kSlotsPerThread slots of a thread (block k-major, so each load
// is coalesced). Loads are issued level by level: owners, then rows and the rest, so a thread waits
// for two round trips instead of two per slot.
struct SlotView {
  int slot[kSlotsPerThread];
  int row[kSlotsPerThread];  // batch row of the owner in this call, -1 if none or free
  std::uint32_t stamp[kSlotsPerThread];
  BlockKey key[kSlotsPerThread];
  std::uint8_t pinned[kSlotsPerThread];
};

__device__ __forceinline__ void load_slots(const CacheDeviceView& v, SlotView& sv) {
  int owner[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    sv.slot[k] = (blockIdx.x * kSlotsPerThread + k) * blockDim.x + threadIdx.x;
    owner[k] = sv.slot[k] < v.slots ? v.slot_request[sv.slot[k]] : -1;
  }
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    sv.row[k] = owner[k] >= 0 ? v.row_of_request[owner[k]] : -1;
    const bool live = owner[k] >= 0;
    sv.stamp[k] = live ? v.slot_stamp[sv.slot[k]] : 0u;
    sv.key[k] = live ? v.slot_key[sv.slot[k]] : -1;
    sv.pinned[k] = live ? v.slot_pinned[sv.slot[k]] : std::uint8_t{1};
  }
}

// One block per segment s = b * H + h.
__global__ void __launch_bounds__(kLookupThreads) CacheLookupKernel(const __grid_constant__ CacheDeviceView v,
                                                                    const __grid_constant__ CacheCallArgs a) {
  __shared__ int scratch[kWarp + 1];
  const int s = blockIdx.x;
  const int b = s / v.kv_heads, h = s % v.kv_heads;
  const int r = a.request_of_row[b];
  const bool valid = r >= 0 && r < v.max_requests && v.budget[r] >= 0;
  if (threadIdx.x == 0) {
    if (s == 0) v.scalars->gather_count = 0;
    if (h == 0) {
      v.row_request[b] = valid ? r : -1;
      if (valid) v.row_of_request[r] = b;
      else if (atomicCAS(&v.scalars->error, 0, 1) == 0) {
        v.scalars->error_row = b;
        v.scalars->error_value = r;
      }
    }
  }
  if (!valid) {
    if (threadIdx.x == 0) v.seg_hits[s] = v.seg_misses[s] = v.seg_bypass[s] = 0;
    return;
  }
  const int base = a.page_indptr[b];
  const int last = a.page_indptr[b + 1] - base - 1;
  const int off = a.selected_offset[s], cnt = a.selected_count[s];
  int hits = 0, bypass = 0, missed = 0;
  for (int i0 = 0; i0 < cnt; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    int miss = 0;
    BlockKey key = -1;
    if (i < cnt) {
      const int pos = a.selected[off + i];
      if (pos == last) {
        ++bypass;  // the page still being appended to is never cached
      } else {
        key = a.page_table[base + pos] * v.kv_heads + h;
        const int slot = v.slot_of[key];
        if (slot >= 0) {
          v.slot_stamp[slot] = a.now;
          ++hits;
        } else {
          miss = 1;
        }
      }
    }
    int total;
    const int rank = block_exclusive_sum(miss, scratch, total);
    if (miss) v.miss_key[off + missed + rank] = key;
    missed += total;
  }
  hits = block_sum(hits, scratch);
  bypass = block_sum(bypass, scratch);
  if (threadIdx.x == 0) {
    v.seg_hits[s] = hits;
    v.seg_misses[s] = missed;
    v.seg_bypass[s] = bypass;
  }
}

// One warp plans one row. `hist` and `fresh` are the row's totals staged in shared memory. The
// threshold is the largest class c with (blocks in classes >= c) >= need: each lane sums ten
// classes, a warp scan finds the lane holding the threshold, and that lane walks its ten.
__device__ void plan_row(const CacheDeviceView& v, const CacheCallArgs& a, int b, const int* hist, int fresh) {
  const int lane = threadIdx.x % kWarp;
  const int r = v.row_request[b];
  if (r < 0) {
    if (lane == 0) {
      v.row_quota[b] = 0;
      v.row_evict_from[b] = kCacheEvictionClasses;
    }
    return;
  }
  // Loads are issued together (lanes over heads, then reductions): this runs on one block after
  // the grid, so its latency chain adds straight to the step.
  int hits = 0, misses = 0, bypass = 0;
  for (int h = lane; h < v.kv_heads; h += kWarp) {
    hits += v.seg_hits[b * v.kv_heads + h];
    misses += v.seg_misses[b * v.kv_heads + h];
    bypass += v.seg_bypass[b * v.kv_heads + h];
  }
  for (int off = kWarp / 2; off > 0; off /= 2) {
    hits += __shfl_xor_sync(0xffffffffu, hits, off);
    misses += __shfl_xor_sync(0xffffffffu, misses, off);
    bypass += __shfl_xor_sync(0xffffffffu, bypass, off);
  }
  const int budget = v.budget[r];
  const int room = max(budget - v.pinned[r] - fresh, 0);
  const int admit = min(misses, room);
  const int need = v.used[r] + admit - budget;

  constexpr int kPerLane = (kCacheEvictionClasses + kWarp - 1) / kWarp;
  const int hi = max(kCacheEvictionClasses - lane * kPerLane, 0);
  const int lo = max(hi - kPerLane, 0);
  int sum = 0;
  for (int c = lo; c < hi; ++c) sum += hist[c];
  const int incl = cuda::detail::warp_inclusive_sum(sum);
  int from = kCacheEvictionClasses, evicted = 0;
  if (need > 0) {
    const unsigned enough = __ballot_sync(0xffffffffu, incl >= need);
    if (enough == 0) {
      from = 0;
      evicted = __shfl_sync(0xffffffffu, incl, kWarp - 1);
    } else {
      const int owner = __ffs(enough) - 1;
      if (lane == owner) {
        int acc = incl - sum, c = hi;
        while (acc < need) acc += hist[--c];
        from = c;
        evicted = acc;
      }
      from = __shfl_sync(0xffffffffu, from, owner);
      evicted = __shfl_sync(0xffffffffu, evicted, owner);
    }
  }
  if (lane != 0) return;
  v.row_evict_from[b] = from;
  v.row_quota[b] = admit;
  v.used[r] += admit - evicted;

  DeviceRequestCounters rc = v.request_stats[r];
  const std::int64_t bytes = static_cast<std::int64_t>(admit) * v.block_bytes;
  rc.counters.hits += hits;
  rc.counters.misses += misses;
  rc.counters.bypass += bypass;
  rc.counters.admitted += admit;
  rc.counters.evicted += evicted;
  rc.counters.pcie_bytes += bytes;
  if (rc.last_step != a.step) {
    rc.last_step = a.step;
    ++rc.steps;
  }
  v.request_stats[r] = rc;
  CacheCounters& sc = v.step_stats->counters;
  add64(&sc.hits, hits);
  add64(&sc.misses, misses);
  add64(&sc.bypass, bypass);
  add64(&sc.admitted, admit);
  add64(&sc.evicted, evicted);
  add64(&sc.pcie_bytes, bytes);
}

// Grid over slots, then the last block to finish plans every row (one thread each).
__global__ void __launch_bounds__(kSlotThreads) CachePlanKernel(const __grid_constant__ CacheDeviceView v,
                                                                const __grid_constant__ CacheCallArgs a) {
  extern __shared__ int smem[];  // [batch][kCacheEvictionClasses] histogram, then [batch] fresh
  constexpr int C = kCacheEvictionClasses;
  int* sh_hist = smem;
  int* sh_fresh = smem + a.batch * C;
  for (int i = threadIdx.x; i < a.batch * (C + 1); i += blockDim.x) smem[i] = 0;
  __syncthreads();
  {
    SlotView sv;
    load_slots(v, sv);
#pragma unroll
    for (int k = 0; k < kSlotsPerThread; ++k) {
      if (sv.row[k] < 0 || sv.pinned[k]) continue;
      if (sv.stamp[k] == a.now) atomicAdd(&sh_fresh[sv.row[k]], 1);
      else atomicAdd(&sh_hist[sv.row[k] * C + cache_eviction_class(a.now - sv.stamp[k], sv.key[k], a.age_width)], 1);
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.batch * (C + 1); i += blockDim.x)
    if (smem[i] != 0) {
      if (i < a.batch * C) atomicAdd(&v.row_hist[i], smem[i]);
      else atomicAdd(&v.row_fresh[i - a.batch * C], smem[i]);
    }
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&v.scalars->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < a.batch * (C + 1); i += blockDim.x)
    smem[i] = i < a.batch * C ? static_cast<volatile int*>(v.row_hist)[i]
                              : static_cast<volatile int*>(v.row_fresh)[i - a.batch * C];
  if (threadIdx.x == 0 && v.step_stats->step != a.step) {
    v.step_stats->step = a.step;
    v.step_stats->counters = CacheCounters{};
  }
  __syncthreads();
  for (int b = threadIdx.x / kWarp; b < a.batch; b += blockDim.x / kWarp) plan_row(v, a, b, sh_hist + b * C, sh_fresh[b]);
  __syncthreads();
  // Leave the histograms zeroed for the next call.
  for (int i = threadIdx.x; i < a.batch * C; i += blockDim.x) v.row_hist[i] = 0;
  for (int b = threadIdx.x; b < a.batch; b += blockDim.x) v.row_fresh[b] = 0;
  if (threadIdx.x == 0) v.scalars->blocks_done = 0;
}

__global__ void __launch_bounds__(kSlotThreads) CacheEvictKernel(const __grid_constant__ CacheDeviceView v,
                                                                 const __grid_constant__ CacheCallArgs a) {
  SlotView sv;
  load_slots(v, sv);
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    if (sv.row[k] < 0 || sv.pinned[k] || sv.stamp[k] == a.now) continue;
    if (cache_eviction_class(a.now - sv.stamp[k], sv.key[k], a.age_width) < v.row_evict_from[sv.row[k]]) continue;
    const int slot = sv.slot[k];
    v.slot_of[sv.key[k]] = -1;
    v.slot_key[slot] = -1;
    v.slot_request[slot] = -1;
    v.free_stack[atomicAdd(&v.scalars->free_top, 1)] = slot;
  }
}

// One block per segment; misses of a row are admitted in segment then position order up to its quota.
__global__ void __launch_bounds__(kLookupThreads) CacheAdmitKernel(const __grid_constant__ CacheDeviceView v,
                                                                   const __grid_constant__ CacheCallArgs a) {
  const int s = blockIdx.x;
  const int b = s / v.kv_heads, h = s % v.kv_heads;
  const int r = v.row_request[b];
  if (r < 0) return;
  // Misses of the row's earlier segments, loaded by one warp at once rather than one by one.
  __shared__ int sh_prefix;
  if (threadIdx.x < kWarp) {
    int x = 0;
    for (int k = threadIdx.x; k < h; k += kWarp) x += v.seg_misses[b * v.kv_heads + k];
    for (int o = kWarp / 2; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (threadIdx.x == 0) sh_prefix = x;
  }
  __syncthreads();
  const int prefix = sh_prefix;
  const int quota = v.row_quota[b];
  const int cnt = min(v.seg_misses[s], quota - prefix);
  if (cnt <= 0) return;
  const int off = a.selected_offset[s];
  const int lane = threadIdx.x % kWarp;
  for (int i0 = 0; i0 < cnt; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    const bool active = i < cnt;
    // Warp-aggregated claims: one atomic per warp on the free stack and on the gather list.
    const unsigned mask = __ballot_sync(0xffffffffu, active);
    if (!active) continue;
    const int leader = __ffs(mask) - 1;
    const int n = __popc(mask);
    const int before = __popc(mask & ((1u << lane) - 1));
    int top = 0, g = 0;
    if (lane == leader) {
      top = atomicSub(&v.scalars->free_top, n);
      g = atomicAdd(&v.scalars->gather_count, n);
    }
    top = __shfl_sync(mask, top, leader);
    g = __shfl_sync(mask, g, leader) + before;
    const int idx = top - 1 - before;
    const BlockKey key = v.miss_key[off + i];
    if (idx < 0) {  // cannot happen while budgets sum to at most the pool; skip the block, flag it
      atomicCAS(&v.scalars->error, 0, 2);
      v.gather_slot[g] = -1;
      v.gather_key[g] = -1;
      continue;
    }
    const int slot = v.free_stack[idx];
    v.slot_key[slot] = key;
    v.slot_request[slot] = r;
    v.slot_stamp[slot] = a.now;
    v.slot_pinned[slot] = 0;
    v.gather_page[g] = key / v.kv_heads;
    v.gather_head[g] = key % v.kv_heads;
    v.gather_slot[g] = slot;
    v.gather_key[g] = key;
  }
}

__global__ void CachePublishKernel(const __grid_constant__ CacheDeviceView v, const __grid_constant__ CacheCallArgs a) {
  const int n = v.scalars->gather_count;
  for (int g = blockIdx.x * blockDim.x + threadIdx.x; g < n; g += gridDim.x * blockDim.x)
    if (v.gather_slot[g] >= 0) v.slot_of[v.gather_key[g]] = v.gather_slot[g];
  if (blockIdx.x == 0)
    for (int b = threadIdx.x; b < a.batch; b += blockDim.x)
      if (const int r = v.row_request[b]; r >= 0) v.row_of_request[r] = -1;
}

__global__ void CacheScatterKernel(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) slot_of[keys[i]] = values[i];
}

int slot_blocks(const CacheDeviceView& v) {
  const int per_block = kSlotThreads * kSlotsPerThread;
  return (v.slots + per_block - 1) / per_block;
}

}  // namespace

void launch_cache_lookup(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  CacheLookupKernel<<<a.batch * v.kv_heads, kLookupThreads, 0, stream>>>(v, a);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_plan(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  const auto smem = static_cast<std::size_t>(a.batch) * (kCacheEvictionClasses + 1) * sizeof(int);
  if (smem > 48 * 1024) {  // more than 37 rows: opt in to the larger shared memory (Hopper: 227 KB)
    static const bool opted = [&] {
      HATTN_CUDA_CHECK(cudaFuncSetAttribute(CachePlanKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(128 * (kCacheEvictionClasses + 1) * sizeof(int))));
      return true;
    }();
    (void)opted;
  }
  CachePlanKernel<<<slot_blocks(v), kSlotThreads, smem, stream>>>(v, a);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_evict(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  CacheEvictKernel<<<slot_blocks(v), kSlotThreads, 0, stream>>>(v, a);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_admit(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  CacheAdmitKernel<<<a.batch * v.kv_heads, kLookupThreads, 0, stream>>>(v, a);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_publish(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  // The count is on the device: a grid-stride loop over at most 64K threads covers any count
  // without launching a block per 256 entries of a large max_selected.
  const int blocks = std::min((a.capacity + 255) / 256, 256);
  CachePublishKernel<<<blocks < 1 ? 1 : blocks, 256, 0, stream>>>(v, a);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_scatter(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n,
                          cuda::Stream stream) {
  if (n <= 0) return;
  CacheScatterKernel<<<(n + 255) / 256, 256, 0, stream>>>(slot_of, keys, values, n);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::detail
