// Sparse paged decode (DESIGN.md step 5): flash-decoding over the selected pages of each
// (request, KV head) segment, split into `splits` chunks along the selected list. Two kernels, one
// dispatcher (decode_kernel_for, below): the tensor-core kernel in detail/decode_tensor_cores.cuh
// for GQA groups of 1..8 at head dims 64 and 128, and this file's CUDA-core kernel for the rest.
//
// The CUDA-core kernel: a block owns one
// chunk and streams it in tiles of 16 tokens (K and V of one KV head) through a cp.async pipeline
// in shared memory, so each tile is read from HBM or host memory once for every query head of the
// GQA group. Threads: kTx lanes cover the head dim, 16 dims each, `group` rows of them one query
// head each, `tz` copies of that split the tile's tokens; their softmax states merge at the end.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "detail/cp_async.cuh"
#include "detail/decode_tensor_cores.cuh"
#include "detail/dispatch.cuh"
#include "detail/launch_check.cuh"
#include "detail/merge_segment.cuh"
#include "detail/pdl.cuh"
#include "detail/vec.cuh"
#include "hattn/kernels/cuda_decode.hpp"

namespace hattn::cuda {
namespace {

constexpr int kTileTokens = 16;  // pages of 16, 32 and 64 tokens are 1, 2 and 4 tiles
// Tiles in flight per block. H100, Llama-3-8B layer, 128K tokens: 4 stages of 8 KB with ~6 blocks
// per SM keep ~190 KB per SM in flight, above the ~25 KB that 3 TB/s x ~1 us latency needs.
constexpr int kStages = 4;
// Pages whose addresses a block resolves at once (selected -> page id -> HBM slot or host page).
constexpr int kMetaPages = 64;
constexpr int kTargetThreads = 128;
// Token rows of a tile are split among at most 4 thread groups, so each group walks its rows in
// chunks of kRowChunk = 4 with no run-time guard inside a chunk: the four rows' loads, dot products
// and shuffles interleave (ILP), which a guarded loop over 16 rows did not allow.
constexpr int kMaxTz = 4;
// Head dims per thread, a template parameter of the kernel: 16 (two 16-byte vectors per row) reduces
// a dot product over head_dim / 16 lanes (3 shuffles at dim 128, each serving 16 products) but needs
// more registers than 8. The default comes from kDefaultDimsPerThread; the environment variable
// HATTN_DECODE_DIMS_PER_THREAD=8|16 overrides it for tuning runs.
constexpr int kDefaultDimsPerThread = 16;

int dims_per_thread() {
  static const int value = [] {
    const char* env = std::getenv("HATTN_DECODE_DIMS_PER_THREAD");
    if (env != nullptr && std::atoi(env) == 8) return 8;
    if (env != nullptr && std::atoi(env) == 16) return 16;
    return kDefaultDimsPerThread;
  }();
  return value;
}
constexpr int kRowChunk = 4;
// Caps registers at 128 per thread; limits group_size * head_dim to 8192 (a group of 64 at dim 128).
constexpr int kMaxThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct PageRef {
  const uint4* k;      // K rows of this page and KV head, [page_size][head_dim]
  const uint4* v;      // V rows likewise
  std::uint64_t mask;  // attended tokens (bit t), already limited to the valid ones
};

struct Shape {
  int kTx;  // lanes per query head (head_dim / dims per thread)
  int group, tz, threads;
};

Shape decode_shape(int head_dim, int group, int dims_per_thread) {
  Shape s{head_dim / dims_per_thread, group, 1, 0};
  const int per_row = s.kTx * group;
  while (s.tz < kMaxTz && per_row * s.tz * 2 <= kTargetThreads) s.tz *= 2;
  s.threads = (per_row * s.tz + 31) / 32 * 32;
  return s;
}

template <class T, int D>
std::size_t decode_smem_bytes(const Shape& s) {
  const std::size_t stages = static_cast<std::size_t>(kStages) * 2 * kTileTokens * D * sizeof(T);
  const std::size_t reduce = static_cast<std::size_t>(s.group) * s.tz * (D + 2) * sizeof(float);
  return std::max(stages, reduce) + kMetaPages * sizeof(PageRef);
}

// kMerge: the merge folded in (SparseDecodeParams::out), as in the tensor-core kernel.
template <class T, int D, int kDimsPerThread, bool kMerge>
__global__ void __launch_bounds__(kMaxThreads) SparseDecodeKernel(const __grid_constant__ SparseDecodeParams p) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();  // the selection and the partial buffers belong to the kernels before until then
  constexpr int kTx = D / kDimsPerThread;         // lanes per query head and row
  constexpr int kRowVecs = D / 8;                  // uint4 per K (or V) row
  constexpr int kTileVecs = kTileTokens * kRowVecs;  // uint4 per K (or V) tile
  const int group = p.q_heads / p.kv_heads;
  const int per_row = kTx * group;
  const int tz = [&] {
    int t = 1;
    while (t < kMaxTz && per_row * t * 2 <= kTargetThreads) t *= 2;
    return t;
  }();
  const int tid = threadIdx.x;
  const int tx = tid % kTx;
  const int g = (tid / kTx) % group;
  const int z = tid / per_row;
  const bool computes = z < tz;
  const int rows_per_z = kTileTokens / tz;
  const int lane = tid % 32;
  const unsigned lanes_mask =
      kTx == 32 ? 0xffffffffu : (((1u << kTx) - 1u) << (lane & ~(kTx - 1)));

