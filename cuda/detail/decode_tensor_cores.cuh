#pragma once
// Sparse paged decode on tensor cores, for GQA groups of 1..8 query heads and head dims 64 and 128.
// Same contract as the CUDA-core kernel in sparse_decode.cu (one block per (segment, split), one
// partial (out, lse) per query head and split); launched by its dispatcher.
//
// Why: the CUDA-core kernel spends ~3 instructions per (token, query head, 8 dims) on converts, FMAs
// and shuffles and was issue-bound at 2.0 TB/s on an H100 (128K tokens, group 4). Here the query
// heads of the group are the M rows of one m16n8k16 A operand (padded to 16; rows 8..15 are zero),
// so a 16-token tile costs 2 * head_dim / 8 mma.sync plus head_dim / 8 ldmatrix per warp, whatever
// the group size, and the kernel is left bound by memory (FlashInfer's decode with GQA does the
// same padding). S = Q K^T takes K rows as the B operand straight from shared memory (ldmatrix);
// P is rounded to the KV dtype and multiplies V (ldmatrix.trans) into fp32 accumulators, as
// FlashAttention-2 does; the softmax state stays fp32, base 2 inside, natural log out.
//
// Work split: the block's chunk of the selected list is dealt page by page to its warps (warp w
// takes pages w, w + kMmaWarps, ...). Each warp streams its own pages through a private ring of
// `stages` 16-token tiles (cp.async, zero-filled past the last attended token), so the main loop
// needs no block barrier: a warp waits only for its own copies. Page addresses are resolved 32 pages
// at a time, one per lane, and passed on by shuffles. The warps' softmax states merge at the end.
//
// Staging (kStage, SparseDecodeParams::staging): a block the HBM cache lacks but launch_stage_blocks
// copied into the staging area is read there (HBM) instead of from the host pool.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cp_async.cuh"
#include "hattn/kernels/cuda_decode.hpp"
#include "merge_segment.cuh"
#include "mma.cuh"
#include "pdl.cuh"
#include "staging.cuh"

