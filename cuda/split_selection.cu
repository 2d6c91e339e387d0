// One block per segment. A first pass counts the uncached blocks of every head of the segment's row
// (each block of the row repeats it: no block waits for another), which sets how many uncached and
// cached blocks of the row's CPU quota this head gives; the second walks the segment's list in tiles,
// ranks every block among the uncached and among the cached ones with one block-wide scan, and from
// the two ranks knows both its part and its place in that part without a second scan.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "detail/launch_check.cuh"
#include "hattn/core/error.hpp"
#include "hattn/kernels/cuda_split.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // consecutive list entries per thread and tile (blocked, as the scan needs)
constexpr int kTile = kThreads * kItems;
constexpr int kMaxKvHeads = 256;  // the row's per-head counts live in shared memory
constexpr int kCountItems = 16;   // entries per thread and tile of the row-wide count
// A tile's cached and uncached counts travel in one int: cached in the high half (kTile < 2^16).
constexpr int kCachedShift = 16;
static_assert(kTile < (1 << kCachedShift));

struct Segment {
  const std::int32_t* list;
  const std::int32_t* table;
  int n, head;
};

// A thread's kItems consecutive entries from `first`: positions (-1 past the end) and whether the
// cache holds them. Each of the three dependent loads is issued for all items before the next
// (one block per segment: the passes are latency bound).
__device__ void load_items(const SplitSelectionParams& p, const Segment& s, int first, std::int32_t (&position)[kItems],
                           bool (&is_cached)[kItems]) {
#pragma unroll
  for (int k = 0; k < kItems; ++k) position[k] = first + k < s.n ? s.list[first + k] : -1;
  std::int32_t page[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) page[k] = p.slot_of != nullptr && position[k] >= 0 ? s.table[position[k]] : -1;
#pragma unroll
  for (int k = 0; k < kItems; ++k)
    is_cached[k] = page[k] >= 0 && p.slot_of[static_cast<long long>(page[k]) * p.kv_heads + s.head] >= 0;
}

// Each head's part of `quota` blocks spread over the row's heads in proportion to count[], into
// part[]: the floor of its exact share, plus one for each of the first (quota - sum of the floors)
// heads, in head order, whose exact share is not whole. Never more than count[h]; the parts sum to
// min(quota, total). One thread per head, so each 64-bit division (a software routine on the GPU) runs
// once per head and block, not once per head in every thread.
// floor_of is shared scratch of kMaxKvHeads ints (-1 - floor marks an inexact share).
__device__ void spread_quota(long long quota, const int* count, int heads, long long total, int* floor_of, int* part) {
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    const long long exact = quota * count[h];
    const int whole = quota >= total ? count[h] : static_cast<int>(exact / total);
    floor_of[h] = quota < total && exact % total != 0 ? -1 - whole : whole;
  }
  __syncthreads();
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    long long floors = 0;
    int inexact_before = 0;
    for (int g = 0; g < heads; ++g) {
      const int f = floor_of[g];
      floors += f < 0 ? -1 - f : f;
      inexact_before += g < h && f < 0;
    }
    const int f = floor_of[h];
    part[h] = f < 0 ? -1 - f + (inexact_before < quota - floors ? 1 : 0) : f;
  }
  __syncthreads();
}