  const int segment = blockIdx.y;
  const int b = segment / p.kv_heads;
  const int h = segment % p.kv_heads;
  const int split = blockIdx.x;
  const int count = p.selected_count[segment];
  const int chunk = (count + p.splits - 1) / p.splits;
  const int begin = min(count, split * chunk);
  const int end = min(count, begin + chunk);
  const int page_first = p.page_indptr[b];
  const int len = p.seq_len[b];
  const int P = p.page_size;
  const int tiles_per_page = P / kTileTokens;  // 1, 2 or 4
  const int tpp_shift = tiles_per_page == 1 ? 0 : tiles_per_page == 2 ? 1 : 2;
  const long long head_elems = static_cast<long long>(P) * D;

  extern __shared__ uint4 smem[];
  uint4* stages = smem;
  const std::size_t stage_bytes = static_cast<std::size_t>(kStages) * 2 * kTileVecs * sizeof(uint4);
  const std::size_t reduce_bytes = static_cast<std::size_t>(group) * tz * (D + 2) * sizeof(float);
  auto* meta = reinterpret_cast<PageRef*>(reinterpret_cast<char*>(smem) + max(stage_bytes, reduce_bytes));

  // This thread's query slice, pre-scaled so logits come out in base 2.
  float q[kDimsPerThread];
  {
    const float* src = p.q + (static_cast<long long>(b) * p.q_heads + h * group + g) * D + tx * kDimsPerThread;
#pragma unroll
    for (int e = 0; e < kDimsPerThread; ++e) q[e] = computes ? src[e] * p.scale * kLog2e : 0.0f;
  }
  float m = -INFINITY, l = 0.0f, acc[kDimsPerThread];
#pragma unroll
  for (int e = 0; e < kDimsPerThread; ++e) acc[e] = 0.0f;

