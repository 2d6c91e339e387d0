// Page selection on the GPU without host synchronisation (DESIGN.md step 2), one block per
// (request, KV head) segment:
//  1. the segment's scores are staged in shared memory (segments up to kSmemPages pages; longer
//     ones are read from global memory in the same passes);
//  2. one histogram over kBins equal-width bins of [min, max] of the scores finds the bin holding the
//     cut (the k-th highest score, or where the running estimated mass reaches the target);
//  3. the few positions in that bin are ranked against each other exactly; a bin with more than
//     kMaxCandidates positions (ties, or scores bunched far more than any score distribution we see)
//     is resolved by a radix descent over the order-preserving bits of its scores instead;
//  4. the selected positions are written in ascending order with two block-wide scans per chunk.
// Equal-width bins rather than radix digits: scores of a segment share a few exponents, so the top
// digits of their bits fall into a handful of bins and the shared atomics serialise (the radix-only
// version took 51 us for 8 x 8192 pages on an H100, most of it in its first two passes).
// Memory is O(pages), never O(tokens), and nothing is allocated.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "detail/block_scan.cuh"
#include "detail/block_top_k.cuh"
#include "detail/launch_check.cuh"
#include "detail/launch_checks.hpp"
#include "detail/pdl.cuh"
#include "detail/vec.cuh"
#include "hattn/kernels/cuda_select.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / detail::kWarp;
// Consecutive positions per thread in a chunk: eight loads in flight per thread when the scores are
// read from global memory, and one pair of scans per kChunk positions when writing.
constexpr int kPerThread = 8;
constexpr int kChunk = kThreads * kPerThread;
// 128K tokens of 16-token pages; rank scores and masses of such a segment take 64 KB.
constexpr int kSmemPages = 8192;
constexpr int kBins = 4096;
constexpr int kBinsPerThread = kBins / kThreads;
// Normal scores put ~2 positions of 8192 in the bin at the 95th percentile; 1M-token segments ~13.
constexpr int kMaxCandidates = kThreads;
constexpr int kRadixBins = 256;
constexpr int kRadixBits = 8;

/// exp(log_mass - max), the page's estimated share of the softmax before normalisation; NaN counts
/// as no mass.
__device__ __forceinline__ float page_mass(float log_mass, float max_log_mass) {
  return log_mass == log_mass ? __expf(log_mass - max_log_mass) : 0.0f;
}

/// Equal-width bins over [lo, hi]; monotone non-decreasing in the score (each step rounds
/// monotonically), so a bin holds a contiguous range of the order. NaN, -inf and lo go to bin 0.
struct Binning {
  float lo, scale;
  __device__ int operator()(float v) const {
    if (!(v > lo) || scale == 0.0f) return 0;
    return static_cast<int>(fminf((v - lo) * scale, static_cast<float>(kBins - 1)));
  }
};

/// Which positions of a segment take part, in which role, and their rank scores and masses.
struct Segment {
  const float* rank;      // shared-memory copy or global
  const float* mass;      // exp(log_mass - max) in shared memory, or nullptr: from log_mass
  const float* log_mass;  // global; nullptr in top-k mode
  float max_log_mass;
  int n;
  int exclude_begin, exclude_end;
  int sink_end;     // pages [0, sink_end) are forced
  int local_begin;  // pages [local_begin, pages) are forced
  Binning bin;
  const std::int32_t* pos;  // candidate mode: entry -> page position (-1: padding); nullptr: the identity

  __device__ int page(int i) const { return pos ? pos[i] : i; }
  __device__ bool allowed(int i) const {
    const int q = page(i);
    return q >= 0 && (q < exclude_begin || q >= exclude_end);
  }
  __device__ bool forced(int i) const {
    const int q = page(i);
    return q >= 0 && (q < sink_end || q >= local_begin);
  }
  // Forced positions are selected anyway: only the others compete for the budget.
  __device__ bool ranked(int i) const { return allowed(i) && !forced(i); }
  __device__ float mass_of(int i) const { return mass ? mass[i] : page_mass(log_mass[i], max_log_mass); }
};

