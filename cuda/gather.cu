// Copies (page, KV head) blocks of the mapped host pool into HBM slots (cache admission, DESIGN.md
// step 7). One block per entry streams K then V of the head as 16-byte loads, all issued before any
// store so each thread keeps several PCIe reads in flight; dtype and head dim only set byte counts.
#include <cuda_runtime.h>

#include <cstdint>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_gather.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kLoadsInFlight = 8;  // 128 threads x 8 x 16 B = 16 KB per block in flight

__global__ void __launch_bounds__(kThreads) GatherPagesKernel(const __grid_constant__ GatherParams p,
                                                             long long head_vecs, long long page_vecs) {
  const int n = p.count ? min(*p.count, p.n) : p.n;
  for (int e = blockIdx.x; e < n; e += gridDim.x) {
    const int slot = p.slots[e];
    if (slot < 0) continue;
    const auto* page = static_cast<const uint4*>(p.host_pages) + static_cast<long long>(p.page_ids[e]) * page_vecs;
    const uint4* k = page + p.heads[e] * head_vecs;
    const uint4* v = k + p.kv_heads * head_vecs;
    uint4* dst = static_cast<uint4*>(p.hbm_slots) + static_cast<long long>(slot) * 2 * head_vecs;
    const long long total = 2 * head_vecs;
    for (long long base = 0; base < total; base += kThreads * kLoadsInFlight) {
      uint4 buf[kLoadsInFlight];
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) {
        const long long c = base + j * kThreads + threadIdx.x;
        if (c < total) buf[j] = c < head_vecs ? k[c] : v[c - head_vecs];
      }
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) {
        const long long c = base + j * kThreads + threadIdx.x;
        if (c < total) dst[c] = buf[j];
      }
    }
  }
}

}  // namespace

void launch_gather_pages(const GatherParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_gather_pages";
  hattn::detail::require(p.n >= 0, kWhere, "n", p.n, ">= 0");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  hattn::detail::require(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, kWhere, "page_size",
                         p.page_size, "16, 32 or 64");
  hattn::detail::require(p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256, kWhere, "head_dim",
                         p.head_dim, "64, 128 or 256");
  if (p.n == 0) return;
  hattn::detail::require(p.host_pages && p.hbm_slots && p.page_ids && p.heads && p.slots, kWhere, "pointers",
                         "null", "all set");
  const long long head_vecs = static_cast<long long>(p.page_size) * p.head_dim * dtype_bytes(p.dtype) / 16;
  const long long page_vecs = 2 * head_vecs * p.kv_heads;
  // Enough blocks for every SM to keep several blocks of loads in flight; more entries loop.
  const int blocks = p.n < 4096 ? p.n : 4096;
  GatherPagesKernel<<<blocks, kThreads, 0, stream>>>(p, head_vecs, page_vecs);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
