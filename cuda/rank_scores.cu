// Writes the blended ranking score over the bound in the segments that rank by it (one block each).
#include <cuda_runtime.h>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_rank.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) RankScoresKernel(const __grid_constant__ RankScoresParams p) {
  const int segment = blockIdx.x;
  if (!p.blended[segment]) return;
  const int row = segment / p.kv_heads, head = segment % p.kv_heads;
  const int n = p.page_indptr[row + 1] - p.page_indptr[row];
  const long long begin = static_cast<long long>(p.page_indptr[row]) * p.kv_heads + static_cast<long long>(head) * n;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float e = p.estimate[begin + i];
    p.rank[begin + i] = e + p.blend * (p.rank[begin + i] - e);
  }
}

}  // namespace

void launch_rank_scores(const RankScoresParams& p, Stream stream) {
  const int segments = p.batch * p.kv_heads;
  if (segments <= 0) return;
  RankScoresKernel<<<segments, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