/// Where segment s = (request b, KV head) lives: its pages, its entries (the pages, or the candidates
/// in candidate mode) and their offset, and the offset of its output at the page segment.
struct SegmentPlace {
  int s, b, pages, n;
  bool by_candidate;
  long long page_offset, offset;
  __device__ SegmentPlace(const SelectParams& p, int segment) : s(segment), b(segment / p.kv_heads) {
    const int first = p.page_indptr[b];
    pages = p.page_indptr[b + 1] - first;
    page_offset = static_cast<long long>(first) * p.kv_heads + static_cast<long long>(segment % p.kv_heads) * pages;
    by_candidate = p.position_of != nullptr;
    n = by_candidate ? p.candidates : pages;
    offset = by_candidate ? static_cast<long long>(segment) * p.candidates : page_offset;
  }
};

/// The selection's cut: ranked positions with a key above `key` are taken, and the first
/// `take_equal` (lowest positions) of those with exactly `key`.
struct Cut {
  std::uint32_t key;
  int take_equal;
};

struct SelectShared {
  int count[kBins];
  float mass[kBins];
  int cand[kMaxCandidates];
  int radix_count[kRadixBins];
  float radix_mass[kRadixBins];
  int iscratch[detail::kWarp + 1];
  float fscratch[detail::kWarp + 1];
  float fred[kWarps][4];
  int ired[kWarps][2];
  // Result of a bin search: the bin, ranked positions in bins above it, what is left to reach.
  int bin, above, remaining, ncand, taken;
  float remaining_mass;
  // Radix descent state.
  std::uint32_t prefix;
  int radix_above;
  Cut cut;
};

// One reduction round for several values (two barriers instead of two per value).
__device__ void block_reduce_stats(SelectShared& sh, float& lo, float& hi, float& top, int& ranked, int& forced) {
  const int lane = threadIdx.x % detail::kWarp, warp = threadIdx.x / detail::kWarp;
  auto warp_fold = [&] {
#pragma unroll
    for (int off = detail::kWarp / 2; off > 0; off /= 2) {
      lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
      top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, off));
      ranked += __shfl_xor_sync(0xffffffffu, ranked, off);
      forced += __shfl_xor_sync(0xffffffffu, forced, off);
    }
  };
  warp_fold();
  if (lane == 0) {
    sh.fred[warp][0] = lo;
    sh.fred[warp][1] = hi;
    sh.fred[warp][2] = top;
    sh.ired[warp][0] = ranked;
    sh.ired[warp][1] = forced;
  }
  __syncthreads();
  // Warp 0 folds the warps' values (every thread reading all of them cost 160 shared loads each).
  if (warp == 0) {
    lo = sh.fred[lane][0], hi = sh.fred[lane][1], top = sh.fred[lane][2];
    ranked = sh.ired[lane][0], forced = sh.ired[lane][1];
    warp_fold();
    __syncwarp();
    if (lane == 0) {
      sh.fred[0][0] = lo, sh.fred[0][1] = hi, sh.fred[0][2] = top;
      sh.ired[0][0] = ranked, sh.ired[0][1] = forced;
    }
  }
  __syncthreads();
  lo = sh.fred[0][0], hi = sh.fred[0][1], top = sh.fred[0][2];
  ranked = sh.ired[0][0], forced = sh.ired[0][1];
  __syncthreads();
}

__device__ float block_sum(float v, float* scratch) {
  return detail::block_reduce(v, [](float a, float b) { return a + b; }, scratch);
}
__device__ int block_sum(int v, int* scratch) {
  return detail::block_reduce(v, [](int a, int b) { return a + b; }, scratch);
}

// Histogram of the ranked positions over the equal-width bins: counts and, in mass mode, masses.
__device__ void build_histogram(const Segment& seg, SelectShared& sh, bool by_mass) {
  for (int i = threadIdx.x; i < kBins; i += kThreads) {
    sh.count[i] = 0;
    sh.mass[i] = 0.0f;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < seg.n; i += kThreads) {
    if (!seg.ranked(i)) continue;
    const int b = seg.bin(seg.rank[i]);
    atomicAdd(&sh.count[b], 1);
    if (by_mass) atomicAdd(&sh.mass[b], seg.mass_of(i));
  }
  __syncthreads();
}