  const std::size_t page_elems = 2 * static_cast<std::size_t>(p.kv_heads) * head_elems;
  for (int batch_begin = begin; batch_begin < end; batch_begin += kMetaPages) {
    const int n_pages = min(kMetaPages, end - batch_begin);
    __syncthreads();  // the previous batch's pages are consumed
    for (int i = tid; i < n_pages; i += blockDim.x) {
      const int sel = batch_begin + i;
      const int pos = p.selected[p.selected_offset[segment] + sel];
      const int page = p.page_table[page_first + pos];
      const int valid = min(P, len - pos * P);
      std::uint64_t mask = valid >= 64 ? ~0ull : valid <= 0 ? 0ull : ((1ull << valid) - 1ull);
      if (p.token_masks) mask &= p.token_masks[p.selected_offset[segment] + sel];
      const int slot = p.slot_of ? p.slot_of[static_cast<long long>(page) * p.kv_heads + h] : -1;
      const T* k;
      const T* v;
      if (slot >= 0) {
        k = static_cast<const T*>(p.hbm_slots) + static_cast<long long>(slot) * 2 * head_elems;
        v = k + head_elems;
      } else {
        k = static_cast<const T*>(p.host_pages) + static_cast<long long>(page) * page_elems + h * head_elems;
        v = k + static_cast<long long>(p.kv_heads) * head_elems;
      }
      meta[i] = PageRef{reinterpret_cast<const uint4*>(k), reinterpret_cast<const uint4*>(v), mask};
    }
    __syncthreads();

    const int n_tiles = n_pages * tiles_per_page;
    auto issue = [&](int tile) {
      if (tile < n_tiles) {
        const PageRef ref = meta[tile >> tpp_shift];
        const int sub = tile & (tiles_per_page - 1);
        const std::uint64_t tile_mask = (ref.mask >> (sub * kTileTokens)) & 0xffffull;
        // Rows past the last attended token are zero-filled, never read (a partial page's tail).
        const int rows = tile_mask == 0 ? 0 : 64 - __clzll(static_cast<long long>(tile_mask));
        uint4* dst = stages + (tile % kStages) * 2 * kTileVecs;
        for (int c = tid; c < 2 * kTileVecs; c += blockDim.x) {
          const int kv = c / kTileVecs;
          const int r = (c / kRowVecs) % kTileTokens;
          const uint4* src = (kv ? ref.v : ref.k) + sub * kTileVecs;
          const bool live = r < rows;
          detail::cp_async_16(dst + c, live ? src + (c % kTileVecs) : src, live);
        }
      }
      detail::cp_async_commit();
    };
    for (int t = 0; t < kStages - 1; ++t) issue(t);
    for (int tile = 0; tile < n_tiles; ++tile) {
      // One barrier per tile: it publishes this tile's data and certifies that every thread is done
      // with the previous tile, whose stage the next issue reuses.
      detail::cp_async_wait<kStages - 2>();
      __syncthreads();
      issue(tile + kStages - 1);
      if (computes) {
        const PageRef& ref = meta[tile >> tpp_shift];
        const std::uint32_t tile_mask =
            static_cast<std::uint32_t>((ref.mask >> ((tile & (tiles_per_page - 1)) * kTileTokens)) & 0xffffull);
        const uint4* kt = stages + (tile % kStages) * 2 * kTileVecs;
        const uint4* vt = kt + kTileVecs;
        for (int c0 = 0; c0 < rows_per_z; c0 += kRowChunk) {
          float s[kRowChunk];
#pragma unroll
          for (int j = 0; j < kRowChunk; ++j) {
            const int r = z + (c0 + j) * tz;
            float kf[8];
            float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
            for (int v = 0; v < kDimsPerThread / 8; ++v) {
              detail::unpack8<T>(kt[r * kRowVecs + tx * (kDimsPerThread / 8) + v], kf);
#pragma unroll
              for (int e = 0; e < 8; e += 2) {
                d0 = fmaf(q[v * 8 + e], kf[e], d0);
                d1 = fmaf(q[v * 8 + e + 1], kf[e + 1], d1);
              }
            }
            s[j] = d0 + d1;
          }
#pragma unroll
          for (int off = kTx / 2; off > 0; off /= 2) {
#pragma unroll
            for (int j = 0; j < kRowChunk; ++j) s[j] += __shfl_xor_sync(lanes_mask, s[j], off);
          }
          float chunk_max = -INFINITY;
#pragma unroll
          for (int j = 0; j < kRowChunk; ++j) {
            const int r = z + (c0 + j) * tz;
            s[j] = ((tile_mask >> r) & 1u) ? s[j] : -INFINITY;
            chunk_max = fmaxf(chunk_max, s[j]);
          }
          const float m_new = fmaxf(m, chunk_max);
          if (m_new == -INFINITY) continue;  // nothing attended yet
          const float alpha = exp2f(m - m_new);
          l *= alpha;
#pragma unroll
          for (int e = 0; e < kDimsPerThread; ++e) acc[e] *= alpha;
#pragma unroll
          for (int j = 0; j < kRowChunk; ++j) {
            const int r = z + (c0 + j) * tz;
            const float pr = exp2f(s[j] - m_new);
            l += pr;
#pragma unroll
            for (int v = 0; v < kDimsPerThread / 8; ++v) {
              float vf[8];
              detail::unpack8<T>(vt[r * kRowVecs + tx * (kDimsPerThread / 8) + v], vf);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[v * 8 + e] = fmaf(pr, vf[e], acc[v * 8 + e]);
            }
          }
          m = m_new;
        }
      }
    }
  }
  detail::cp_async_wait<0>();
  __syncthreads();

