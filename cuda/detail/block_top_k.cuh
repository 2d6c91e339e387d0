#pragma once
// Top-k of one segment by one block, over entries staged in shared memory: the selection rule of
// launch_select_pages (ties to the lower entry, NaN lowest, forced and excluded positions) for
// segments of at most kBlockTopKMaxEntries entries. The compact select kernel runs it per segment;
// the fused two-level kernel runs it twice (the groups to keep, then the pages among their
// candidates) without a launch between.
//
// A radix select over the 32-bit order keys in 8-bit passes. The passes start below the bits every
// ranked key shares (a segment's scores share their sign and most exponent bits: starting at the top
// put them all in one or two bins, whose shared atomics serialise) and stop once the bin holding the
// cut is taken whole. Counting passes visit entries strided by the block (conflict-free shared
// reads); the write gives each thread consecutive entries, so thread order is entry order and one
// block scan places every taken position.
//
// Why the barrier count matters: at the sizes it runs on (512 groups, ~1.7K candidates at 128K
// tokens) a selection is a chain of barriers with little work between, on the step's critical path.
// Each radix pass takes two (the next pass's histogram is cleared during this one's counting), and
// the write one scan of two counts packed in an int, where it took three and two scans before.
#include <cuda_runtime.h>

#include <cstdint>

#include "block_scan.cuh"
#include "vec.cuh"

namespace hattn::cuda::detail {

inline constexpr int kBlockTopKMaxEntries = 16384;  // ranked and forced counts share one int, 16 bits each
inline constexpr int kTopKRadixBins = 256;
inline constexpr int kTopKRadixBits = 8;

/// Which positions take part and how many entries are taken. An entry's position comes from the
/// staged `at` array (-1: padding, never taken).
struct TopKRule {
  int budget = 0;       ///< entries taken, the forced ones included (at least the forced ones)
  int sink_end = 0;     ///< positions [0, sink_end) are forced
  int local_begin = 0;  ///< positions >= local_begin are forced
  int exclude_begin = 0, exclude_end = 0;  ///< positions in [begin, end) never taken (forced or not)

