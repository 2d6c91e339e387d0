// Page selection on the GPU without host synchronisation (DESIGN.md step 2): one block per
// (request, KV head) segment finds the selection threshold by a radix descent over the order-
// preserving bits of the scores (8 bits per pass, histograms in shared memory), then writes the
// selected positions in ascending order with a block-wide scan. Memory is O(pages), never O(tokens),
// and nothing is allocated: the descent keeps its state in shared memory.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "detail/block_scan.cuh"
#include "detail/launch_check.cuh"
#include "detail/vec.cuh"
#include "hattn/kernels/cuda_select.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kBins = 256;
constexpr int kRadixBits = 8;
// Sub-histograms, one per group of warps: scores of a segment share few exponents, so one shared
// histogram would serialise most atomics on a handful of bins in the first pass.
constexpr int kSubHists = 8;

/// Which positions of a segment take part, in which role.
struct Segment {
  const float* scores;
  int n;
  int exclude_begin, exclude_end;
  int sink_end;      // positions [0, sink_end) are forced
  int local_begin;   // positions [local_begin, n) are forced

  __device__ bool allowed(int i) const { return i < exclude_begin || i >= exclude_end; }
  __device__ bool forced(int i) const { return i < sink_end || i >= local_begin; }
  // Forced positions are selected anyway: only the others compete for the budget.
  __device__ bool ranked(int i) const { return allowed(i) && !forced(i); }
};

/// Result of a radix descent: the key of the last ranked position taken and how many positions
/// with exactly that key are taken (the lowest positions first, so ties go to the lower position).
struct Cut {
  std::uint32_t key;
  int take_equal;
  int count_above;  // ranked positions with a key above `key`
};

/// exp(score - max), the page's share of the softmax before normalisation; NaN counts as no mass.
__device__ __forceinline__ float page_mass(float score, float max_score) {
  return score == score ? __expf(score - max_score) : 0.0f;
}

struct SelectShared {
  int count[kBins];
  float mass[kBins];
  int sub_count[kSubHists][kBins];
  float sub_mass[kSubHists][kBins];
  int iscratch[detail::kWarp + 1];
  float fscratch[detail::kWarp + 1];
  std::uint32_t prefix;
  int remaining;
  float remaining_mass;
  int count_above;  // ranked positions with a key above the current prefix
};

// Finds, among bins 255..0 (high keys first), the bin where the running count passes `remaining`
// (count mode) or the running mass passes `remaining_mass` (mass mode); run by warp 0.
template <bool kByMass>
__device__ void pick_bin(SelectShared& sh, int shift) {
  const int lane = threadIdx.x % detail::kWarp;
  constexpr int kPerLane = kBins / detail::kWarp;
  // Lane l owns bins 255 - 8l .. 248 - 8l, visited from the top.
  float lane_mass = 0.0f;
  int lane_count = 0;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int bin = kBins - 1 - lane * kPerLane - j;
    lane_count += sh.count[bin];
    lane_mass += sh.mass[bin];
  }
  const int count_excl = detail::warp_inclusive_sum(lane_count) - lane_count;
  const float mass_excl = detail::warp_inclusive_sum(lane_mass) - lane_mass;
  const int remaining = sh.remaining;
  const float remaining_mass = sh.remaining_mass;
  int found_bin = -1;
  int above = count_excl;
  float above_mass = mass_excl;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int bin = kBins - 1 - lane * kPerLane - j;
    const int c = sh.count[bin];
    const float m = sh.mass[bin];
    const bool hit = kByMass ? (c > 0 && above_mass < remaining_mass && remaining_mass <= above_mass + m)
                             : (above < remaining && remaining <= above + c);
    if (hit && found_bin < 0) found_bin = bin;
    if (found_bin < 0) {
      above += c;
      above_mass += m;
    }
  }
  const unsigned hits = __ballot_sync(0xffffffffu, found_bin >= 0);
  int owner;
  if (hits != 0) {
    owner = __ffs(hits) - 1;
  } else {
    // Rounding left the mass target above this level's sum: take everything down to the lowest
    // non-empty bin, which selects every position under the current prefix.
    const unsigned nonempty = __ballot_sync(0xffffffffu, lane_count > 0);
    owner = 31 - __clz(nonempty);
    if (lane == owner) {
      above = count_excl;
      above_mass = mass_excl;
      for (int j = 0; j < kPerLane; ++j) {
        const int bin = kBins - 1 - lane * kPerLane - j;
        if (sh.count[bin] > 0) found_bin = bin;
      }
      for (int j = 0; j < kPerLane; ++j) {
        const int bin = kBins - 1 - lane * kPerLane - j;
        if (bin == found_bin) break;
        above += sh.count[bin];
        above_mass += sh.mass[bin];
      }
    }
  }
  // Count of the fallback bin, read before any lane writes the shared state below.
  const float found_mass = found_bin >= 0 ? sh.mass[found_bin] : 0.0f;
  __syncwarp();
  if (lane == owner) {
    sh.prefix |= static_cast<std::uint32_t>(found_bin) << shift;
    sh.count_above += above;
    if (kByMass) {
      const float left = remaining_mass - above_mass;
      sh.remaining_mass = hits != 0 ? left : found_mass;
    } else {
      sh.remaining = remaining - above;
    }
  }
}

