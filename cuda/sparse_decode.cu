// Sparse paged decode (DESIGN.md step 5): flash-decoding over the selected pages of each
// (request, KV head) segment, split into `splits` chunks along the selected list. A block owns one
// chunk and streams it in tiles of 16 tokens (K and V of one KV head) through a cp.async pipeline
// in shared memory, so each tile is read from HBM or host memory once for every query head of the
// GQA group. Threads: kTx lanes cover the head dim with 16-byte vectors, `group` rows of them one
// query head each, `tz` copies of that split the tile's tokens; their softmax states merge at the end.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "detail/cp_async.cuh"
#include "detail/dispatch.cuh"
#include "detail/launch_check.cuh"
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
// Caps registers at 128 per thread (s[16], acc, q and one unpacked row stay in registers); limits
// group_size * head_dim to 4096 (a group of 32 at dim 128).
constexpr int kMaxThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct PageRef {
  const uint4* k;      // K rows of this page and KV head, [page_size][head_dim]
  const uint4* v;      // V rows likewise
  std::uint64_t mask;  // attended tokens (bit t), already limited to the valid ones
};

struct Shape {
  int kTx;  // lanes per query head (head_dim / 8)
  int group, tz, threads;
};

Shape decode_shape(int head_dim, int group) {
  Shape s{head_dim / 8, group, 1, 0};
  const int per_row = s.kTx * group;
  while (s.tz < kTileTokens && per_row * s.tz * 2 <= kTargetThreads) s.tz *= 2;
  s.threads = (per_row * s.tz + 31) / 32 * 32;
  return s;
}

template <class T, int D>
std::size_t decode_smem_bytes(const Shape& s) {
  const std::size_t stages = static_cast<std::size_t>(kStages) * 2 * kTileTokens * D * sizeof(T);
  const std::size_t reduce = static_cast<std::size_t>(s.group) * s.tz * (D + 2) * sizeof(float);
  return std::max(stages, reduce) + kMetaPages * sizeof(PageRef);
}