// Finds, from the highest bin down, the bin where the running count passes `remaining` (count mode)
// or the running mass passes `remaining_mass` (mass mode). Sets sh.bin (-1 when rounding left the
// mass target above the histogram's sum), sh.above and sh.remaining / sh.remaining_mass.
__device__ void find_bin(SelectShared& sh, bool by_mass, int remaining, float remaining_mass) {
  if (threadIdx.x == 0) sh.bin = -1;
  // Thread t owns bins kBins-1-4t .. kBins-4-4t, so thread order is descending bin order.
  const int top_bin = kBins - 1 - static_cast<int>(threadIdx.x) * kBinsPerThread;
  int c[kBinsPerThread];
  float m[kBinsPerThread];
  int my_count = 0;
  float my_mass = 0.0f;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    c[j] = sh.count[top_bin - j];
    m[j] = sh.mass[top_bin - j];
    my_count += c[j];
    my_mass += m[j];
  }
  int count_total;
  float mass_total;
  int above = detail::block_exclusive_sum(my_count, sh.iscratch, count_total);
  float above_mass = by_mass ? detail::block_exclusive_sum(my_mass, sh.fscratch, mass_total) : 0.0f;
  int hit_bin = -1, hit_above = 0;
  float hit_above_mass = 0.0f;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const bool hit = by_mass ? (c[j] > 0 && above_mass < remaining_mass && remaining_mass <= above_mass + m[j])
                             : (above < remaining && remaining <= above + c[j]);
    if (hit && hit_bin < 0) {
      hit_bin = top_bin - j;
      hit_above = above;
      hit_above_mass = above_mass;
    }
    above += c[j];
    above_mass += m[j];
  }
  // Mass prefixes summed in different orders by different threads may let two bins qualify by a
  // rounding; the highest wins.
  if (hit_bin >= 0) atomicMax(&sh.bin, hit_bin);
  __syncthreads();
  if (hit_bin >= 0 && hit_bin == sh.bin) {
    sh.above = hit_above;
    sh.remaining = remaining - hit_above;
    sh.remaining_mass = remaining_mass - hit_above_mass;
    sh.ncand = 0;
  }
  __syncthreads();
}