// Radix descent over the ranked positions: by count (the `m`-th highest key) or by mass (the key at
// which the running softmax mass, highest first, reaches `target`). Keys exp(score - max) are summed
// in fp32 shared atomics.
template <bool kByMass>
__device__ Cut radix_descent(const Segment& seg, SelectShared& sh, int m, float target, float max_score) {
  __syncthreads();  // every thread has read the previous descent's results
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.remaining = m;
    sh.remaining_mass = target;
    sh.count_above = 0;
  }
  const int sub = (threadIdx.x / detail::kWarp) % kSubHists;
  std::uint32_t mask = 0;
  for (int shift = 32 - kRadixBits; shift >= 0; shift -= kRadixBits) {
    for (int i = threadIdx.x; i < kSubHists * kBins; i += blockDim.x) {
      (&sh.sub_count[0][0])[i] = 0;
      (&sh.sub_mass[0][0])[i] = 0.0f;
    }
    __syncthreads();
    const std::uint32_t prefix = sh.prefix;
    for (int i = threadIdx.x; i < seg.n; i += blockDim.x) {
      if (!seg.ranked(i)) continue;
      const float s = seg.scores[i];
      const std::uint32_t k = detail::order_key(s);
      if ((k & mask) != prefix) continue;
      const int bin = (k >> shift) & (kBins - 1);
      atomicAdd(&sh.sub_count[sub][bin], 1);
      if (kByMass) atomicAdd(&sh.sub_mass[sub][bin], page_mass(s, max_score));
    }
    __syncthreads();
    for (int bin = threadIdx.x; bin < kBins; bin += blockDim.x) {
      int c = 0;
      float w = 0.0f;
#pragma unroll
      for (int h = 0; h < kSubHists; ++h) {
        c += sh.sub_count[h][bin];
        w += sh.sub_mass[h][bin];
      }
      sh.count[bin] = c;
      sh.mass[bin] = w;
    }
    __syncthreads();
    if (threadIdx.x < detail::kWarp) pick_bin<kByMass>(sh, shift);
    __syncthreads();
    mask |= static_cast<std::uint32_t>(kBins - 1) << shift;
  }
  Cut cut{sh.prefix, 0, sh.count_above};
  if (kByMass) {
    // count_above counts keys strictly above the final key; take enough equal keys for the mass.
    const float each = page_mass(detail::key_value(cut.key), max_score);
    int equal = 0;
    for (int i = threadIdx.x; i < seg.n; i += blockDim.x)
      equal += seg.ranked(i) && detail::order_key(seg.scores[i]) == cut.key;
    equal = detail::block_reduce(equal, [](int a, int b) { return a + b; }, sh.iscratch);
    // Keys far below the maximum have each == 0 in fp32: then every equal key is needed.
    const float need = each > 0.0f ? ceilf(sh.remaining_mass / each) : static_cast<float>(equal);
    cut.take_equal = need >= static_cast<float>(equal) ? equal : max(1, static_cast<int>(need));
  } else {
    cut.take_equal = sh.remaining;
  }
  return cut;
}

// Writes forced positions plus ranked positions above the cut (and the first take_equal at it), in
// ascending order, one block-wide chunk of positions at a time. mode: 0 = forced only, 1 = all
// allowed, 2 = by cut. (Chunks with coalesced reads measured 157 us at 1M tokens x 8 KV heads on an
// H100; contiguous per-thread ranges with two scans in total took 254 us.)
__device__ int write_selection(const Segment& seg, SelectShared& sh, int mode, Cut cut, std::int32_t* out) {
  int written = 0, equal_seen = 0;
  for (int base = 0; base < seg.n; base += blockDim.x) {
    const int i = base + threadIdx.x;
    const bool in = i < seg.n && seg.allowed(i);
    bool equal = false, take = false;
    if (in) {
      take = seg.forced(i) || mode == 1;
      if (mode == 2 && seg.ranked(i)) {
        const std::uint32_t k = detail::order_key(seg.scores[i]);
        equal = k == cut.key;
        take = take || k > cut.key;
      }
    }
    int equal_total = 0;
    const int equal_rank = equal_seen + detail::block_exclusive_sum(equal ? 1 : 0, sh.iscratch, equal_total);
    equal_seen += equal_total;
    if (equal && equal_rank < cut.take_equal) take = true;
    int taken_total = 0;
    const int slot = written + detail::block_exclusive_sum(take ? 1 : 0, sh.iscratch, taken_total);
    if (take) out[slot] = i;
    written += taken_total;
  }
  return written;
}