  // Merge the tz softmax states of each query head (base 2 inside, natural log out).
  auto* red = reinterpret_cast<float*>(smem);  // [tz][group][D + 2]
  if (computes) {
    float* row = red + (static_cast<std::size_t>(z) * group + g) * (D + 2);
#pragma unroll
    for (int e = 0; e < kDimsPerThread; ++e) row[tx * kDimsPerThread + e] = acc[e];
    if (tx == 0) {
      row[D] = m;
      row[D + 1] = l;
    }
  }
  __syncthreads();
  if (computes && z == 0) {
    float mm = -INFINITY;
    for (int zz = 0; zz < tz; ++zz) mm = fmaxf(mm, red[(static_cast<std::size_t>(zz) * group + g) * (D + 2) + D]);
    float ll = 0.0f, o[kDimsPerThread] = {};
    if (mm != -INFINITY) {
      for (int zz = 0; zz < tz; ++zz) {
        const float* row = red + (static_cast<std::size_t>(zz) * group + g) * (D + 2);
        const float w = exp2f(row[D] - mm);  // 0 for a state that saw nothing
        ll += w * row[D + 1];
#pragma unroll
        for (int e = 0; e < kDimsPerThread; ++e) o[e] = fmaf(w, row[tx * kDimsPerThread + e], o[e]);
      }
    }
    const int rows = p.batch * p.q_heads;
    const long long out_row = static_cast<long long>(split) * rows + static_cast<long long>(b) * p.q_heads + h * group + g;
    const float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
    float4* dst = reinterpret_cast<float4*>(p.partial_out + out_row * D + tx * kDimsPerThread);
#pragma unroll
    for (int v = 0; v < kDimsPerThread / 4; ++v)
      dst[v] = make_float4(o[4 * v] * inv, o[4 * v + 1] * inv, o[4 * v + 2] * inv, o[4 * v + 3] * inv);
    if (tx == 0) p.partial_lse[out_row] = ll > 0.0f ? (mm + log2f(ll)) * kLn2 : -INFINITY;
  }
  if constexpr (kMerge) detail::merge_segment_if_last<D>(p, segment);
}

template <class T, int D, int kDimsPerThread, bool kMerge>
void launch(const SparseDecodeParams& p, Stream stream) {
  const Shape s = decode_shape(D, p.q_heads / p.kv_heads, kDimsPerThread);
  hattn::detail::require(s.threads <= kMaxThreads, "launch_sparse_decode", "group_size * head_dim / 16",
                         s.kTx * s.group, "<= 512");
  const std::size_t smem = decode_smem_bytes<T, D>(s);
  static const bool raised = [] {
    HATTN_CUDA_CHECK(cudaFuncSetAttribute(SparseDecodeKernel<T, D, kDimsPerThread, kMerge>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024));
    return true;
  }();
  (void)raised;
  detail::launch_programmatic(SparseDecodeKernel<T, D, kDimsPerThread, kMerge>, dim3(p.splits, p.batch * p.kv_heads),
                              dim3(s.threads), smem, stream, p);
}

// Ring stages per warp of the tensor-core kernel. H100, Llama-3-8B layer (bf16, dim 128, 16-token
// pages, all from HBM), decode + merge, host sync after each rep (2026-11-23), at 128K b1 / 128K b8
// / 32K b1: 2 stages 189 / 1385 / 59.8 us, 3 stages 191 / 1400 / 61.1, 4 stages 195 / 1396 / 61.0.
// Registers (233 per thread) cap the kernel at 2 blocks per SM whatever the stages, and 8 warps
// with one 8 KB tile each in flight while they compute another already keep HBM at ~95% of the copy
// ceiling. HATTN_DECODE_STAGES=2|3|4 overrides it for tuning runs.
constexpr int kDefaultMmaStages = 2;

int mma_stages() {
  static const int value = [] {
    const char* env = std::getenv("HATTN_DECODE_STAGES");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v >= 2 && v <= detail::kMmaMaxStages ? v : kDefaultMmaStages;
  }();
  return value;
}

template <class T, int D, bool kMerge, bool kStage>
void launch_tensor_cores(const SparseDecodeParams& p, Stream stream) {
  const int stages = mma_stages();
  const std::size_t smem = detail::tensor_core_decode_smem_bytes<T, D>(stages);
  static const bool raised = [] {
    HATTN_CUDA_CHECK(cudaFuncSetAttribute(detail::TensorCoreDecodeKernel<T, D, kMerge, kStage>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(detail::tensor_core_decode_smem_bytes<T, D>(
                                              detail::kMmaMaxStages))));
    return true;
  }();
  (void)raised;
  detail::launch_programmatic(detail::TensorCoreDecodeKernel<T, D, kMerge, kStage>, dim3(p.splits, p.batch * p.kv_heads),
                              dim3(detail::kMmaWarps * 32), smem, stream, p, stages);
}

bool tensor_cores_support(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group >= 1 && group <= detail::kMmaMaxGroup;
}

}  // namespace