// Radix descent over the order keys of the ranked positions inside equal-width bin `bin`, by count
// or by mass; the slow path for a bin too full to rank pairwise. Returns the cut inside the bin.
template <bool kByMass>
__device__ Cut radix_descent(const Segment& seg, SelectShared& sh, int bin, int m, float target) {
  __syncthreads();  // every thread has read the bin search's results
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.remaining = m;
    sh.remaining_mass = target;
    sh.radix_above = 0;
  }
  const int lane = threadIdx.x % detail::kWarp;
  std::uint32_t mask = 0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kRadixBins; i += kThreads) {
      sh.radix_count[i] = 0;
      sh.radix_mass[i] = 0.0f;
    }
    __syncthreads();
    const std::uint32_t prefix = sh.prefix;
    for (int i = threadIdx.x; i < seg.n; i += kThreads) {
      if (!seg.ranked(i)) continue;
      const float s = seg.rank[i];
      const std::uint32_t k = detail::order_key(s);
      if ((k & mask) != prefix || seg.bin(s) != bin) continue;
      const int d = (k >> shift) & (kRadixBins - 1);
      atomicAdd(&sh.radix_count[d], 1);
      if (kByMass) atomicAdd(&sh.radix_mass[d], seg.mass_of(i));
    }
    __syncthreads();
    if (threadIdx.x < detail::kWarp) {
      // Warp 0: lane l owns digits 255-8l .. 248-8l, visited from the top.
      constexpr int kPerLane = kRadixBins / detail::kWarp;
      int lane_count = 0;
      float lane_mass = 0.0f;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        lane_count += sh.radix_count[kRadixBins - 1 - lane * kPerLane - j];
        lane_mass += sh.radix_mass[kRadixBins - 1 - lane * kPerLane - j];
      }
      int above = detail::warp_inclusive_sum(lane_count) - lane_count;
      float above_mass = detail::warp_inclusive_sum(lane_mass) - lane_mass;
      const int remaining = sh.remaining;
      const float remaining_mass = sh.remaining_mass;
      int found = -1, found_above = 0;
      float found_above_mass = 0.0f;
      int lowest = -1, lowest_above = 0;  // lowest non-empty digit of this lane
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int d = kRadixBins - 1 - lane * kPerLane - j;
        const int c = sh.radix_count[d];
        const float w = sh.radix_mass[d];
        const bool hit = kByMass ? (c > 0 && above_mass < remaining_mass && remaining_mass <= above_mass + w)
                                 : (above < remaining && remaining <= above + c);
        if (hit && found < 0) {
          found = d;
          found_above = above;
          found_above_mass = above_mass;
        }
        if (c > 0) {
          lowest = d;
          lowest_above = above;
        }
        above += c;
        above_mass += w;
      }
      const unsigned hits = __ballot_sync(0xffffffffu, found >= 0);
      __syncwarp();  // every lane has read sh.remaining* before one lane writes them
      if (hits != 0) {
        if (lane == __ffs(hits) - 1) {
          sh.prefix |= static_cast<std::uint32_t>(found) << shift;
          sh.radix_above += found_above;
          if (kByMass) sh.remaining_mass = remaining_mass - found_above_mass;
          else sh.remaining = remaining - found_above;
        }
      } else {
        // Rounding left the mass target above this level's sum: take everything, which the
        // lowest non-empty digit with an infinite target does at every level below.
        const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
        if (lane == 31 - __clz(nonempty)) {
          sh.prefix |= static_cast<std::uint32_t>(lowest) << shift;
          sh.radix_above += lowest_above;
          sh.remaining_mass = INFINITY;
        }
      }
    }
    __syncthreads();
    mask |= static_cast<std::uint32_t>(kRadixBins - 1) << shift;
  }
  Cut cut{sh.prefix, 0};
  if (!kByMass) {
    cut.take_equal = sh.remaining;
  } else {
    // Equal keys may carry different masses: take them in position order while the mass before
    // each is short of what is left.
    const float need = sh.remaining_mass;
    float seen = 0.0f;
    int take = 0;
    for (int base = 0; base < seg.n; base += kThreads) {
      const int i = base + threadIdx.x;
      const bool equal = i < seg.n && seg.ranked(i) && detail::order_key(seg.rank[i]) == cut.key;
      const float w = equal ? seg.mass_of(i) : 0.0f;
      float chunk_total;
      const float before = seen + detail::block_exclusive_sum(w, sh.fscratch, chunk_total);
      take += block_sum(static_cast<int>(equal && before < need), sh.iscratch);
      seen += chunk_total;
    }
    cut.take_equal = take;
  }
  __syncthreads();
  return cut;
}

