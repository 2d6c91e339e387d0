// Splits each segment's ascending selection at its row's CPU range: the range is one contiguous run
// of the list, found by two binary searches, and the GPU keeps what lies before and after it.
#include <cuda_runtime.h>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_split.hpp"

namespace hattn::cuda {
namespace {

constexpr int kSegmentsPerBlock = 4;  // one warp each

// First index in list[0, n) whose value is >= key.
__device__ int lower_bound(const std::int32_t* list, int n, std::int32_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (list[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

__global__ void __launch_bounds__(kSegmentsPerBlock * 32) SplitSelectionKernel(const __grid_constant__ SplitSelectionParams p) {
  const int segment = blockIdx.x * kSegmentsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (segment >= p.batch * p.kv_heads) return;
  const int row = segment / p.kv_heads;
  const std::int32_t* in = p.selected + p.selected_offset[segment];
  std::int32_t* out = p.gpu_selected + p.selected_offset[segment];
  const int n = p.selected_count[segment];
  int cut_begin = 0, cut_end = 0;
  if (lane == 0) {
    const std::int32_t begin = p.cpu_begin[row], end = p.cpu_end[row];
    cut_begin = lower_bound(in, n, begin);
    cut_end = end > begin ? cut_begin + lower_bound(in + cut_begin, n - cut_begin, end) : cut_begin;
  }
  cut_begin = __shfl_sync(0xffffffffu, cut_begin, 0);
  cut_end = __shfl_sync(0xffffffffu, cut_end, 0);
  for (int i = lane; i < cut_begin; i += 32) out[i] = in[i];
  const int moved = cut_end - cut_begin;
  for (int i = cut_end + lane; i < n; i += 32) out[i - moved] = in[i];
  if (lane == 0) p.gpu_count[segment] = n - moved;
}

}  // namespace

void launch_split_selection(const SplitSelectionParams& p, Stream stream) {
  const int segments = p.batch * p.kv_heads;
  if (segments <= 0) return;
  const int blocks = (segments + kSegmentsPerBlock - 1) / kSegmentsPerBlock;
  SplitSelectionKernel<<<blocks, kSegmentsPerBlock * 32, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
