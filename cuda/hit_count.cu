// Counts, per segment, the selected blocks the decode will read from HBM slots (the rest it reads from
// host memory), for the step's statistics: the slot map it sees is the one the decode sees, because
// it runs on the compute stream after the cache's wait for the previous admission.
#include <cuda_runtime.h>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_hit_count.hpp"

namespace hattn::cuda {
namespace {

constexpr int kSegmentsPerBlock = 4;  // one warp each

__global__ void __launch_bounds__(kSegmentsPerBlock * 32) CountHitsKernel(const __grid_constant__ HitCountParams p) {
  const int segment = blockIdx.x * kSegmentsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (segment >= p.batch * p.kv_heads) return;
  const int row = segment / p.kv_heads, head = segment % p.kv_heads;
  const std::int32_t* table = p.page_table + p.page_indptr[row];
  const std::int32_t* list = p.selected + p.selected_offset[segment];
  const int n = p.selected_count[segment];
  int hits = 0;
  for (int i = lane; i < n; i += 32)
    hits += p.slot_of[static_cast<long long>(table[list[i]]) * p.kv_heads + head] >= 0;
  for (int o = 16; o > 0; o /= 2) hits += __shfl_xor_sync(0xffffffffu, hits, o);
  if (lane == 0) p.hits[segment] = hits;
}

}  // namespace

void launch_count_hits(const HitCountParams& p, Stream stream) {
  const int segments = p.batch * p.kv_heads;
  if (segments <= 0) return;
  const int blocks = (segments + kSegmentsPerBlock - 1) / kSegmentsPerBlock;
  CountHitsKernel<<<blocks, kSegmentsPerBlock * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