// The cut inside bin sh.bin: the positions in the bin ranked against each other (key descending,
// position ascending) when few, else by the radix descent. Returns how many of the bin it takes;
// the cut goes to sh.cut.
__device__ int cut_in_bin(const Segment& seg, SelectShared& sh, bool by_mass) {
  const int bin = sh.bin;
  const int in_bin = sh.count[bin];
  if (in_bin > kMaxCandidates) {
    Cut cut;
    int above_in_bin;
    if (by_mass) {
      cut = radix_descent<true>(seg, sh, bin, 0, sh.remaining_mass);
    } else {
      cut = radix_descent<false>(seg, sh, bin, sh.remaining, 0.0f);
    }
    above_in_bin = sh.radix_above;
    __syncthreads();
    if (threadIdx.x == 0) sh.cut = cut;
    __syncthreads();
    return above_in_bin + cut.take_equal;
  }
  for (int i = threadIdx.x; i < seg.n; i += kThreads)
    if (seg.ranked(i) && seg.bin(seg.rank[i]) == bin) sh.cand[atomicAdd(&sh.ncand, 1)] = i;
  __syncthreads();
  const int t = threadIdx.x;
  int order = 0, higher_key = 0;  // candidates ranked above this one; those with a higher key
  float mass_before = 0.0f;
  std::uint32_t key = 0;
  if (t < in_bin) {
    const int i = sh.cand[t];
    key = detail::order_key(seg.rank[i]);
    for (int j = 0; j < in_bin; ++j) {
      const int c = sh.cand[j];
      const std::uint32_t k = detail::order_key(seg.rank[c]);
      const bool above = k > key || (k == key && c < i);
      order += above;
      higher_key += k > key;
      if (by_mass && above) mass_before += seg.mass_of(c);
    }
  }
  // Mass mode takes each candidate whose predecessors' mass falls short; counted, then taken as a
  // prefix of the order so that rounding in the sums cannot leave a gap.
  const int take = by_mass ? block_sum(static_cast<int>(t < in_bin && mass_before < sh.remaining_mass), sh.iscratch)
                           : sh.remaining;
  if (t < in_bin && order == take - 1) sh.cut = Cut{key, order - higher_key + 1};
  __syncthreads();
  return take;
}

// Writes forced positions plus ranked positions above the cut (and the first take_equal at it), in
// ascending order. mode: 0 = forced only, 1 = all allowed, 2 = by cut.
__device__ int write_selection(const Segment& seg, SelectShared& sh, int mode, Cut cut, std::int32_t* out) {
  int written = 0, equal_seen = 0;
  for (int base = 0; base < seg.n; base += kChunk) {
    const int first = base + static_cast<int>(threadIdx.x) * kPerThread;
    unsigned take = 0, equal = 0;  // bit j: position first + j
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = first + j;
      if (i >= seg.n || !seg.allowed(i)) continue;
      bool t = seg.forced(i) || mode == 1;
      if (mode == 2 && seg.ranked(i)) {
        const std::uint32_t k = detail::order_key(seg.rank[i]);
        equal |= static_cast<unsigned>(k == cut.key) << j;
        t = t || k > cut.key;
      }
      take |= static_cast<unsigned>(t) << j;
    }
    int equal_total = 0;
    int equal_rank = equal_seen + detail::block_exclusive_sum(__popc(equal), sh.iscratch, equal_total);
    equal_seen += equal_total;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (equal >> j & 1u) take |= static_cast<unsigned>(equal_rank++ < cut.take_equal) << j;
    int taken_total = 0;
    int slot = written + detail::block_exclusive_sum(__popc(take), sh.iscratch, taken_total);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (take >> j & 1u) out[slot++] = seg.page(first + j);
    written += taken_total;
  }
  return written;
}

