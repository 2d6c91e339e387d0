#pragma once
// One (page, KV head) item's scores from its summary rows, for all query heads of its GQA group:
// the Quest bound (max over the heads) and the log-mean-exp of the heads' mean-key logits. Shared by
// the scoring kernel and the fused two-level kernel, which stage q and load the rows alike: eight
// lanes per item, each holding D / 8 dimensions of the min, max and mean rows as raw 16-byte loads
// (SummaryLanes::chunk says which), and q in shared memory as float4s ordered [q_head][quad][lane].
#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

#include "vec.cuh"

namespace hattn::cuda::detail {

// Eight lanes per item: its summary rows are read as 16-byte vectors by lanes that then reduce with
// three shuffles, and a warp scores four items per instruction (one item per warp would cost five
// shuffles per value and dominate the kernel).
inline constexpr int kLanesPerItem = 8;

template <class T, int D>
struct SummaryLanes {
  static constexpr int kElems = kVec16<T>;          // elements per 16-byte load
  static constexpr int kDimsPerLane = D / kLanesPerItem;  // 8, 16 or 32
  static constexpr int kLoads = kDimsPerLane / kElems;    // 16-byte loads per lane and row
  static constexpr int kQuads = kDimsPerLane / 4;         // float4s of q per lane and head

  /// The 16-byte chunk of a row that `lane` reads in its load l; its elements are the lane's
  /// elements l * kElems .. l * kElems + kElems - 1. Interleaved so that each load of an item's eight
  /// lanes reads 128 contiguous bytes. With each lane's dims contiguous instead, a lane's loads were
  /// 32 bytes apart for bf16 at D = 128, and ncu counted 49% of the L2 sectors excess (H100,
  /// 2026-12-07); the kernel's time did not change with this layout (35.4 and 35.8 us alone, on two
  /// machines of the pool): the L1 had been serving the other half of each sector.
  static __device__ __forceinline__ int chunk(int l, int lane) { return l * kLanesPerItem + lane; }
};

// Summary rows of T as fp32: half-precision rows of fine summaries, fp32 rows of group summaries.
template <class T>
__device__ __forceinline__ void unpack_row(const uint4& raw, float (&out)[kVec16<T>]) {
  if constexpr (std::is_same_v<T, float>) {
    out[0] = __uint_as_float(raw.x), out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z), out[3] = __uint_as_float(raw.w);
  } else {
    unpack8<T>(raw, out);
  }
}

/// Stages q of `heads` query heads (from q_heads_base, [heads][D] fp32) into q_smem in the
/// [head][quad][lane] order score_item reads, each lane's quads being the dims of its chunks
/// (SummaryLanes::chunk). All threads of the block call it; a barrier must follow before score_item.
template <class T, int D>
__device__ __forceinline__ void stage_q(const float* q_heads_base, int heads, float4* q_smem) {
  using L = SummaryLanes<T, D>;
  constexpr int kQuadsPerChunk = L::kElems / 4;
  const float4* q = reinterpret_cast<const float4*>(q_heads_base);
  // In the order of q_smem, so that consecutive threads store consecutive float4s.
  for (int idx = threadIdx.x; idx < heads * (D / 4); idx += blockDim.x) {
    const int lane = idx % kLanesPerItem, j = idx / kLanesPerItem % L::kQuads, head = idx / kLanesPerItem / L::kQuads;
    const int dim_quad = L::chunk(j / kQuadsPerChunk, lane) * kQuadsPerChunk + j % kQuadsPerChunk;
    q_smem[idx] = q[head * (D / 4) + dim_quad];
  }
}

/// Loads one item's summary rows (`rows`: its [3][D] elements of T, min, max, mean) into `raw`, this
/// lane's chunks of each: the min and max rows if want_upper, the mean row if want_estimate (a row
/// not loaded keeps what `raw` held).
template <class T, int D>
__device__ __forceinline__ void load_summary_rows(const T* rows, int lane, bool want_upper, bool want_estimate,
                                                  uint4 (&raw)[3][SummaryLanes<T, D>::kLoads]) {
  using L = SummaryLanes<T, D>;
  const uint4* row = reinterpret_cast<const uint4*>(rows);
#pragma unroll
  for (int l = 0; l < L::kLoads; ++l) {
    const int c = L::chunk(l, lane);
    if (want_upper) {
      raw[0][l] = row[c];
      raw[1][l] = row[D / L::kElems + c];
    }
    if (want_estimate) raw[2][l] = row[2 * D / L::kElems + c];
  }
}