namespace hattn::cuda::detail {

inline constexpr int kMmaWarps = 4;
inline constexpr int kMmaTileTokens = 16;  // the k extent of one P.V mma; pages hold 1, 2 or 4 tiles
inline constexpr int kMmaMaxGroup = 8;     // query heads that fit the 8 live rows of the A operand
inline constexpr int kMmaMaxStages = 4;    // tile masks of all stages share one 64-bit register

/// Shared memory of one block: the warps' tile rings, reused at the end for the warps' states.
template <class T, int D>
std::size_t tensor_core_decode_smem_bytes(int stages) {
  const std::size_t ring = static_cast<std::size_t>(kMmaWarps) * stages * 2 * kMmaTileTokens * D * sizeof(T);
  const std::size_t reduce = static_cast<std::size_t>(kMmaWarps) * kMmaMaxGroup * (D + 2) * sizeof(float);
  return std::max(ring, reduce);
}

template <int kPending>
__device__ __forceinline__ void cp_async_wait_upto(int pending) {
  if constexpr (kPending > 0) {
    if (pending >= kPending) {
      cp_async_wait<kPending>();
      return;
    }
    cp_async_wait_upto<kPending - 1>(pending);
  } else {
    cp_async_wait<0>();
  }
}

/// kMerge: the merge folded in (SparseDecodeParams::out); a template flag, so that the kernel without
/// it is the one that was tuned (its epilogue changes the register allocation of the loop before it).
/// kStage: blocks staged in SparseDecodeParams::staging are read there; a flag for the same reason.
template <class T, int D, bool kMerge = false, bool kStage = false>
__global__ void __launch_bounds__(kMmaWarps * 32)
    TensorCoreDecodeKernel(const __grid_constant__ SparseDecodeParams p, int stages) {
  constexpr int kSteps = D / 16;                         // k-steps of Q K^T; pairs of 8-dim blocks of P V
  constexpr int kRowChunks = D / 8;                      // 16-byte chunks per K or V row
  constexpr int kTileElems = kMmaTileTokens * D;         // elements of the K (or V) half of a tile
  constexpr int kCopiesPerHalf = kTileElems / 8 / 32;    // 16-byte copies per lane per half tile
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;
  pdl_launch_dependents();
  pdl_wait();  // the selection and the partial buffers belong to the kernels before until then
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int gid = lane / 4;  // fragment row (query head) of this lane
  const int tig = lane % 4;  // fragment column pair of this lane

  const int group = p.q_heads / p.kv_heads;
  const int segment = blockIdx.y;
  const int b = segment / p.kv_heads;
  const int h = segment % p.kv_heads;
  const int split = blockIdx.x;
  const int count = p.selected_count[segment];
  const int sel_offset = p.selected_offset[segment];
  const int chunk = (count + p.splits - 1) / p.splits;
  const int begin = min(count, split * chunk);
  const int end = min(count, begin + chunk);
  const int page_first = p.page_indptr[b];
  const int len = p.seq_len[b];
  const int P = p.page_size;
  const int tpp_shift = P == 16 ? 0 : P == 32 ? 1 : 2;  // tiles per page: 1, 2 or 4
  const long long head_elems = static_cast<long long>(P) * D;
  const long long page_elems = 2 * static_cast<long long>(p.kv_heads) * head_elems;
  [[maybe_unused]] int staged = 0;  // valid entries of the staging area
  if constexpr (kStage) staged = staged_entries(p.staging);

  extern __shared__ uint4 smem[];
  T* ring = reinterpret_cast<T*>(smem) + static_cast<std::size_t>(warp) * stages * 2 * kTileElems;

  // A fragments of Q (rows = query heads), rounded to T once with scale * log2e folded in, so logits
  // come out in base 2. Registers 1 and 3 of each fragment (rows 8..15) are zero.
  std::uint32_t qa[kSteps][2];
  {
    const bool live = gid < group;
    const float qs = p.scale * kLog2e;
    const float* src = p.q + (static_cast<long long>(b) * p.q_heads + h * group + (live ? gid : 0)) * D + 2 * tig;
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      const float2 lo = live ? *reinterpret_cast<const float2*>(src + kk * 16) : make_float2(0.f, 0.f);
      const float2 hi = live ? *reinterpret_cast<const float2*>(src + kk * 16 + 8) : make_float2(0.f, 0.f);
      qa[kk][0] = pack2<T>(lo.x * qs, lo.y * qs);
      qa[kk][1] = pack2<T>(hi.x * qs, hi.y * qs);
    }
  }

  // Page references of this warp's pages [32 * window, 32 * window + 32): lane j holds page j's K
  // address (bit 0 set when it points into the host pool, whose V is kv_heads blocks further on)
  // and its mask of attended tokens.
  const int n_pages = end - begin;
  const int my_pages = warp < n_pages ? (n_pages - warp + kMmaWarps - 1) / kMmaWarps : 0;
  const int my_tiles = my_pages << tpp_shift;
  unsigned long long ref_k = 0, ref_mask = 0;
  int window = -1;
  auto resolve = [&](int w) {
    window = w;
    ref_k = 0;
    ref_mask = 0;
    const int lp = w * 32 + lane;
    if (lp < my_pages) {
      const int sel = begin + warp + lp * kMmaWarps;
      const int pos = p.selected[sel_offset + sel];
      const int page = p.page_table[page_first + pos];
      const int valid = min(P, len - pos * P);
      unsigned long long mask = valid >= 64 ? ~0ull : valid <= 0 ? 0ull : ((1ull << valid) - 1ull);
      if (p.token_masks) mask &= p.token_masks[sel_offset + sel];
      const int slot = p.slot_of ? p.slot_of[static_cast<long long>(page) * p.kv_heads + h] : -1;
      if (slot >= 0) {
        ref_k = reinterpret_cast<unsigned long long>(static_cast<const T*>(p.hbm_slots) +
                                                     static_cast<long long>(slot) * 2 * head_elems);
      } else {
        int entry = -1;
        if constexpr (kStage) entry = staged_entry(p.staging, staged, page * p.kv_heads + h);
        if (entry >= 0) {  // laid out as an HBM slot
          ref_k = reinterpret_cast<unsigned long long>(static_cast<const T*>(p.staging.blocks) +
                                                       static_cast<long long>(entry) * 2 * head_elems);
        } else {
          ref_k = reinterpret_cast<unsigned long long>(static_cast<const T*>(p.host_pages) +
                                                       static_cast<long long>(page) * page_elems + h * head_elems) |
                  1ull;
        }
      }
      ref_mask = mask;
    }
  };