// Counts the uncached blocks of every head of `row` into misses[h], walking the row's lists as one
// flat range (kCountItems entries a thread per tile, strided so a warp's list loads coalesce) so all
// heads' loads are in flight together: three dependent rounds (list, table, map) per 4096 entries,
// which at 128K x 5% x 8 heads is one tile. first_of and offset_of are shared scratch of
// kMaxKvHeads + 1 and kMaxKvHeads ints.
__device__ void count_row_misses(const SplitSelectionParams& p, int row, int* first_of, int* offset_of, int* misses) {
  const int heads = p.kv_heads;
  for (int h = threadIdx.x; h < heads; h += blockDim.x) {
    first_of[h + 1] = p.selected_count[row * heads + h];
    offset_of[h] = p.selected_offset[row * heads + h];
    misses[h] = 0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    first_of[0] = 0;
    for (int h = 0; h < heads; ++h) first_of[h + 1] += first_of[h];
  }
  __syncthreads();
  const int flat = first_of[heads];
  const std::int32_t* table = p.page_table + p.page_indptr[row];
  for (int tile = 0; tile < flat; tile += kCountItems * kThreads) {
    int head[kCountItems];
    std::int32_t position[kCountItems];
#pragma unroll
    for (int k = 0; k < kCountItems; ++k) {
      const int f = tile + k * kThreads + static_cast<int>(threadIdx.x);
      int lo = 0, hi = heads - 1;  // the last head whose first entry is <= f
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (first_of[mid] <= f) lo = mid;
        else hi = mid - 1;
      }
      head[k] = lo;
      position[k] = f < flat ? p.selected[offset_of[lo] + (f - first_of[lo])] : -1;
    }
    std::int32_t page[kCountItems];
#pragma unroll
    for (int k = 0; k < kCountItems; ++k) page[k] = position[k] >= 0 ? table[position[k]] : -1;
#pragma unroll
    for (int k = 0; k < kCountItems; ++k)
      if (page[k] >= 0 && p.slot_of[static_cast<long long>(page[k]) * heads + head[k]] < 0)
        atomicAdd(&misses[head[k]], 1);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) SplitSelectionKernel(const __grid_constant__ SplitSelectionParams p) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;

  const int segment = blockIdx.x;
  const int row = segment / p.kv_heads;
  const Segment s{p.selected + p.selected_offset[segment], p.page_table + p.page_indptr[row],
                  p.selected_count[segment], segment % p.kv_heads};

  if (p.cpu_share == nullptr) {  // only the GPU's cached blocks to count
    int local = 0;
    for (int tile = 0; tile < s.n; tile += kTile) {
      std::int32_t position[kItems];
      bool is_cached[kItems];
      load_items(p, s, tile + threadIdx.x * kItems, position, is_cached);
#pragma unroll
      for (int k = 0; k < kItems; ++k) local += position[k] >= 0 && is_cached[k];
    }
    const int hits = Reduce(tmp.reduce).Sum(local);
    if (threadIdx.x == 0) {
      p.gpu_hits[segment] = hits;
      if (p.gpu_blocks != nullptr) p.gpu_blocks[segment] = s.n;
    }
    return;
  }

  // The row's quota, and this head's part of it: uncached blocks first, spread over the heads by
  // their uncached counts, then cached ones by their cached counts. Heads differ widely in misses (a
  // clustered head that changed topic misses most of its pages, a local head none), so a quota per
  // head would leave the GPU reading many misses across PCIe while the CPU computed cached blocks.
  __shared__ int first_of[kMaxKvHeads + 1], offset_of[kMaxKvHeads];
  __shared__ int row_misses[kMaxKvHeads], row_hits[kMaxKvHeads];
  __shared__ int quota_floor[kMaxKvHeads], quota_part[kMaxKvHeads];  // spread_quota's scratch and result
  if (p.slot_of != nullptr) {
    count_row_misses(p, row, first_of, offset_of, row_misses);
  } else {
    for (int h = threadIdx.x; h < p.kv_heads; h += blockDim.x)
      row_misses[h] = p.selected_count[row * p.kv_heads + h];  // without a cache every block is a miss
    __syncthreads();
  }
  for (int h = threadIdx.x; h < p.kv_heads; h += blockDim.x)
    row_hits[h] = p.selected_count[row * p.kv_heads + h] - row_misses[h];
  __syncthreads();
  long long total = 0, misses_total = 0;
  for (int h = 0; h < p.kv_heads; ++h) {
    misses_total += row_misses[h];
    total += row_misses[h] + row_hits[h];
  }
  const float share = p.cpu_share[row];
  const long long quota =
      min(total, max(0LL, static_cast<long long>(__float2int_rn(share * static_cast<float>(total)))));
  if (p.q_copy != nullptr) {
    const int group = p.q_heads / p.kv_heads;
    const long long first =
        (static_cast<long long>(row) * p.q_heads + static_cast<long long>(s.head) * group) * p.head_dim;
    for (int i = threadIdx.x; i < group * p.head_dim; i += blockDim.x) p.q_copy[first + i] = p.q[first + i];
  }
  const long long quota_misses = min(quota, misses_total);
  spread_quota(quota_misses, row_misses, p.kv_heads, misses_total, quota_floor, quota_part);
  const int cpu_misses = quota_part[s.head];
  __syncthreads();
  spread_quota(quota - quota_misses, row_hits, p.kv_heads, total - misses_total, quota_floor, quota_part);
  const int cpu_hits = quota_part[s.head];

  std::int32_t* gpu_out = p.gpu_selected + p.selected_offset[segment];
  std::int32_t* cpu_out = p.cpu_selected + p.selected_offset[segment];
  // cpu_out is typically mapped host memory, where each 4-byte store a warp scatters becomes a PCIe
  // write of its own: a tile's CPU blocks gather in shared memory and leave in runs of consecutive
  // ints, one or two transactions per warp.
  __shared__ std::int32_t cpu_tile[kTile];
  int misses_before = 0, hits_before = 0;  // in earlier tiles
  for (int tile = 0; tile < s.n; tile += kTile) {
    const int first = tile + threadIdx.x * kItems;
    std::int32_t position[kItems];
    bool is_cached[kItems];
    load_items(p, s, first, position, is_cached);
    int packed = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k)
      if (position[k] >= 0) packed += is_cached[k] ? 1 << kCachedShift : 1;
    int prefix = 0, tile_total = 0;
    __syncthreads();  // tmp is reused across tiles
    Scan(tmp.scan).ExclusiveSum(packed, prefix, tile_total);
    const int cpu_start = min(misses_before, cpu_misses) + min(hits_before, cpu_hits);
    int miss_rank = misses_before + (prefix & ((1 << kCachedShift) - 1));
    int hit_rank = hits_before + (prefix >> kCachedShift);
    for (int k = 0; k < kItems; ++k) {
      const int i = first + k;
      if (i >= s.n) break;
      // CPU blocks before i: the first cpu_misses uncached and the first cpu_hits cached ones.
      const int cpu_before = min(miss_rank, cpu_misses) + min(hit_rank, cpu_hits);
      const bool to_cpu = is_cached[k] ? hit_rank < cpu_hits : miss_rank < cpu_misses;
      if (to_cpu) cpu_tile[cpu_before - cpu_start] = position[k];
      else gpu_out[i - cpu_before] = position[k];
      if (is_cached[k]) ++hit_rank;
      else ++miss_rank;
    }
    misses_before += tile_total & ((1 << kCachedShift) - 1);
    hits_before += tile_total >> kCachedShift;
    const int cpu_end = min(misses_before, cpu_misses) + min(hits_before, cpu_hits);
    __syncthreads();  // the next tile's first __syncthreads keeps cpu_tile until every thread wrote it out
    for (int i = threadIdx.x; i < cpu_end - cpu_start; i += kThreads) cpu_out[cpu_start + i] = cpu_tile[i];
  }
  // The counts follow this pass's reading of the cache map, not the first pass's: an eviction or
  // admission of an earlier call may still run on the cache's side stream and change a block's state
  // between the two reads. Each block was read once here, so the two lists partition the selection
  // whatever changed; the quota only splits between uncached and cached blocks as the first pass saw.
  if (threadIdx.x == 0) {
    const int cpu_hits_taken = min(hits_before, cpu_hits);
    const int cpu = min(misses_before, cpu_misses) + cpu_hits_taken;
    p.cpu_count[segment] = cpu;
    p.gpu_count[segment] = s.n - cpu;
    p.gpu_hits[segment] = hits_before - cpu_hits_taken;
    if (p.gpu_blocks != nullptr) p.gpu_blocks[segment] = s.n - cpu;
  }
}

}  // namespace

void launch_split_selection(const SplitSelectionParams& p, Stream stream) {
  const int segments = p.batch * p.kv_heads;
  if (segments <= 0) return;
  hattn::detail::require(p.selected && p.selected_offset && p.selected_count && p.page_table && p.page_indptr &&
                             p.gpu_hits,
                         "launch_split_selection", "pointers", "null", "selection, table and gpu_hits set");
  hattn::detail::require(p.cpu_share == nullptr || (p.gpu_selected && p.gpu_count && p.cpu_selected && p.cpu_count),
                         "launch_split_selection", "output lists", "null", "all set with cpu_share");
  hattn::detail::require(p.q_copy == nullptr || (p.cpu_share && p.q && p.q_heads > 0 && p.q_heads % p.kv_heads == 0 &&
                                                  p.head_dim > 0),
                         "launch_split_selection", "q_copy", "set",
                         "with cpu_share, q, q_heads (a multiple of kv_heads) and head_dim");
  hattn::detail::require(p.cpu_share == nullptr || p.kv_heads <= kMaxKvHeads, "launch_split_selection", "kv_heads",
                         p.kv_heads, "<= ", kMaxKvHeads, " with cpu_share (the row's per-head counts in shared memory)");
  SplitSelectionKernel<<<segments, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