const char* to_string(DecodeKernel k) {
  switch (k) {
    case DecodeKernel::kAuto: return "auto";
    case DecodeKernel::kCudaCores: return "cuda_cores";
    case DecodeKernel::kTensorCores: return "tensor_cores";
  }
  return "unknown";
}

DecodeKernel decode_kernel_for(const SparseDecodeParams& p) {
  const int group = p.kv_heads > 0 ? p.q_heads / p.kv_heads : 0;
  const bool tc = tensor_cores_support(p.head_dim, group);
  switch (p.kernel) {
    case DecodeKernel::kCudaCores: return DecodeKernel::kCudaCores;
    case DecodeKernel::kTensorCores:
      hattn::detail::require(tc, "launch_sparse_decode", "kernel", "tensor_cores",
                             "head_dim 64 or 128 and q_heads / kv_heads in 1..8 (else kAuto or kCudaCores)");
      return DecodeKernel::kTensorCores;
    case DecodeKernel::kAuto: break;
  }
  // Tensor cores wherever they can run: their cost per tile does not grow with the group, and the
  // CUDA-core kernel, issue-bound from group 4 up, stays for head dim 256 (the fp32 accumulators of
  // 16 rows x 256 dims would not fit a warp's registers beside the Q fragments) and groups over 8.
  return tc ? DecodeKernel::kTensorCores : DecodeKernel::kCudaCores;
}

int suggest_decode_splits(int segments, std::int64_t max_selected_pages, int page_size) {
  hattn::detail::require(segments > 0, "suggest_decode_splits", "segments", segments, "> 0");
  int device = 0, sms = 0, resident = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // One full wave of the common instantiation (bf16, dim 128, group 4, which the dispatcher gives
  // to the tensor-core kernel): every block is resident at once, so no second wave leaves SMs idle
  // at the tail.
  using T = __nv_bfloat16;
  const auto kernel = detail::TensorCoreDecodeKernel<T, 128>;
  HATTN_CUDA_CHECK(cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(detail::tensor_core_decode_smem_bytes<T, 128>(detail::kMmaMaxStages))));
  HATTN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &resident, kernel, detail::kMmaWarps * 32, detail::tensor_core_decode_smem_bytes<T, 128>(mma_stages())));
  const std::int64_t wave = static_cast<std::int64_t>(std::max(resident, 1)) * sms;
  // No chunk shorter than 8 tiles: the pipeline's fill and the merge would then dominate.
  const std::int64_t tiles = max_selected_pages * (page_size / kTileTokens);
  const std::int64_t by_device = std::max<std::int64_t>(1, wave / segments);
  const std::int64_t by_length = std::max<std::int64_t>(1, tiles / 8);
  return static_cast<int>(std::clamp<std::int64_t>(std::min(by_device, by_length), 1, 1024));
}

