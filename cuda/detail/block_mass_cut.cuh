#pragma once
// How many ranked entries the mass rule takes, for one segment by one block over entries staged in
// shared memory: the length of the shortest prefix of the rank order (order key descending, entry
// ascending) whose summed mass reaches a target. With that count the selection is the top-k of the
// same order (block_top_k), so the compact mass kernel needs no write path of its own.
//
// A radix descent over the order keys in 8-bit digits, as block_top_k's, with each digit's mass
// beside its count: from the highest digit down, the digit where the running mass passes what is
// left holds the cut. The descent stops early once the crossing digit holds a single entry, and at
// the last digit resolves entries with equal keys in entry order (their masses may differ).
//
// Masses are fixed point (kMassOne = 2^31 for the largest page), each digit's sum kept as two 32-bit
// halves: a float atomicAdd on shared memory is a compare-and-swap loop on sm_90 (ATOMS.CAST.SPIN),
// and a segment's keys share their top bits, so the first digits collect thousands of entries each
// and the loops serialise (46 us for 8 x 8192 pages on an H100); 32-bit integer adds are native.
// The sums are exact and independent of order, 2^-31 of the largest page's mass per entry.
#include <cuda_runtime.h>

#include <cstdint>

#include "block_scan.cuh"
#include "block_top_k.cuh"

namespace hattn::cuda::detail {

/// The fixed-point mass of a page whose share of the largest page's mass is 1.
inline constexpr float kMassOne = 2147483648.0f;

struct MassCutShared {
  int count[kTopKRadixBins];
  unsigned high[kTopKRadixBins];  // sums of each entry's mass >> 16 (at most 2^15 each)
  unsigned low[kTopKRadixBins];   // sums of each entry's mass & 0xffff
  unsigned long long scratch[kWarp + 1];
  std::uint32_t prefix;
  unsigned long long remaining;
  int above;        // ranked entries above the current prefix's digit range
  int found_count;  // entries in the crossing digit; -1: no digit crossed, take them all
};

/// Ranked entries (rule.ranked(at[i])) of [0, n) taken by the mass rule: the shortest prefix of the
/// rank order whose fixed-point masses w[] (at most kMassOne each) sum to at least `target` (> 0),
/// or every ranked entry where their sum stays below it. lo / hi: the lowest and highest ranked
/// keys, and n_ranked > 0 their count. key, at, w in shared memory, complete before the call; all T
/// threads call it and get the result.
template <int T>
__device__ int block_mass_take(const std::uint32_t* key, const std::int32_t* at, const std::uint32_t* w, int n,
                               const TopKRule& rule, unsigned long long target, std::uint32_t lo, std::uint32_t hi,
                               int n_ranked, MassCutShared& sh) {
  const int tid = static_cast<int>(threadIdx.x);
  std::uint32_t prefix = hi;
  std::uint32_t mask = 0xffffffffu;
  unsigned long long remaining = target;
  int above = 0;
  if (lo != hi) {
    // Bits above the highest one in which lo and hi differ are the same in every ranked key.
    const int top = 31 - __clz(lo ^ hi);
    mask = top == 31 ? 0u : ~((2u << top) - 1u);
    prefix = hi & mask;
    for (int shift = max(top - (kTopKRadixBits - 1), 0);; shift = max(shift - kTopKRadixBits, 0)) {
      for (int d = tid; d < kTopKRadixBins; d += T) {
        sh.count[d] = 0;
        sh.high[d] = 0;
        sh.low[d] = 0;
      }
      __syncthreads();
      for (int i = tid; i < n; i += T)
        if ((key[i] & mask) == prefix && rule.ranked(at[i])) {
          const int d = (key[i] >> shift) & (kTopKRadixBins - 1);
          atomicAdd(&sh.count[d], 1);
          atomicAdd(&sh.high[d], w[i] >> 16);
          atomicAdd(&sh.low[d], w[i] & 0xffffu);
        }
      __syncthreads();
      if (tid < kWarp) {
        // Lane l owns digits 255 - 8l .. 248 - 8l, visited from the top.
        constexpr int kPerLane = kTopKRadixBins / kWarp;
        int c[kPerLane], lane_count = 0;
        unsigned long long m[kPerLane], lane_mass = 0;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          const int d = kTopKRadixBins - 1 - tid * kPerLane - k;
          c[k] = sh.count[d];
          m[k] = (static_cast<unsigned long long>(sh.high[d]) << 16) + sh.low[d];
          lane_count += c[k];
          lane_mass += m[k];
        }
        int count_above = warp_inclusive_sum(lane_count) - lane_count;
        unsigned long long mass_above = warp_inclusive_sum(lane_mass) - lane_mass;
        const int all = __shfl_sync(0xffffffffu, count_above + lane_count, kWarp - 1);
        int found = -1, found_above = 0, found_count = 0;
        unsigned long long found_mass_above = 0;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
          if (found < 0 && c[k] > 0 && mass_above < remaining && remaining <= mass_above + m[k]) {
            found = kTopKRadixBins - 1 - tid * kPerLane - k;
            found_above = count_above;
            found_count = c[k];
            found_mass_above = mass_above;
          }
          count_above += c[k];
          mass_above += m[k];
        }
        // Exact sums: at most one digit crosses.
        const unsigned hits = __ballot_sync(0xffffffffu, found >= 0);
        if (hits == 0 && tid == 0) {
          sh.prefix = prefix;
          sh.remaining = remaining;
          sh.above = above + all;
          sh.found_count = -1;
        } else if (hits != 0 && tid == __ffs(hits) - 1) {
          sh.prefix = (prefix & ~(static_cast<std::uint32_t>(kTopKRadixBins - 1) << shift)) |
                      static_cast<std::uint32_t>(found) << shift;
          sh.remaining = remaining - found_mass_above;
          sh.above = above + found_above;
          sh.found_count = found_count;
        }
      }
      __syncthreads();
      const int found_count = sh.found_count;
      above = sh.above;
      prefix = sh.prefix;
      remaining = sh.remaining;
      __syncthreads();  // every thread has read sh before the next digit's zeroing
      if (found_count < 0) return above;
      if (found_count == 1) return above + 1;  // the crossing digit is one entry: it is taken
      mask |= static_cast<std::uint32_t>(kTopKRadixBins - 1) << shift;
      if (shift == 0) break;
    }
  }
  // Entries whose whole key equals `prefix`, in entry order: each is taken while the mass before it
  // falls short of what is left. Thread t owns entries [t e, t e + e).
  const int e = (n + T - 1) / T;
  const int first = tid * e;
  unsigned long long mine = 0;
  for (int j = 0; j < e && first + j < n; ++j)
    if (key[first + j] == prefix && rule.ranked(at[first + j])) mine += w[first + j];
  unsigned long long total = 0;
  unsigned long long before = block_exclusive_sum(mine, sh.scratch, total);
  int taken = 0;
  for (int j = 0; j < e && first + j < n; ++j)
    if (key[first + j] == prefix && rule.ranked(at[first + j])) {
      taken += before < remaining;
      before += w[first + j];
    }
  unsigned long long taken_total = 0;
  block_exclusive_sum(static_cast<unsigned long long>(taken), sh.scratch, taken_total);
  const int result = above + static_cast<int>(taken_total);
  return result < n_ranked ? result : n_ranked;
}

}  // namespace hattn::cuda::detail
