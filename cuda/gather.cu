// Copies (page, KV head) blocks of the mapped host pool into HBM slots (cache admission, DESIGN.md
// step 7). A small persistent grid loops over groups of entries; each thread issues all its 16-byte
// loads of a group before any store, so a block keeps 32 KB of PCIe reads in flight with 256
// threads. Entries are grouped so a group is ~2048 vectors whatever the block size (one 8 KB block
// of 16-token bf16 pages at dim 128 is 512), and the publication of a group follows its copy. An
// entry in the staging area (GatherParams::staging) is copied from that HBM copy instead of the host.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "detail/launch_check.cuh"
#include "detail/staging.cuh"
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
  const int staged = detail::staged_entries(p.staging);
  for (int e0 = static_cast<int>(blockIdx.x) * group; e0 < n; e0 += static_cast<int>(gridDim.x) * group) {
    const int ne = min(group, n - e0);
    if (static_cast<int>(threadIdx.x) < ne) {
      const int e = e0 + static_cast<int>(threadIdx.x);
      const int slot = p.slots ? p.slots[e] : e;
      src[threadIdx.x] = nullptr;
      if (slot >= 0) {
        // keys may be null without staging (page_ids and heads name the blocks).
        const int entry = staged > 0 ? detail::staged_entry(p.staging, staged, p.keys[e]) : -1;
        if (entry >= 0) {
          src[threadIdx.x] = static_cast<const uint4*>(p.staging.blocks) + static_cast<long long>(entry) * 2 * head_vecs;
          src_v[threadIdx.x] = src[threadIdx.x] + head_vecs;
        } else {
          const int page_id = p.page_ids ? p.page_ids[e] : p.keys[e] / p.kv_heads;
          const int head = p.heads ? p.heads[e] : p.keys[e] % p.kv_heads;
          const auto* page = static_cast<const uint4*>(p.host_pages) +
                             static_cast<long long>(page_id) * 2 * head_vecs * p.kv_heads;
          src[threadIdx.x] = page + head * head_vecs;
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
    if (p.slot_of != nullptr) {
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

// One block per (segment, chunk of its selected list): each lane checks one entry, and the warp takes
// staging entries for its blocks with one atomic.
constexpr int kStageListThreads = 256;

__global__ void __launch_bounds__(kStageListThreads) StageListKernel(const __grid_constant__ StageParams p) {
  const int segment = blockIdx.y;
  const int b = segment / p.kv_heads;
  const int h = segment % p.kv_heads;
  const int i = static_cast<int>(blockIdx.x) * kStageListThreads + static_cast<int>(threadIdx.x);
  const int n = p.selected_count[segment];
  if (static_cast<int>(blockIdx.x) * kStageListThreads >= n) return;  // block-uniform
  bool stage = false;
  int key = 0;
  if (i < n) {
    const int pos = p.selected[p.selected_offset[segment] + i];
    const int page = p.page_table[p.page_indptr[b] + pos];
    key = page * p.kv_heads + h;
    const bool full = static_cast<long long>(pos + 1) * p.page_size <= p.seq_len[b];
    stage = full && (p.slot_of == nullptr || p.slot_of[key] < 0);
  }
  const unsigned want = __ballot_sync(0xffffffffu, stage);
  if (want == 0) return;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int leader = __ffs(want) - 1;
  int first = 0;
  if (lane == leader) first = atomicAdd(p.staging.count, __popc(want));
  first = __shfl_sync(0xffffffffu, first, leader);
  const int entry = first + __popc(want & ((1u << lane) - 1u));
  if (stage && entry < p.staging.capacity) {
    p.staging.key_of[entry] = key;
    p.staging.index_of[key] = entry;
  }
}

// The block shapes the gather copies; log2 of a head block's 16-byte vectors.
int require_block_shape(const char* where, int page_size, int head_dim, DType dtype) {
  hattn::detail::require(page_size == 16 || page_size == 32 || page_size == 64, where, "page_size", page_size,
                         "16, 32 or 64");
  hattn::detail::require(head_dim == 64 || head_dim == 128 || head_dim == 256, where, "head_dim", head_dim,
                         "64, 128 or 256");
  const long long head_bytes = static_cast<long long>(page_size) * head_dim * dtype_bytes(dtype);
  hattn::detail::require(head_bytes % 16 == 0 && (head_bytes & (head_bytes - 1)) == 0, where, "head block bytes",
                         head_bytes, "a power of two multiple of 16");
  int head_vecs_log2 = 0;
  while ((16ll << head_vecs_log2) < head_bytes) ++head_vecs_log2;
  return head_vecs_log2;
}

}  // namespace

void launch_stage_blocks(const StageParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_stage_blocks";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  hattn::detail::require(p.max_count >= 0, kWhere, "max_count", p.max_count, ">= 0");
  hattn::detail::require(p.staging.capacity > 0, kWhere, "staging.capacity", p.staging.capacity, "> 0");
  hattn::detail::require(p.batch * p.kv_heads <= 65535, kWhere, "batch * kv_heads", p.batch * p.kv_heads, "<= 65535");
  // The gather's shape checks, before the list kernel takes entries the gather would then not fill.
  require_block_shape(kWhere, p.page_size, p.head_dim, p.dtype);
  if (p.batch == 0 || p.max_count == 0) return;
  hattn::detail::require(p.page_table && p.page_indptr && p.seq_len && p.selected && p.selected_offset &&
                             p.selected_count && p.host_pages && p.staging.complete(),
                         kWhere, "pointers", "null", "all set (slot_of may be null)");
  const dim3 grid((p.max_count + kStageListThreads - 1) / kStageListThreads, p.batch * p.kv_heads);
  StageListKernel<<<grid, kStageListThreads, 0, stream>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
  // The listed entries, copied in: destination entry e, source named by key_of[e].
  GatherParams g{.host_pages = p.host_pages, .hbm_slots = p.staging.blocks, .count = p.staging.count,
                 .n = p.staging.capacity, .kv_heads = p.kv_heads, .page_size = p.page_size, .head_dim = p.head_dim,
                 .dtype = p.dtype, .keys = p.staging.key_of};
  // All SMs: this copy is on the decode's path, not beside it.
  g.max_blocks = 4 * kGatherDefaultBlocks;
  launch_gather_pages(g, stream);
}

void launch_gather_pages(const GatherParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_gather_pages";
  hattn::detail::require(p.n >= 0, kWhere, "n", p.n, ">= 0");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  const int head_vecs_log2 = require_block_shape(kWhere, p.page_size, p.head_dim, p.dtype);
  hattn::detail::require(p.max_blocks >= 0, kWhere, "max_blocks", p.max_blocks, ">= 0");
  hattn::detail::require(p.slot_of == nullptr || (p.keys != nullptr && p.slots != nullptr), kWhere,
                         "keys and slots", "null", "set when slot_of is");
  hattn::detail::require((p.page_ids == nullptr) == (p.heads == nullptr), kWhere, "page_ids and heads", "one set",
                         "both set, or both null and keys set");
  hattn::detail::require(p.staging.capacity >= 0, kWhere, "staging.capacity", p.staging.capacity, ">= 0");
  if (p.staging.enabled())
    hattn::detail::require(p.keys && p.staging.complete(), kWhere, "staging", "without keys or a pointer",
                           "keys and every staging pointer set");
  if (p.n == 0) return;
  hattn::detail::require(p.host_pages && p.hbm_slots && (p.page_ids || p.keys), kWhere, "pointers", "null",
                         "host_pages, hbm_slots and page_ids (or keys) set");
  const long long head_bytes = 16ll << head_vecs_log2;
  const int group = static_cast<int>(std::clamp<long long>(kGroupVecs / (2 * (head_bytes / 16)), 1, kMaxGroup));
  const int groups = (p.n + group - 1) / group;
  const int blocks = std::min(groups, p.max_blocks > 0 ? p.max_blocks : kGatherDefaultBlocks);
  GatherPagesKernel<<<blocks, kThreads, 0, stream>>>(p, head_vecs_log2, group);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
