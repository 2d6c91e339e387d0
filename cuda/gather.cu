// Copies (page, KV head) blocks of the mapped host pool into HBM slots (cache admission, DESIGN.md
// step 7). A small persistent grid loops over groups of entries; each thread issues all its 16-byte
// loads of a group before any store, so a block keeps 32 KB of PCIe reads in flight with 256
// threads. Entries are grouped so a group is ~2048 vectors whatever the block size (one 8 KB block
// of 16-token bf16 pages at dim 128 is 512), and the publication of a group follows its copy. An
// entry the decode staged (GatherParams::staging) is copied from that HBM copy instead of the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "detail/launch_check.cuh"
#include "hattn/kernels/cuda_gather.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLoadsInFlight = 8;  // 256 threads x 8 x 16 B = 32 KB per block in flight
constexpr int kGroupVecs = kThreads * kLoadsInFlight;
constexpr int kMaxGroup = 16;      // smallest block: 16 tokens x 64 dims x 1 byte x 2 = 128 vectors

__global__ void __launch_bounds__(kThreads) GatherPagesKernel(const __grid_constant__ GatherParams p,
                                                             int head_vecs_log2, int group) {
  __shared__ const uint4* src[kMaxGroup];  // K; null: the entry is skipped
  __shared__ const uint4* src_v[kMaxGroup];
  __shared__ uint4* dst[kMaxGroup];
  const int n = p.count ? min(*p.count, p.n) : p.n;
  const long long head_vecs = 1ll << head_vecs_log2;
  const int entry_log2 = head_vecs_log2 + 1;  // K then V
  const int staged = p.staging.capacity > 0 ? min(*p.staging.count, p.staging.capacity) : 0;
  for (int e0 = static_cast<int>(blockIdx.x) * group; e0 < n; e0 += static_cast<int>(gridDim.x) * group) {
    const int ne = min(group, n - e0);
    if (static_cast<int>(threadIdx.x) < ne) {
      const int e = e0 + static_cast<int>(threadIdx.x);
      const int slot = p.slots[e];
      src[threadIdx.x] = nullptr;
      if (slot >= 0) {
        const int entry = staged > 0 ? p.staging.index_of[p.keys[e]] : -1;
        if (entry >= 0 && entry < staged && p.staging.key_of[entry] == p.keys[e]) {
          src[threadIdx.x] = static_cast<const uint4*>(p.staging.blocks) + static_cast<long long>(entry) * 2 * head_vecs;
          src_v[threadIdx.x] = src[threadIdx.x] + head_vecs;
        } else {
          const auto* page = static_cast<const uint4*>(p.host_pages) +
                             static_cast<long long>(p.page_ids[e]) * 2 * head_vecs * p.kv_heads;
          src[threadIdx.x] = page + p.heads[e] * head_vecs;
          src_v[threadIdx.x] = src[threadIdx.x] + p.kv_heads * head_vecs;
        }
        dst[threadIdx.x] = static_cast<uint4*>(p.hbm_slots) + static_cast<long long>(slot) * 2 * head_vecs;
      }
    }
    __syncthreads();
    const long long work = static_cast<long long>(ne) << entry_log2;
    for (long long base = 0; base < work; base += kGroupVecs) {
      uint4 buf[kLoadsInFlight];
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) {
        const long long c = base + j * kThreads + threadIdx.x;
        const int e = static_cast<int>(c >> entry_log2);
        const long long i = c & ((1ll << entry_log2) - 1);
        if (c < work && src[e]) buf[j] = i < head_vecs ? src[e][i] : src_v[e][i - head_vecs];
      }
#pragma unroll
      for (int j = 0; j < kLoadsInFlight; ++j) {
        const long long c = base + j * kThreads + threadIdx.x;
        const int e = static_cast<int>(c >> entry_log2);
        if (c < work && src[e]) dst[e][c & ((1ll << entry_log2) - 1)] = buf[j];
      }
    }
    if (p.slot_of) {
      __threadfence();  // this thread's stores before the publication below, device-wide
      __syncthreads();
      if (static_cast<int>(threadIdx.x) < ne && src[threadIdx.x]) {
        const int e = e0 + static_cast<int>(threadIdx.x);
        p.slot_of[p.keys[e]] = p.slots[e];
      }
    }
    __syncthreads();  // src/dst are rewritten by the next group
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
  hattn::detail::require(p.max_blocks >= 0, kWhere, "max_blocks", p.max_blocks, ">= 0");
  hattn::detail::require((p.slot_of == nullptr) == (p.keys == nullptr), kWhere, "slot_of and keys",
                         "one set", "both set or both null");
  hattn::detail::require(p.staging.capacity >= 0, kWhere, "staging.capacity", p.staging.capacity, ">= 0");
  if (p.staging.enabled())
    hattn::detail::require(p.keys && p.staging.blocks && p.staging.key_of && p.staging.index_of && p.staging.count,
                           kWhere, "staging", "without keys or a pointer", "keys and every staging pointer set");
  if (p.n == 0) return;
  hattn::detail::require(p.host_pages && p.hbm_slots && p.page_ids && p.heads && p.slots, kWhere, "pointers",
                         "null", "all set");
  const long long head_bytes = static_cast<long long>(p.page_size) * p.head_dim * dtype_bytes(p.dtype);
  hattn::detail::require(head_bytes % 16 == 0 && (head_bytes & (head_bytes - 1)) == 0, kWhere, "head block bytes",
                         head_bytes, "a power of two multiple of 16");
  int head_vecs_log2 = 0;
  while ((16ll << head_vecs_log2) < head_bytes) ++head_vecs_log2;
  const int group = static_cast<int>(std::clamp<long long>(kGroupVecs / (2 * (head_bytes / 16)), 1, kMaxGroup));
  const int groups = (p.n + group - 1) / group;
  const int blocks = std::min(groups, p.max_blocks > 0 ? p.max_blocks : kGatherDefaultBlocks);
  GatherPagesKernel<<<blocks, kThreads, 0, stream>>>(p, head_vecs_log2, group);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