  unsigned long long stage_masks = 0;  // 16 bits per stage: the attended tokens of the tile it holds
  auto issue = [&](int i, int stage) {
    if (i < my_tiles) {
      const int lp = i >> tpp_shift;
      if ((lp >> 5) != window) resolve(lp >> 5);  // warp-uniform
      const unsigned long long kaddr = __shfl_sync(0xffffffffu, ref_k, lp & 31);
      const unsigned long long pmask = __shfl_sync(0xffffffffu, ref_mask, lp & 31);
      const int sub = i & ((1 << tpp_shift) - 1);
      const unsigned tile_mask = static_cast<unsigned>(pmask >> (sub * kMmaTileTokens)) & 0xffffu;
      const int rows = 32 - __clz(tile_mask);  // rows past the last attended token are zero-filled, not read
      const T* k = reinterpret_cast<const T*>(kaddr & ~1ull);
      const T* v = k + ((kaddr & 1ull) ? p.kv_heads * head_elems : head_elems);
      k += sub * kTileElems;
      v += sub * kTileElems;
      T* dst = ring + stage * 2 * kTileElems;
      // Chunk ch of row r lands at chunk ch ^ (r % 8): the 8 rows one ldmatrix reads sit in 8
      // different 16-byte bank groups, where the unswizzled 128- or 256-byte row stride put them all
      // in one.
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const T* src = half ? v : k;
#pragma unroll
        for (int j = 0; j < kCopiesPerHalf; ++j) {
          const int c = lane + 32 * j;
          const int r = c / kRowChunks;
          const int ch = c % kRowChunks;
          const bool live = r < rows;
          cp_async_16(dst + half * kTileElems + r * D + ((ch ^ (r & 7)) * 8), live ? src + r * D + ch * 8 : src,
                      live);
        }
      }
      stage_masks = (stage_masks & ~(0xffffull << (16 * stage))) |
                    (static_cast<unsigned long long>(tile_mask) << (16 * stage));
    }
    cp_async_commit();  // empty groups too, so the wait count below stays uniform
  };

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = -INFINITY, l = 0.f;  // row gid's running max (base 2) and this lane's share of the sum

  for (int t = 0; t < stages - 1; ++t) issue(t, t);
  int st = 0, st_issue = stages - 1;
  for (int i = 0; i < my_tiles; ++i) {
    cp_async_wait_upto<kMmaMaxStages - 2>(stages - 2);
    __syncwarp();  // every lane's copies of tile i are visible, and tile i - 1's stage is free
    issue(i + stages - 1, st_issue);
    st_issue = st_issue + 1 == stages ? 0 : st_issue + 1;

    const T* ks = ring + st * 2 * kTileElems;
    const T* vs = ks + kTileElems;
    const unsigned tmask = static_cast<unsigned>(stage_masks >> (16 * st)) & 0xffffu;
    st = st + 1 == stages ? 0 : st + 1;

    // S = Q K^T: one ldmatrix.x4 per 16 dims yields the B fragments of tokens 0..7 and 8..15.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int j = lane >> 3;
      const int r = ((j >> 1) << 3) + (lane & 7);
#pragma unroll
      for (int kk = 0; kk < kSteps; ++kk) {
        std::uint32_t bk[4];
        ldmatrix_x4(bk, ks + r * D + (((kk * 2 + (j & 1)) ^ (lane & 7)) * 8));
        mma_m16n8k16<T>(s[0], qa[kk][0], 0u, qa[kk][1], 0u, bk[0], bk[1]);
        mma_m16n8k16<T>(s[1], qa[kk][0], 0u, qa[kk][1], 0u, bk[2], bk[3]);
      }
    }
    // Online softmax of row gid over tokens 8 n + 2 tig + e; the 4 lanes of a row share its max.
    float mx = m;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tok = n * 8 + 2 * tig + e;
        s[n][e] = ((tmask >> tok) & 1u) ? s[n][e] : -INFINITY;
        mx = fmaxf(mx, s[n][e]);
      }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float base = mx == -INFINITY ? 0.f : mx;  // nothing attended yet: every weight is 0
    const float alpha = exp2f(m - base);
    float pr[2][2];
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        pr[n][e] = exp2f(s[n][e] - base);
        sum += pr[n][e];
      }
    l = l * alpha + sum;
    m = mx;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha;
      o[n][1] *= alpha;
    }
    // O += P V: P's accumulator layout is the A layout of the next mma (rows 8..15 zero again).
    const std::uint32_t pa0 = pack2<T>(pr[0][0], pr[0][1]);
    const std::uint32_t pa2 = pack2<T>(pr[1][0], pr[1][1]);
    {
      const int j = lane >> 3;
      const int r = ((j & 1) << 3) + (lane & 7);
#pragma unroll
      for (int nn = 0; nn < kSteps; ++nn) {
        std::uint32_t bv[4];
        ldmatrix_x4_trans(bv, vs + r * D + (((nn * 2 + (j >> 1)) ^ (lane & 7)) * 8));
        mma_m16n8k16<T>(o[2 * nn], pa0, 0u, pa2, 0u, bv[0], bv[1]);
        mma_m16n8k16<T>(o[2 * nn + 1], pa0, 0u, pa2, 0u, bv[2], bv[3]);
      }
    }
  }
  cp_async_wait<0>();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __syncthreads();  // every ring is consumed: the shared memory now holds the warps' states

  float* red = reinterpret_cast<float*>(smem);           // [warps][kMmaMaxGroup][D]
  float* ml = red + kMmaWarps * kMmaMaxGroup * D;        // [warps][kMmaMaxGroup] x (m, l)
  if (gid < group) {
    float* row = red + (warp * kMmaMaxGroup + gid) * D + 2 * tig;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) *reinterpret_cast<float2*>(row + n * 8) = make_float2(o[n][0], o[n][1]);
    if (tig == 0) {
      ml[(warp * kMmaMaxGroup + gid) * 2] = m;
      ml[(warp * kMmaMaxGroup + gid) * 2 + 1] = l;
    }
  }
  __syncthreads();
  const int rows_total = p.batch * p.q_heads;
  for (int idx = threadIdx.x; idx < group * (D / 4); idx += blockDim.x) {
    const int g = idx / (D / 4);
    const int c4 = idx % (D / 4);
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < kMmaWarps; ++w) mm = fmaxf(mm, ml[(w * kMmaMaxGroup + g) * 2]);
    float ll = 0.f;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (mm != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kMmaWarps; ++w) {
        const float wgt = exp2f(ml[(w * kMmaMaxGroup + g) * 2] - mm);  // 0 for a warp that saw nothing
        ll += wgt * ml[(w * kMmaMaxGroup + g) * 2 + 1];
        const float4 v = reinterpret_cast<const float4*>(red + (w * kMmaMaxGroup + g) * D)[c4];
        acc.x = fmaf(wgt, v.x, acc.x);
        acc.y = fmaf(wgt, v.y, acc.y);
        acc.z = fmaf(wgt, v.z, acc.z);
        acc.w = fmaf(wgt, v.w, acc.w);
      }
    }
    const float inv = ll > 0.f ? 1.f / ll : 0.f;
    const long long out_row =
        static_cast<long long>(split) * rows_total + static_cast<long long>(b) * p.q_heads + h * group + g;
    reinterpret_cast<float4*>(p.partial_out + out_row * D)[c4] =
        make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    if (c4 == 0) p.partial_lse[out_row] = ll > 0.f ? (mm + log2f(ll)) * kLn2 : -INFINITY;
  }
  if constexpr (kMerge) merge_segment_if_last<D>(p, segment);
}

}  // namespace hattn::cuda::detail