std::size_t decode_workspace_bytes(int segments) {
  hattn::detail::require(segments >= 0, "decode_workspace_bytes", "segments", segments, ">= 0");
  return static_cast<std::size_t>(segments) * sizeof(std::uint32_t);
}

void launch_sparse_decode(const SparseDecodeParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_sparse_decode";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0 && p.q_heads > 0 && p.q_heads % p.kv_heads == 0, kWhere, "q_heads",
                         p.q_heads, "a positive multiple of kv_heads");
  hattn::detail::require(p.page_size == 16 || p.page_size == 32 || p.page_size == 64, kWhere, "page_size",
                         p.page_size, "16, 32 or 64");
  hattn::detail::require(p.splits >= 1 && p.splits <= 65535, kWhere, "splits", p.splits, "in [1, 65535]");
  if (p.batch == 0) return;
  hattn::detail::require(p.batch * p.kv_heads <= 65535, kWhere, "batch * kv_heads", p.batch * p.kv_heads,
                         "<= 65535");
  hattn::detail::require(p.q && p.page_table && p.page_indptr && p.seq_len && p.selected && p.selected_offset &&
                             p.selected_count && p.partial_out && p.partial_lse,
                         kWhere, "pointers", "null", "all set");
  hattn::detail::require(p.host_pages != nullptr || (p.slot_of != nullptr && p.hbm_slots != nullptr), kWhere,
                         "host_pages", "null", "set unless every page is in HBM slots");
  hattn::detail::require(p.slot_of == nullptr || p.hbm_slots != nullptr, kWhere, "hbm_slots", "null",
                         "set when slot_of is");
  hattn::detail::require(p.out == nullptr || p.arrivals != nullptr, kWhere, "arrivals", "null",
                         "set when out is (decode_workspace_bytes, zeroed once)");
  hattn::detail::require(p.out != nullptr || p.lse == nullptr, kWhere, "lse", "set", "null without out");
  hattn::detail::require(p.staging.capacity >= 0, kWhere, "staging.capacity", p.staging.capacity, ">= 0");
  if (p.staging.enabled())
    hattn::detail::require(p.staging.complete(), kWhere, "staging pointers", "null",
                           "all set when staging.capacity > 0");
  const DecodeKernel kernel = decode_kernel_for(p);
  detail::dispatch_kv_dtype(p.dtype, kWhere, [&]<class T>() {
    detail::dispatch_head_dim(p.head_dim, kWhere, [&]<int D>() {
      const bool merge = p.out != nullptr;
      if constexpr (D <= 128) {
        if (kernel == DecodeKernel::kTensorCores) {
          const bool stage = p.staging.enabled();
          if (merge && stage) launch_tensor_cores<T, D, true, true>(p, stream);
          else if (merge) launch_tensor_cores<T, D, true, false>(p, stream);
          else if (stage) launch_tensor_cores<T, D, false, true>(p, stream);
          else launch_tensor_cores<T, D, false, false>(p, stream);
          return;
        }
      }
      if (dims_per_thread() == 8) {
        if (merge) launch<T, D, 8, true>(p, stream);
        else launch<T, D, 8, false>(p, stream);
      } else {
        if (merge) launch<T, D, 16, true>(p, stream);
        else launch<T, D, 16, false>(p, stream);
      }
    });
  });
}

}  // namespace hattn::cuda