__global__ void __launch_bounds__(kThreads) SelectPagesKernel(const __grid_constant__ SelectParams p) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();  // the scores (and the output arrays) belong to the kernels before until then
  __shared__ SelectShared sh;
  // [kSmemPages] rank scores, then [kSmemPages] masses in mass mode, then [kSmemPages] page
  // positions in candidate mode.
  extern __shared__ float staged[];
  const SegmentPlace place(p, static_cast<int>(blockIdx.x));
  const int s = place.s, b = place.b, pages = place.pages, n = place.n;
  const bool by_candidate = place.by_candidate;
  const long long page_offset = place.page_offset, offset = place.offset;
  const bool by_mass = p.mass_threshold > 0.0f;
  const bool stage = n <= kSmemPages;
  const float* g_rank = p.scores + offset;
  const float* g_log_mass = by_mass ? p.log_mass + offset : nullptr;
  const std::int32_t* g_pos = by_candidate ? p.position_of + offset : nullptr;
  float* s_rank = staged;
  float* s_mass = staged + kSmemPages;
  auto* s_pos = reinterpret_cast<std::int32_t*>(staged + (by_mass ? 2 : 1) * kSmemPages);
  Segment seg{stage ? s_rank : g_rank,
              nullptr,
              g_log_mass,
              0.0f,
              n,
              p.exclude_begin ? p.exclude_begin[b] : 0,
              p.exclude_end ? p.exclude_end[b] : 0,
              min(max(p.sink_pages, 0), pages),
              max(pages - max(p.local_pages, 0), 0),
              Binning{0.0f, 0.0f},
              by_candidate ? (stage ? s_pos : g_pos) : nullptr};
  const int budget = p.budget_pages[s];

  // Ranked and forced positions actually selected (inside the allowed range); the range of the
  // finite ranked scores for the bins; the largest log-mass.
  int ranked = 0, forced = 0;
  float lo = INFINITY, hi = -INFINITY, top = -INFINITY;
  for (int base = 0; base < n; base += kChunk) {
    // All of a thread's loads of the chunk are issued before any is used: these passes are latency
    // bound (one block per segment).
    float r[kPerThread], lm[kPerThread];
    std::int32_t at[kPerThread];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      r[j] = i < n ? g_rank[i] : 0.0f;
      lm[j] = i < n && by_mass ? g_log_mass[i] : 0.0f;
      at[j] = i < n && by_candidate ? g_pos[i] : 0;
    }
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int i = base + j * kThreads + static_cast<int>(threadIdx.x);
      if (i >= n) continue;
      if (stage) {
        s_rank[i] = r[j];
        if (by_mass) s_mass[i] = lm[j];
        if (by_candidate) s_pos[i] = at[j];  // read back by seg below, by this thread only
      }
      if (!seg.allowed(i)) continue;
      top = fmaxf(top, lm[j]);  // fmaxf drops NaN
      if (seg.forced(i)) {
        ++forced;
      } else {
        ++ranked;
        if (isfinite(r[j])) {
          lo = fminf(lo, r[j]);
          hi = fmaxf(hi, r[j]);
        }
      }
    }
  }
  block_reduce_stats(sh, lo, hi, top, ranked, forced);
  const float range = hi - lo;
  seg.bin = Binning{lo, range > 0.0f && range < INFINITY ? kBins / range : 0.0f};

  int take;            // ranked positions to take
  int mass_take = -1;  // ranked positions the mass cut takes, when it was computed
  bool counted = false;  // sh.count holds the histogram of the ranked positions
  Cut cut{0, 0};
  if (!by_mass) {
    take = max(budget - forced, 0);
  } else {
    seg.max_log_mass = top;
    take = ranked;
    if (p.mass_threshold < 1.0f && ranked > 0) {
      // PSA's threshold on the estimated mass: the forced pages' mass counts toward it; the ranked
      // pages add theirs in rank order.
      float total = 0.0f, forced_mass = 0.0f;
      for (int i = threadIdx.x; i < n; i += kThreads) {
        const float w = page_mass(stage ? s_mass[i] : g_log_mass[i], top);
        if (stage) s_mass[i] = w;
        if (!seg.allowed(i)) continue;
        total += w;
        if (seg.forced(i)) forced_mass += w;
      }
      if (stage) seg.mass = s_mass;
      total = block_sum(total, sh.fscratch);
      forced_mass = block_sum(forced_mass, sh.fscratch);
      const float target = p.mass_threshold * total - forced_mass;
      if (target <= 0.0f) {
        mass_take = 0;
      } else {
        build_histogram(seg, sh, true);
        counted = true;
        find_bin(sh, true, 0, target);
        if (sh.bin < 0) {
          mass_take = ranked;  // rounding: the target exceeds the summed bins, so take them all
        } else {
          const int above = sh.above;
          mass_take = above + cut_in_bin(seg, sh, true);
          cut = sh.cut;
        }
      }
      take = mass_take;
    }
    take = min(take, max(budget, 0));
  }
  int mode;
  if (take <= 0) {
    mode = 0;
  } else if (take >= ranked) {
    mode = 1;
  } else {
    mode = 2;
    if (take != mass_take) {
      if (!counted) build_histogram(seg, sh, false);
      find_bin(sh, false, take, 0.0f);
      cut_in_bin(seg, sh, false);
      cut = sh.cut;
    }
  }
  const int written = write_selection(seg, sh, mode, cut, p.selected + page_offset);
  if (threadIdx.x == 0) p.selected_count[s] = written;
}