/// The scores of one item, every lane of its eight calling together (the shuffles span them):
/// `raw` the lane's min, max and mean rows (a row not loaded is unused), `q_group` the staged q of
/// the item's first query head. best_upper: max over the group of scale x sum(max(q kmin, q kmax));
/// est_max, est_sum: the group's mean-key logits scale x q . kmean as max and sum of exp(logit - max),
/// for item_estimate.
template <class T, int D>
__device__ __forceinline__ void score_item(const uint4 (&raw)[3][SummaryLanes<T, D>::kLoads], const float4* q_group,
                                           int group, float scale, bool want_estimate, float& best_upper,
                                           float& est_max, float& est_sum) {
  using L = SummaryLanes<T, D>;
  const int lane = threadIdx.x % kLanesPerItem;
  float lo[L::kDimsPerLane], hi[L::kDimsPerLane], mean[L::kDimsPerLane];
#pragma unroll
  for (int l = 0; l < L::kLoads; ++l) {
    float f[L::kElems];
    unpack_row<T>(raw[0][l], f);
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) lo[l * L::kElems + e] = f[e];
    unpack_row<T>(raw[1][l], f);
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) hi[l * L::kElems + e] = f[e];
    unpack_row<T>(raw[2][l], f);
#pragma unroll
    for (int e = 0; e < L::kElems; ++e) mean[l * L::kElems + e] = f[e];
  }
  constexpr int kHeadsAtOnce = 4;
  best_upper = -INFINITY;
  est_max = -INFINITY;
  est_sum = 0.0f;
  // Four heads of the group at a time: four independent FMA and shuffle chains per lane (one head
  // at a time left the warps waiting on each head's shuffles).
  for (int g0 = 0; g0 < group; g0 += kHeadsAtOnce) {
    float up[kHeadsAtOnce], dot[kHeadsAtOnce];
#pragma unroll
    for (int k = 0; k < kHeadsAtOnce; ++k) {
      const int g = min(g0 + k, group - 1);  // past the group: a repeat of its last head, not used
      const float4* q = q_group + g * L::kQuads * kLanesPerItem + lane;
      up[k] = 0.0f;
      dot[k] = 0.0f;
#pragma unroll
      for (int j = 0; j < L::kQuads; ++j) {
        const float4 q4 = q[j * kLanesPerItem];
        const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int e = 4 * j + c;
          // max(q kmin, q kmax) = (q (kmax + kmin) + |q| (kmax - kmin)) / 2 for kmax >= kmin: two
          // FMAs (|q| is a free operand modifier) where the select by the sign of q took a compare,
          // a select and an FMA; the compiler forms the sum and difference once for all the heads.
          // Rounding moves the bound by about an fp32 ulp, as the summing order does. An infinite
          // summary element (keys that overflowed fp16) makes the sum NaN, not +-inf: see below.
          up[k] = fmaf(qv[c], hi[e] + lo[e], up[k]);
          up[k] = fmaf(fabsf(qv[c]), hi[e] - lo[e], up[k]);
          if (want_estimate) dot[k] = fmaf(qv[c], mean[e], dot[k]);
        }
      }
    }
#pragma unroll
    for (int off = kLanesPerItem / 2; off > 0; off /= 2)
#pragma unroll
      for (int k = 0; k < kHeadsAtOnce; ++k) {
        up[k] += __shfl_xor_sync(0xffffffffu, up[k], off);
        if (want_estimate) dot[k] += __shfl_xor_sync(0xffffffffu, dot[k], off);
      }
#pragma unroll
    for (int k = 0; k < kHeadsAtOnce; ++k) {
      if (g0 + k >= group) break;
      // NaN comes only from non-finite summary rows; +inf keeps it an upper bound (the select-by-sign
      // form gave +inf or a finite bound there), where fmaxf would drop the head.
      const float bound = 0.5f * scale * up[k];
      best_upper = fmaxf(best_upper, bound == bound ? bound : INFINITY);
      // log-mean-exp over the group, kept stable with a running max.
      const float x = scale * dot[k];
      if (x > est_max) {
        est_sum = est_sum * __expf(est_max - x) + 1.0f;
        est_max = x;
      } else {
        est_sum += __expf(x - est_max);
      }
    }
  }
}

/// Log estimated mass of a page of `tokens` tokens: log(tokens) plus the log-mean-exp over the group.
__device__ __forceinline__ float item_estimate(int tokens, float est_max, float est_sum, int group) {
  return logf(static_cast<float>(tokens)) + est_max + logf(est_sum / group);
}

}  // namespace hattn::cuda::detail