template <class T, int D>
__global__ void __launch_bounds__(kMaxThreads) SparseDecodeKernel(const __grid_constant__ SparseDecodeParams p) {
  constexpr int kTx = D / 8;                     // lanes per row, 16 bytes each
  constexpr int kTileVecs = kTileTokens * kTx;   // uint4 per K (or V) tile
  const int group = p.q_heads / p.kv_heads;
  const int per_row = kTx * group;
  const int tz = [&] {
    int t = 1;
    while (t < kTileTokens && per_row * t * 2 <= kTargetThreads) t *= 2;
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
  const int tiles_per_page = P / kTileTokens;
  const long long head_elems = static_cast<long long>(P) * D;

  extern __shared__ uint4 smem[];
  uint4* stages = smem;
  const std::size_t stage_bytes = static_cast<std::size_t>(kStages) * 2 * kTileVecs * sizeof(uint4);
  const std::size_t reduce_bytes = static_cast<std::size_t>(group) * tz * (D + 2) * sizeof(float);
  auto* meta = reinterpret_cast<PageRef*>(reinterpret_cast<char*>(smem) + max(stage_bytes, reduce_bytes));

  // This thread's query slice, pre-scaled so logits come out in base 2.
  float q[8];
  {
    const float* src = p.q + (static_cast<long long>(b) * p.q_heads + h * group + g) * D + tx * 8;
#pragma unroll
    for (int e = 0; e < 8; ++e) q[e] = computes ? src[e] * p.scale * kLog2e : 0.0f;
  }
  float m = -INFINITY, l = 0.0f, acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.0f;

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
        const PageRef ref = meta[tile / tiles_per_page];
        const int sub = tile % tiles_per_page;
        const std::uint64_t tile_mask = (ref.mask >> (sub * kTileTokens)) & 0xffffull;
        // Rows past the last attended token are zero-filled, never read (a partial page's tail).
        const int rows = tile_mask == 0 ? 0 : 64 - __clzll(static_cast<long long>(tile_mask));
        uint4* dst = stages + (tile % kStages) * 2 * kTileVecs;
        for (int c = tid; c < 2 * kTileVecs; c += blockDim.x) {
          const int kv = c / kTileVecs;
          const int r = (c / kTx) % kTileTokens;
          const uint4* src = (kv ? ref.v : ref.k) + sub * kTileVecs;
          const bool live = r < rows;
          detail::cp_async_16(dst + c, live ? src + (c % kTileVecs) : src, live);
        }
      }
      detail::cp_async_commit();
    };
    for (int t = 0; t < kStages - 1; ++t) issue(t);
    for (int tile = 0; tile < n_tiles; ++tile) {
      issue(tile + kStages - 1);
      detail::cp_async_wait<kStages - 1>();
      __syncthreads();
      if (computes) {
        const PageRef& ref = meta[tile / tiles_per_page];
        const std::uint32_t tile_mask =
            static_cast<std::uint32_t>((ref.mask >> ((tile % tiles_per_page) * kTileTokens)) & 0xffffull);
        const uint4* kt = stages + (tile % kStages) * 2 * kTileVecs;
        const uint4* vt = kt + kTileVecs;
        float s[kTileTokens];
        float tile_max = -INFINITY;
#pragma unroll
        for (int j = 0; j < kTileTokens; ++j) {
          if (j < rows_per_z) {
            const int r = z + j * tz;
            float kf[8];
            detail::unpack8<T>(kt[r * kTx + tx], kf);
            float dot = 0.0f;
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(q[e], kf[e], dot);
#pragma unroll
            for (int off = kTx / 2; off > 0; off /= 2) dot += __shfl_xor_sync(lanes_mask, dot, off);
            s[j] = ((tile_mask >> r) & 1u) ? dot : -INFINITY;
            tile_max = fmaxf(tile_max, s[j]);
          }
        }
        const float m_new = fmaxf(m, tile_max);
        if (m_new != -INFINITY) {
          const float alpha = exp2f(m - m_new);
          l *= alpha;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[e] *= alpha;
#pragma unroll
          for (int j = 0; j < kTileTokens; ++j) {
            if (j < rows_per_z) {
              const int r = z + j * tz;
              const float pr = exp2f(s[j] - m_new);
              l += pr;
              float vf[8];
              detail::unpack8<T>(vt[r * kTx + tx], vf);
#pragma unroll
              for (int e = 0; e < 8; ++e) acc[e] = fmaf(pr, vf[e], acc[e]);
            }
          }
          m = m_new;
        }
      }
      __syncthreads();  // the stage is free for the tile issued next
    }
  }
  detail::cp_async_wait<0>();
  __syncthreads();

  // Merge the tz softmax states of each query head (base 2 inside, natural log out).
  auto* red = reinterpret_cast<float*>(smem);  // [tz][group][D + 2]
  if (computes) {
    float* row = red + (static_cast<std::size_t>(z) * group + g) * (D + 2);
#pragma unroll
    for (int e = 0; e < 8; ++e) row[tx * 8 + e] = acc[e];
    if (tx == 0) {
      row[D] = m;
      row[D + 1] = l;
    }
  }
  __syncthreads();
  if (computes && z == 0) {
    float mm = -INFINITY;
    for (int zz = 0; zz < tz; ++zz) mm = fmaxf(mm, red[(static_cast<std::size_t>(zz) * group + g) * (D + 2) + D]);
    float ll = 0.0f, o[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    if (mm != -INFINITY) {
      for (int zz = 0; zz < tz; ++zz) {
        const float* row = red + (static_cast<std::size_t>(zz) * group + g) * (D + 2);
        const float w = exp2f(row[D] - mm);  // 0 for a state that saw nothing
        ll += w * row[D + 1];
#pragma unroll
        for (int e = 0; e < 8; ++e) o[e] = fmaf(w, row[tx * 8 + e], o[e]);
      }
    }
    const int rows = p.batch * p.q_heads;
    const long long out_row = static_cast<long long>(split) * rows + static_cast<long long>(b) * p.q_heads + h * group + g;
    const float inv = ll > 0.0f ? 1.0f / ll : 0.0f;
    float4* dst = reinterpret_cast<float4*>(p.partial_out + out_row * D + tx * 8);
    dst[0] = make_float4(o[0] * inv, o[1] * inv, o[2] * inv, o[3] * inv);
    dst[1] = make_float4(o[4] * inv, o[5] * inv, o[6] * inv, o[7] * inv);
    if (tx == 0) p.partial_lse[out_row] = ll > 0.0f ? (mm + log2f(ll)) * kLn2 : -INFINITY;
  }
}

template <class T, int D>
void launch(const SparseDecodeParams& p, Stream stream) {
  const Shape s = decode_shape(D, p.q_heads / p.kv_heads);
  hattn::detail::require(s.threads <= kMaxThreads, "launch_sparse_decode", "group_size * head_dim / 8",
                         s.kTx * s.group, "<= 512");
  const std::size_t smem = decode_smem_bytes<T, D>(s);
  static const bool raised = [] {
    HATTN_CUDA_CHECK(cudaFuncSetAttribute(SparseDecodeKernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          200 * 1024));
    return true;
  }();
  (void)raised;
  SparseDecodeKernel<T, D><<<dim3(p.splits, p.batch * p.kv_heads), s.threads, smem, stream>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace

int suggest_decode_splits(int segments, std::int64_t max_selected_pages, int page_size) {
  hattn::detail::require(segments > 0, "suggest_decode_splits", "segments", segments, "> 0");
  int device = 0, sms = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // About four blocks per SM in total, and no chunk shorter than 8 tiles (the pipeline's depth and
  // the partials' merge cost would then dominate).
  const std::int64_t tiles = max_selected_pages * (page_size / kTileTokens);
  const std::int64_t by_device = (4LL * sms + segments - 1) / segments;
  const std::int64_t by_length = std::max<std::int64_t>(1, tiles / 8);
  return static_cast<int>(std::clamp<std::int64_t>(std::min(by_device, by_length), 1, 1024));
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
  detail::dispatch_kv_dtype(p.dtype, kWhere, [&]<class T>() {
    detail::dispatch_head_dim(p.head_dim, kWhere, [&]<int D>() { launch<T, D>(p, stream); });
  });
}

}  // namespace hattn::cuda