// Top-k over segments the caller bounds by max_entries (the two-level pipeline's group and candidate
// segments, and 128K-token page segments): one block per segment stages its order keys and positions
// in shared memory and runs detail::block_top_k. No 4096-bin histograms: for such segments the
// general kernel's fixed costs dominated (10 us for 512 entries, 17 us for 8192 on an H200). 256
// threads up to 256 entries, else 1024 (a 900-entry segment is one entry per thread, not 16 entries on
// 56 threads).
constexpr int kSmallThreads = 1024;

template <int T>
__global__ void __launch_bounds__(T) SelectTopKSmallKernel(const __grid_constant__ SelectParams p) {
  detail::pdl_launch_dependents();
  __shared__ detail::TopKShared<T> sh;
  extern __shared__ std::uint32_t keys[];  // [max_entries] order keys, then [max_entries] positions
  if (!p.inputs_ready) detail::pdl_wait();
  const SegmentPlace place(p, static_cast<int>(blockIdx.x));
  const int b = place.b, pages = place.pages, n = place.n;
  detail::TopKRule rule;
  rule.budget = p.budget_pages[place.s];
  rule.sink_end = min(max(p.sink_pages, 0), pages);
  rule.local_begin = max(pages - max(p.local_pages, 0), 0);
  rule.exclude_begin = p.exclude_begin ? p.exclude_begin[b] : 0;
  rule.exclude_end = p.exclude_end ? p.exclude_end[b] : 0;
  // Where the caller vouches for them (inputs_ready), the tables, budgets and exclusions above are
  // read while the kernel before finishes (detail/pdl.cuh); the scores, candidates and every output
  // only after the wait (a second wait returns at once).
  detail::pdl_wait();
  // max_entries understated the longest segment: its last entries (the local window) would be lost.
  if (n > p.max_entries) __trap();
  auto* at = reinterpret_cast<std::int32_t*>(keys + p.max_entries);
  for (int i = threadIdx.x; i < n; i += T) {
    keys[i] = detail::order_key(p.scores[place.offset + i]);
    at[i] = place.by_candidate ? p.position_of[place.offset + i] : i;
  }
  __syncthreads();
  const int written = detail::block_top_k<T>(keys, at, n, rule, sh, p.selected + place.page_offset);
  if (threadIdx.x == 0) p.selected_count[place.s] = written;
}

template <int T>
void launch_top_k_small(const SelectParams& p, unsigned segments, cudaStream_t stream) {
  const std::size_t smem = 2 * sizeof(std::int32_t) * static_cast<std::size_t>(p.max_entries);
  // Static and dynamic shared memory together may pass the 48 KB default below 48 KB of dynamic; a
  // per-device attribute, so set on every launch (a host-side call).
  HATTN_CUDA_CHECK(cudaFuncSetAttribute(SelectTopKSmallKernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  detail::launch_programmatic(SelectTopKSmallKernel<T>, dim3(segments), dim3(T), smem, stream, p);
}

/// The compact kernel for segments of at most p.max_entries entries.
void launch_select_top_k_small(const SelectParams& p, unsigned segments, cudaStream_t stream) {
  if (p.max_entries <= 256) launch_top_k_small<256>(p, segments, stream);
  else launch_top_k_small<kSmallThreads>(p, segments, stream);
}

__global__ void __launch_bounds__(kThreads) SelectAllPagesKernel(const __grid_constant__ SelectParams p) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();  // the output arrays belong to the kernels before until then
  const SegmentPlace place(p, static_cast<int>(blockIdx.x));
  std::int32_t* out = p.selected + place.page_offset;
  for (int i = threadIdx.x; i < place.pages; i += kThreads) out[i] = i;
  if (threadIdx.x == 0) p.selected_count[place.s] = place.pages;
}

}  // namespace