__global__ void __launch_bounds__(kThreads) SelectPagesKernel(const __grid_constant__ SelectParams p) {
  __shared__ SelectShared sh;
  const int s = blockIdx.x;
  const int b = s / p.kv_heads;
  const int h = s % p.kv_heads;
  const int first = p.page_indptr[b];
  const int n = p.page_indptr[b + 1] - first;
  const long long offset = static_cast<long long>(first) * p.kv_heads + static_cast<long long>(h) * n;
  const bool by_mass = p.mass_threshold > 0.0f;
  Segment seg{p.scores + offset,
              n,
              p.exclude_begin ? p.exclude_begin[b] : 0,
              p.exclude_end ? p.exclude_end[b] : 0,
              min(max(p.sink_pages, 0), n),
              max(n - max(p.local_pages, 0), 0)};
  const int budget = p.budget_pages[s];

  // Ranked positions and forced positions actually selected (inside the allowed range).
  int ranked = 0, forced = 0;
  float max_score = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (!seg.allowed(i)) continue;
    forced += seg.forced(i);
    ranked += !seg.forced(i);
    max_score = fmaxf(max_score, seg.scores[i]);  // fmaxf drops NaN
  }
  const auto add = [](int a, int c) { return a + c; };
  ranked = detail::block_reduce(ranked, add, sh.iscratch);
  forced = detail::block_reduce(forced, add, sh.iscratch);

  int take;  // ranked positions to take
  Cut cut{0, 0, 0};
  int mass_take = -1;  // ranked positions the mass cut takes, when it was computed
  if (!by_mass) {
    take = max(budget - forced, 0);
  } else {
    max_score = detail::block_reduce(max_score, [](float a, float c) { return fmaxf(a, c); }, sh.fscratch);
    take = ranked;
    if (p.mass_threshold < 1.0f && ranked > 0) {
      // PSA: the forced pages' mass counts toward the threshold; the ranked pages add the rest.
      float total = 0.0f, forced_mass = 0.0f;
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        if (!seg.allowed(i)) continue;
        const float w = page_mass(seg.scores[i], max_score);
        total += w;
        if (seg.forced(i)) forced_mass += w;
      }
      const auto sum = [](float a, float c) { return a + c; };
      total = detail::block_reduce(total, sum, sh.fscratch);
      forced_mass = detail::block_reduce(forced_mass, sum, sh.fscratch);
      const float target = p.mass_threshold * total - forced_mass;
      if (target <= 0.0f) {
        mass_take = 0;
      } else {
        cut = radix_descent<true>(seg, sh, 0, target, max_score);
        mass_take = cut.count_above + cut.take_equal;
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
    if (take != mass_take) cut = radix_descent<false>(seg, sh, take, 0.0f, 0.0f);
  }
  const int written = write_selection(seg, sh, mode, cut, p.selected + offset);
  if (threadIdx.x == 0) p.selected_count[s] = written;
}

}  // namespace

std::size_t select_workspace_bytes(std::int64_t total_pages, int kv_heads, int batch) {
  hattn::detail::require(total_pages >= 0, "select_workspace_bytes", "total_pages", total_pages, ">= 0");
  hattn::detail::require(kv_heads > 0, "select_workspace_bytes", "kv_heads", kv_heads, "> 0");
  hattn::detail::require(batch >= 0, "select_workspace_bytes", "batch", batch, ">= 0");
  // The radix descent keeps its histograms in shared memory: no global workspace at any length.
  return 0;
}

void launch_select_pages(const SelectParams& p, Stream stream) {
  constexpr const char* kWhere = "launch_select_pages";
  hattn::detail::require(p.batch >= 0, kWhere, "batch", p.batch, ">= 0");
  hattn::detail::require(p.kv_heads > 0, kWhere, "kv_heads", p.kv_heads, "> 0");
  hattn::detail::require(p.mass_threshold >= 0.0f && p.mass_threshold <= 1.0f, kWhere, "mass_threshold",
                         p.mass_threshold, "0 (top-k) or in (0, 1]");
  if (p.batch == 0) return;
  hattn::detail::require(p.scores && p.page_indptr && p.budget_pages && p.selected && p.selected_count, kWhere,
                         "pointers", "null", "all set");
  hattn::detail::require((p.exclude_begin == nullptr) == (p.exclude_end == nullptr), kWhere,
                         "exclude_begin/exclude_end", "one null", "both set or both null");
  const long long segments = static_cast<long long>(p.batch) * p.kv_heads;
  hattn::detail::require(segments <= 0x7fffffffLL, kWhere, "batch * kv_heads", segments, "< 2^31");
  SelectPagesKernel<<<static_cast<unsigned>(segments), kThreads, 0, stream>>>(p);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
