// One block per segment. A first pass counts the segment's uncached blocks; the second walks the list
// in tiles, ranks every block among the uncached and among the cached ones with one block-wide scan,
// and from the two ranks knows both its part and its place in that part without a second scan.
#include <cuda_runtime.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_split.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // consecutive list entries per thread and tile (blocked, as the scan needs)
constexpr int kTile = kThreads * kItems;
// A tile's cached and uncached counts travel in one int: cached in the high half (kTile < 2^16).
constexpr int kCachedShift = 16;
static_assert(kTile < (1 << kCachedShift));

struct Segment {
  const std::int32_t* list;
  const std::int32_t* table;
  int n, head;
};

__device__ bool cached(const SplitSelectionParams& p, const Segment& s, int i) {
  return p.slot_of != nullptr &&
         p.slot_of[static_cast<long long>(s.table[s.list[i]]) * p.kv_heads + s.head] >= 0;
}

__global__ void __launch_bounds__(kThreads) SplitSelectionKernel(const __grid_constant__ SplitSelectionParams p) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ union {
    typename Reduce::TempStorage reduce;
    typename Scan::TempStorage scan;
  } tmp;
  __shared__ int shared_misses;

  const int segment = blockIdx.x;
  const int row = segment / p.kv_heads;
  const Segment s{p.selected + p.selected_offset[segment], p.page_table + p.page_indptr[row],
                  p.selected_count[segment], segment % p.kv_heads};

  int local = 0;
  for (int i = threadIdx.x; i < s.n; i += kThreads) local += !cached(p, s, i);
  const int total = Reduce(tmp.reduce).Sum(local);
  if (threadIdx.x == 0) shared_misses = total;
  __syncthreads();
  const int misses = shared_misses;
  const int hits = s.n - misses;
  const float share = p.cpu_share != nullptr ? p.cpu_share[row] : 0.0f;
  const int quota = min(s.n, max(0, __float2int_rn(share * static_cast<float>(s.n))));
  const int cpu_misses = min(quota, misses), cpu_hits = quota - cpu_misses;
  if (threadIdx.x == 0) {
    p.gpu_hits[segment] = hits - cpu_hits;
    if (p.cpu_share != nullptr) {
      p.gpu_count[segment] = s.n - quota;
      p.cpu_count[segment] = quota;
    }
  }
  if (p.cpu_share == nullptr) return;

  std::int32_t* gpu_out = p.gpu_selected + p.selected_offset[segment];
  std::int32_t* cpu_out = p.cpu_selected + p.selected_offset[segment];
  int misses_before = 0, hits_before = 0;  // in earlier tiles
  for (int tile = 0; tile < s.n; tile += kTile) {
    const int first = tile + threadIdx.x * kItems;
    bool is_cached[kItems];
    int packed = 0;
    for (int k = 0; k < kItems; ++k) {
      const int i = first + k;
      is_cached[k] = i < s.n && cached(p, s, i);
      if (i < s.n) packed += is_cached[k] ? 1 << kCachedShift : 1;
    }
    int prefix = 0, tile_total = 0;
    __syncthreads();  // tmp is reused across tiles
    Scan(tmp.scan).ExclusiveSum(packed, prefix, tile_total);
    int miss_rank = misses_before + (prefix & ((1 << kCachedShift) - 1));
    int hit_rank = hits_before + (prefix >> kCachedShift);
    for (int k = 0; k < kItems; ++k) {
      const int i = first + k;
      if (i >= s.n) break;
      // CPU blocks before i: the first cpu_misses uncached and the first cpu_hits cached ones.
      const int cpu_before = min(miss_rank, cpu_misses) + min(hit_rank, cpu_hits);
      const bool to_cpu = is_cached[k] ? hit_rank < cpu_hits : miss_rank < cpu_misses;
      const std::int32_t position = s.list[i];
      if (to_cpu) cpu_out[cpu_before] = position;
      else gpu_out[i - cpu_before] = position;
      if (is_cached[k]) ++hit_rank;
      else ++miss_rank;
    }
    misses_before += tile_total & ((1 << kCachedShift) - 1);
    hits_before += tile_total >> kCachedShift;
  }
}

}  // namespace

void launch_split_selection(const SplitSelectionParams& p, Stream stream) {
  const int segments = p.batch * p.kv_heads;
  if (segments <= 0) return;
  SplitSelectionKernel<<<segments, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