std::size_t select_workspace_bytes(std::int64_t total_pages, int kv_heads, int batch) {
  hattn::detail::require(total_pages >= 0, "select_workspace_bytes", "total_pages", total_pages, ">= 0");
  hattn::detail::require(kv_heads > 0, "select_workspace_bytes", "kv_heads", kv_heads, "> 0");
  hattn::detail::require(batch >= 0, "select_workspace_bytes", "batch", batch, ">= 0");
  // Histograms and staged scores live in shared memory; the workspace holds the fused two-level
  // kernel's arrival count per segment, at any length.
  return static_cast<std::size_t>(batch) * static_cast<std::size_t>(kv_heads) * sizeof(std::uint32_t);
}

namespace detail {

bool check_select_params(const SelectParams& p, const char* where) {
  hattn::detail::require(p.batch >= 0, where, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0, where, "kv_heads", p.kv_heads, "> 0");
  hattn::detail::require(p.mass_threshold >= 0.0f && p.mass_threshold <= 1.0f, where, "mass_threshold",
                         p.mass_threshold, "0 (top-k) or in (0, 1]");
  if (p.batch == 0) return false;
  hattn::detail::require(p.scores && p.page_indptr && p.budget_pages && p.selected && p.selected_count, where,
                         "pointers", "null", "all set");
  hattn::detail::require(p.mass_threshold == 0.0f || p.log_mass != nullptr, where, "log_mass", "null",
                         "set for the mass rule");
  hattn::detail::require((p.exclude_begin == nullptr) == (p.exclude_end == nullptr), where,
                         "exclude_begin/exclude_end", "one null", "both set or both null");
  hattn::detail::require(p.max_entries >= 0, where, "max_entries", p.max_entries, ">= 0 (0 = unknown)");
  hattn::detail::require(p.position_of != nullptr ? p.candidates > 0 : p.candidates == 0, where, "candidates",
                         p.candidates, p.position_of ? "> 0 with position_of" : "0 without position_of");
  const long long segments = static_cast<long long>(p.batch) * p.kv_heads;
  hattn::detail::require(segments <= 0x7fffffffLL, where, "batch * kv_heads", segments, "< 2^31");
  hattn::detail::require(segments * p.candidates <= 0x7fffffffLL, where, "batch * kv_heads * candidates",
                         segments * p.candidates, "< 2^31");
  return true;
}

}  // namespace detail

void launch_select_pages(const SelectParams& p, Stream stream) {
  if (!detail::check_select_params(p, "launch_select_pages")) return;
  const long long segments = static_cast<long long>(p.batch) * p.kv_heads;
  // Top-k over segments the caller bounds as small: the compact kernel.
  if (p.mass_threshold == 0.0f && p.max_entries > 0 && p.max_entries <= detail::kBlockTopKMaxEntries) {
    launch_select_top_k_small(p, static_cast<unsigned>(segments), stream);
    return;
  }
  const int staged_arrays = (p.mass_threshold > 0.0f ? 2 : 1) + (p.position_of != nullptr ? 1 : 0);
  const int smem = staged_arrays * kSmemPages * static_cast<int>(sizeof(float));
  // Above the 48 KB default; a per-device attribute, so set on every launch (a host-side call).
  HATTN_CUDA_CHECK(cudaFuncSetAttribute(SelectPagesKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        3 * kSmemPages * static_cast<int>(sizeof(float))));
  detail::launch_programmatic(SelectPagesKernel, dim3(static_cast<unsigned>(segments)), dim3(kThreads),
                              static_cast<std::size_t>(smem), stream, p);
}

void launch_select_all_pages(const SelectParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_select_all_pages";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  if (p.batch == 0) return;
  hattn::detail::require(p.page_indptr && p.selected && p.selected_count, kWhere, "pointers", "null", "all set");
  const long long segments = static_cast<long long>(p.batch) * p.kv_heads;
  hattn::detail::require(segments <= 0x7fffffffLL, kWhere, "batch * kv_heads", segments, "< 2^31");
  detail::launch_programmatic(SelectAllPagesKernel, dim3(static_cast<unsigned>(segments)), dim3(kThreads), 0, stream, p);
}

}  // namespace hattn::cuda