  __device__ bool allowed(int q) const { return q >= 0 && (q < exclude_begin || q >= exclude_end); }
  __device__ bool forced(int q) const { return allowed(q) && (q < sink_end || q >= local_begin); }
  __device__ bool ranked(int q) const { return allowed(q) && q >= sink_end && q < local_begin; }
};

template <int T>
struct TopKShared {
  int hist[2][kTopKRadixBins];  // passes alternate: one counts while the other is cleared
  int warp_sums[T / kWarp];
  int count_partial[T / kWarp];
  std::uint32_t lo_partial[T / kWarp], hi_partial[T / kWarp];
  std::uint32_t cut_key;
  int cut_remaining, cut_whole;
};

/// Selects among entries [0, n) of `key` (order keys of the rank scores) and `at` (their positions),
/// both in shared memory and complete before the call (the caller's barrier). Writes the positions
/// taken, ascending by entry, to out[0 ..) (global or shared) and returns how many, to every thread.
/// All T threads of the block call it; n <= kBlockTopKMaxEntries and n <= 32 T. It returns without
/// a barrier: sync before reading a shared `out` or rewriting key and at.
template <int T>
__device__ int block_top_k(const std::uint32_t* key, const std::int32_t* at, int n, const TopKRule& rule,
                           TopKShared<T>& sh, std::int32_t* out) {
  const int tid = static_cast<int>(threadIdx.x);
  // Counts of ranked and forced entries (packed: ranked low, forced high) and the ranked keys' range.
  int counts = 0;
  std::uint32_t lo = 0xffffffffu, hi = 0;
  for (int i = tid; i < n; i += T) {
    const int q = at[i];
    if (rule.ranked(q)) {
      ++counts;
      lo = min(lo, key[i]);
      hi = max(hi, key[i]);
    } else if (rule.forced(q)) {
      counts += 1 << 16;
    }
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    counts += __shfl_xor_sync(0xffffffffu, counts, off);
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  if (tid % kWarp == 0) {
    sh.count_partial[tid / kWarp] = counts;
    sh.lo_partial[tid / kWarp] = lo;
    sh.hi_partial[tid / kWarp] = hi;
  }
  for (int d = tid; d < kTopKRadixBins; d += T) sh.hist[0][d] = 0;
  __syncthreads();
  counts = 0;
  lo = 0xffffffffu;
  hi = 0;
#pragma unroll
  for (int w = 0; w < T / kWarp; ++w) counts += sh.count_partial[w], lo = min(lo, sh.lo_partial[w]), hi = max(hi, sh.hi_partial[w]);
  const int n_ranked = counts & 0xffff, n_forced = counts >> 16;
  const int take = max(rule.budget - n_forced, 0);

  // The cut: ranked entries with a key above `cut` are taken, and the first `equal` (lowest
  // entries) of those with exactly `cut`.
  std::uint32_t cut = 0xffffffffu;
  int equal = 0;
  if (take >= n_ranked) {
    cut = 0;
    equal = n_ranked;
  } else if (take > 0 && lo == hi) {  // every ranked key equal: the lowest `take` entries
    cut = lo;
    equal = take;
  } else if (take > 0) {
    // Bits above the highest one in which lo and hi differ are the same in every ranked key.
    const int top = 31 - __clz(lo ^ hi);
    std::uint32_t mask = top == 31 ? 0u : ~((2u << top) - 1u);
    std::uint32_t prefix = hi & mask;
    int remaining = take;
    for (int shift = max(top - (kTopKRadixBits - 1), 0), pass = 0;; shift = max(shift - kTopKRadixBits, 0), ++pass) {
      int* hist = sh.hist[pass & 1];
      for (int i = tid; i < n; i += T)
        if ((key[i] & mask) == prefix && rule.ranked(at[i]))
          atomicAdd(&hist[(key[i] >> shift) & (kTopKRadixBins - 1)], 1);
      // Cleared for the next pass: its last reads (the previous pass's scan) are behind that pass's
      // closing barrier.
      for (int d = tid; d < kTopKRadixBins; d += T) sh.hist[(pass + 1) & 1][d] = 0;
      __syncthreads();
      if (tid < kWarp) {
        // Lane l owns digits 255 - 8l .. 248 - 8l, visited from the top.
        constexpr int kPerLane = kTopKRadixBins / kWarp;
        int c[kPerLane], lane_count = 0;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          c[k] = hist[kTopKRadixBins - 1 - tid * kPerLane - k];
          lane_count += c[k];
        }
        int above = warp_inclusive_sum(lane_count) - lane_count;
        int found = -1, found_above = 0, found_count = 0;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          if (found < 0 && above < remaining && remaining <= above + c[k]) {
            found = kTopKRadixBins - 1 - tid * kPerLane - k;
            found_above = above;
            found_count = c[k];
          }
          above += c[k];
        }
        if (found >= 0) {  // exactly one lane finds it: the counts are exact integers
          sh.cut_key = (prefix & ~(static_cast<std::uint32_t>(kTopKRadixBins - 1) << shift)) |
                       static_cast<std::uint32_t>(found) << shift;
          sh.cut_remaining = remaining - found_above;
          sh.cut_whole = sh.cut_remaining == found_count;  // the whole bin is taken
        }
      }
      __syncthreads();
      prefix = sh.cut_key;
      remaining = sh.cut_remaining;
      const bool whole = sh.cut_whole;
      mask |= static_cast<std::uint32_t>(kTopKRadixBins - 1) << shift;
      if (whole || shift == 0) {
        cut = prefix;
        // A bin taken whole: every ranked key with these high bits is taken, so the cut is their
        // lowest possible key and every key equal to it is taken.
        equal = whole ? n_ranked : remaining;
        break;
      }
    }
  }

  // Forced and taken entries' positions in ascending entry order: thread t owns entries
  // [t e, t e + e). Bit j of the masks is entry t e + j.
  const int e = (n + T - 1) / T;
  const int first = tid * e;
  unsigned is_equal = 0, taken = 0;
  for (int j = 0; j < e; ++j) {
    const int i = first + j;
    if (i >= n) break;
    const int q = at[i];
    if (rule.forced(q)) {
      taken |= 1u << j;
    } else if (rule.ranked(q)) {
      const std::uint32_t k = key[i];
      if (k > cut) taken |= 1u << j;
      else if (k == cut) is_equal |= 1u << j;
    }
  }
  // One scan of both counts (taken low, equal high; each at most n <= 2^14). Equal entries are taken
  // lowest first, so min(equal before this thread, equal) of them are taken below it.
  const int lane = tid % kWarp, warp = tid / kWarp;
  const int packed = __popc(taken) | __popc(is_equal) << 16;
  const int incl = warp_inclusive_sum(packed);
  if (lane == kWarp - 1) sh.warp_sums[warp] = incl;
  __syncthreads();
  int below = incl - packed, sum = 0;
#pragma unroll
  for (int w = 0; w < T / kWarp; ++w) {
    const int c = sh.warp_sums[w];
    below += w < warp ? c : 0;
    sum += c;
  }
  int equal_rank = below >> 16;
  int slot = (below & 0xffff) + min(equal_rank, equal);
  for (int j = 0; j < e; ++j) {
    const bool take_equal = (is_equal >> j & 1u) && equal_rank++ < equal;
    if ((taken >> j & 1u) || take_equal) out[slot++] = at[first + j];
  }
  // No closing barrier: a next call's first writes to this scratch (counts, hist[0]) come before
  // barriers its later writes (warp_sums) wait behind. A caller that reuses key, at or a shared
  // `out` syncs itself (the fused kernel does before reading the kept groups).
  return (sum & 0xffff) + min(sum >> 16, equal);
}

}  // namespace hattn::cuda::detail
