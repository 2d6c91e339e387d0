// The HBM page cache's step on the GPU (kv/DeviceKVCache, DESIGN.md step 7) in two kernels:
//   1. lookup beside the age-histogram scan of every slot; the last block to finish plans each row;
//   2. stamp refresh, eviction of whole age classes, and claims: a row's admissions take the slots
//      it evicts first, then slots from the head of the free ring.
// The gather (cuda/gather.cu) then copies and publishes each block. Mirrors CacheModel::step
// (src/kv/device_kv_cache_model.cpp) rule for rule; the GPU test compares the two call by call.
// No stage waits for the host: counts, thresholds and quotas stay on the device.
//
// Why two kernels and not five: each launch on the side stream costs a few microseconds of
// latency chain (issue 6 measured 38 us for five on an H100 with ~2-3 us of work in each). The
// lookup and the histogram scan are independent once the lookup marks hits (slot_hit) instead of
// rewriting stamps, so they share a grid; the plan rides on the last block (threadfence
// reduction, no grid-wide wait); claims need the plan and must follow evictions of their row, so
// the evicting thread hands its slot to an admission directly, and the slots a row needs beyond
// its own evictions come from the free ring's head, which no eviction writes in the same kernel
// (pushes go to the tail: budgets partition the pool, so the two ranges never meet).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "detail/block_scan.cuh"
#include "detail/launch_check.cuh"
#include "hattn/kv/device_kv_cache_kernels.hpp"

namespace hattn::detail {
namespace {

using cuda::detail::block_exclusive_sum;
using cuda::detail::kWarp;

constexpr int kThreads = 256;
constexpr int kSlotsPerThread = 4;  // 100K slots -> 98 blocks: one wave on an H100's 132 SMs
constexpr int kClasses = kCacheEvictionClasses;
constexpr int kMaxRows = 128;       // DeviceKVCacheConfig::max_batch bound
enum : int { kAccHits, kAccMisses, kAccBypass, kAccFresh, kAccFields };

// Programmatic dependent launch (Hopper): stage 2's blocks start and load what stage 1 does not
// write while stage 1's last block plans; `wait` returns once stage 1 is complete and visible.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void add64(std::int64_t* p, std::int64_t v) {
  if (v != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

__device__ __forceinline__ int block_sum(int v, int* scratch) {
  int total;
  block_exclusive_sum(v, scratch, total);
  return total;
}

__device__ __forceinline__ bool open_request(const CacheDeviceView& v, int r) {
  return r >= 0 && r < v.max_requests && v.budget[r] >= 0;
}

// Row of each open request of the call, in shared memory: rows are at most 128, so a byte each.
// Built by every block that needs it rather than kept in global memory, so no kernel has to clear
// a global map another block of the same grid is still reading.
__device__ void build_row_map(const CacheDeviceView& v, const CacheCallArgs& a, std::int8_t* map) {
  for (int i = threadIdx.x; i < v.max_requests; i += blockDim.x) map[i] = -1;
  __syncthreads();
  for (int b = threadIdx.x; b < a.batch; b += blockDim.x)
    if (const int r = a.request_of_row[b]; open_request(v, r)) map[r] = static_cast<std::int8_t>(b);
  __syncthreads();
}

__device__ __forceinline__ int slot_of_thread(int block, int k) {
  return (block * kSlotsPerThread + k) * kThreads + static_cast<int>(threadIdx.x);
}

// Stage 1, lookup part p = s * parts + x: entries [x * L, (x + 1) * L) of segment s, L = ceil(count
// / parts). Hits are marked (not restamped: the scan beside reads stamps) and moved from their age
// class to `fresh` in the row's histogram; misses are compacted in position order.
__device__ void lookup_part(const CacheDeviceView& v, const CacheCallArgs& a, int p, int* sh_hist, int* scratch) {
  const int s = p / a.parts, x = p % a.parts;
  const int b = s / v.kv_heads, h = s % v.kv_heads;
  const int r = a.request_of_row[b];
  const bool valid = open_request(v, r);
  if (threadIdx.x == 0 && x == 0 && h == 0 && !valid && atomicCAS(&v.scalars->error, 0, 1) == 0) {
    v.scalars->error_row = b;
    v.scalars->error_value = r;
  }
  if (!valid) {
    if (threadIdx.x == 0) v.part_misses[p] = 0;
    return;
  }
  for (int c = threadIdx.x; c < kClasses; c += blockDim.x) sh_hist[c] = 0;
  __syncthreads();
  const int base = a.page_indptr[b];
  const int last = a.page_indptr[b + 1] - base - 1;
  const int off = a.selected_offset[s], cnt = a.selected_count[s];
  const int len = (cnt + a.parts - 1) / a.parts;
  const int begin = min(cnt, x * len), end = min(cnt, begin + len);
  int hits = 0, bypass = 0, fresh = 0, missed = 0;
  for (int i0 = begin; i0 < end; i0 += blockDim.x) {
    const int i = i0 + threadIdx.x;
    int miss = 0;
    BlockKey key = -1;
    if (i < end) {
      const int pos = a.selected[off + i];
      if (pos == last) {
        ++bypass;  // the page still being appended to is never cached
      } else {
        key = a.page_table[base + pos] * v.kv_heads + h;
        const int slot = v.slot_of[key];
        // A hit only if the slot still holds the key: a stale map entry would otherwise move the
        // slot's block out of the class of the key looked up instead of its own, the histogram
        // would then disagree with the eviction scan and a planned victim would not be found.
        // Taken as a miss instead, the key is admitted again and the gather rewrites its entry.
        if (slot >= 0 && v.slot_key[slot] == key) {
          ++hits;
          v.slot_hit[slot] = a.call_id;
          if (!v.slot_pinned[slot]) {
            const std::uint32_t stamp = v.slot_stamp[slot];
            if (stamp != a.now) {  // the scan counts it in its old class: move it to fresh
              ++fresh;
              atomicSub(&sh_hist[cache_eviction_class(a.now - stamp, key, a.age_width)], 1);
            }
          }
        } else {
          miss = 1;
        }
      }
    }
    int total;
    const int rank = block_exclusive_sum(miss, scratch, total);
    if (miss) v.miss_key[off + begin + missed + rank] = key;
    missed += total;
  }
  hits = block_sum(hits, scratch);
  bypass = block_sum(bypass, scratch);
  fresh = block_sum(fresh, scratch);
  int* acc = v.row_acc + b * kAccFields;
  if (threadIdx.x == 0) {
    v.part_misses[p] = missed;
    if (hits) atomicAdd(acc + kAccHits, hits);
    if (missed) atomicAdd(acc + kAccMisses, missed);
    if (bypass) atomicAdd(acc + kAccBypass, bypass);
    if (fresh) atomicAdd(acc + kAccFresh, fresh);
  }
  for (int c = threadIdx.x; c < kClasses; c += blockDim.x)
    if (sh_hist[c] != 0) atomicAdd(&v.row_hist[b * kClasses + c], sh_hist[c]);
}

// Stage 1, slot scan: per row of the call, unpinned blocks of its request used this call (stamp
// now) and the others by eviction class, in shared memory, then added to the global histograms.
__device__ void scan_slots(const CacheDeviceView& v, const CacheCallArgs& a, int q, int* smem) {
  int* sh_hist = smem;                     // [batch][kClasses]
  int* sh_fresh = smem + a.batch * kClasses;  // [batch]
  auto* map = reinterpret_cast<std::int8_t*>(sh_fresh + a.batch);
  for (int i = threadIdx.x; i < a.batch * (kClasses + 1); i += blockDim.x) smem[i] = 0;
  build_row_map(v, a, map);
  int slot[kSlotsPerThread], row[kSlotsPerThread];
  // Loads are issued level by level (owners, then the rest), two round trips per thread.
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    slot[k] = slot_of_thread(q, k);
    const int owner = slot[k] < v.slots ? v.slot_request[slot[k]] : -1;
    row[k] = owner >= 0 ? map[owner] : -1;
  }
  std::uint32_t stamp[kSlotsPerThread];
  BlockKey key[kSlotsPerThread];
  std::uint8_t pinned[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const bool live = row[k] >= 0;
    stamp[k] = live ? v.slot_stamp[slot[k]] : 0u;
    key[k] = live ? v.slot_key[slot[k]] : -1;
    pinned[k] = live ? v.slot_pinned[slot[k]] : std::uint8_t{1};
  }
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    if (row[k] < 0 || pinned[k]) continue;
    if (stamp[k] == a.now) atomicAdd(&sh_fresh[row[k]], 1);
    else atomicAdd(&sh_hist[row[k] * kClasses + cache_eviction_class(a.now - stamp[k], key[k], a.age_width)], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.batch * (kClasses + 1); i += blockDim.x)
    if (smem[i] != 0) {
      if (i < a.batch * kClasses) atomicAdd(&v.row_hist[i], smem[i]);
      else atomicAdd(&v.row_acc[(i - a.batch * kClasses) * kAccFields + kAccFresh], smem[i]);
    }
}

struct PlanShared {
  int request[kMaxRows], from[kMaxRows], quota[kMaxRows], evicted[kMaxRows];
};

// One warp plans one row from the totals of stage 1 (read through L2: other blocks wrote them).
// The threshold is the largest class c with (blocks in classes >= c) >= need: each lane sums ten
// classes, a warp scan finds the lane holding the threshold, and that lane walks its ten.
__device__ void plan_row(const CacheDeviceView& v, const CacheCallArgs& a, int b, PlanShared& ps) {
  const int lane = threadIdx.x % kWarp;
  const int r = a.request_of_row[b];
  if (!open_request(v, r)) {
    if (lane == 0) ps.request[b] = -1, ps.from[b] = kClasses, ps.quota[b] = 0, ps.evicted[b] = 0;
    return;
  }
  const int* acc = v.row_acc + b * kAccFields;
  const int hits = __ldcg(acc + kAccHits), misses = __ldcg(acc + kAccMisses);
  const int bypass = __ldcg(acc + kAccBypass), fresh = __ldcg(acc + kAccFresh);
  const int budget = v.budget[r];
  const int room = max(budget - v.pinned[r] - fresh, 0);
  const int admit = min(misses, room);
  const int need = v.used[r] + admit - budget;

  const int* hist = v.row_hist + b * kClasses;
  constexpr int kPerLane = (kClasses + kWarp - 1) / kWarp;
  const int hi = max(kClasses - lane * kPerLane, 0);
  const int lo = max(hi - kPerLane, 0);
  int from = kClasses, evicted = 0;
  if (need > 0) {
    int sum = 0;
    for (int c = lo; c < hi; ++c) sum += __ldcg(hist + c);
    const int incl = cuda::detail::warp_inclusive_sum(sum);
    const unsigned enough = __ballot_sync(0xffffffffu, incl >= need);
    if (enough == 0) {
      from = 0;
      evicted = __shfl_sync(0xffffffffu, incl, kWarp - 1);
    } else {
      const int owner = __ffs(enough) - 1;
      if (lane == owner) {
        int acc_sum = incl - sum, c = hi;
        while (acc_sum < need) acc_sum += __ldcg(hist + --c);
        from = c;
        evicted = acc_sum;
      }
      from = __shfl_sync(0xffffffffu, from, owner);
      evicted = __shfl_sync(0xffffffffu, evicted, owner);
    }
  }
  if (lane != 0) return;
  ps.request[b] = r, ps.from[b] = from, ps.quota[b] = admit, ps.evicted[b] = evicted;
  v.used[r] += admit - evicted;

  DeviceRequestCounters rc = v.request_stats[r];
  const std::int64_t bytes = static_cast<std::int64_t>(admit) * v.block_bytes;
  rc.counters.hits += hits;
  rc.counters.misses += misses;
  rc.counters.bypass += bypass;
  rc.counters.admitted += admit;
  rc.counters.evicted += evicted;
  rc.counters.pcie_bytes += bytes;
  if (rc.last_step != a.step) {
    rc.last_step = a.step;
    ++rc.steps;
  }
  v.request_stats[r] = rc;
  CacheCounters& sc = v.step_stats->counters;
  add64(&sc.hits, hits);
  add64(&sc.misses, misses);
  add64(&sc.bypass, bypass);
  add64(&sc.admitted, admit);
  add64(&sc.evicted, evicted);
  add64(&sc.pcie_bytes, bytes);
}

// The last block of stage 1: plans, then lays out stage 2 (row bases of gather entries and ring pops,
// the ring's push tail; per-part miss ranks) and resets the per-call counters stage 2 uses.
__device__ void plan_call(const CacheDeviceView& v, const CacheCallArgs& a, int* scratch) {
  __shared__ PlanShared ps;
  if (threadIdx.x == 0 && v.step_stats->step != a.step) {
    v.step_stats->step = a.step;
    v.step_stats->counters = CacheCounters{};
  }
  __syncthreads();
  for (int b = threadIdx.x / kWarp; b < a.batch; b += blockDim.x / kWarp) plan_row(v, a, b, ps);
  __syncthreads();
  const int b = threadIdx.x;  // batch <= 128 < kThreads
  const bool row = b < a.batch;
  const int q = row ? ps.quota[b] : 0, e = row ? ps.evicted[b] : 0;
  // Pops are planned here; pushes are appended and counted by stage 2 as it makes them.
  int admitted, pops;
  const int admit_base = block_exclusive_sum(q, scratch, admitted);
  const int pop_base = block_exclusive_sum(max(q - e, 0), scratch, pops);
  const int evicted = block_sum(e, scratch);
  if (row) {
    v.row_plan[b] = CacheRowPlan{.request = ps.request[b], .evict_from = ps.from[b], .quota = q, .evicted = e,
                                 .admit_base = admit_base, .pop_base = pop_base};
    v.row_ticket[b] = 0;
  }
  if (threadIdx.x == 0) {
    CacheScalars& sc = *v.scalars;
    const int free_count = sc.free_count, head = sc.free_head;
    const int taken = min(pops, free_count);  // budgets partition the pool: pops <= free slots
    if (pops > free_count) atomicCAS(&sc.error, 0, 2);
    sc.gather_count = admitted;
    sc.pops = taken;
    sc.pop_head = head;
    sc.push_tail = static_cast<int>((static_cast<long long>(head) + free_count) % v.slots);
    sc.free_head = static_cast<int>((static_cast<long long>(head) + taken) % v.slots);
    sc.free_count = free_count - taken;
    sc.pushed = 0;
    sc.any_evict = evicted > 0;
    sc.blocks_done = 0;  // stage 1's last-block count, reused by stage 2's
  }
  // Entries without a slot (only if the ring ran dry) stay -1: the gather skips them.
  for (int g = threadIdx.x; g < admitted; g += blockDim.x) v.gather_slot[g] = -1;
  if (admitted == 0) return;
  const int parts = a.batch * v.kv_heads * a.parts;
  int carry = 0;
  for (int p0 = 0; p0 < parts; p0 += blockDim.x) {
    const int p = p0 + threadIdx.x;
    const int m = p < parts ? __ldcg(v.part_misses + p) : 0;
    int total;
    const int ex = block_exclusive_sum(m, scratch, total);
    if (p < parts) v.part_start[p] = carry + ex;
    carry += total;
  }
}

// Stage 1: blocks [0, lookup_blocks) look up parts, the rest scan slots; the last to finish plans.
__global__ void __launch_bounds__(kThreads) CacheLookupPlanKernel(const __grid_constant__ CacheDeviceView v,
                                                                  const __grid_constant__ CacheCallArgs a,
                                                                  int lookup_blocks) {
  extern __shared__ int smem[];
  __shared__ int scratch[kWarp + 1];
  __shared__ bool last;
  if (static_cast<int>(blockIdx.x) < lookup_blocks) lookup_part(v, a, static_cast<int>(blockIdx.x), smem, scratch);
  else scan_slots(v, a, static_cast<int>(blockIdx.x) - lookup_blocks, smem);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&v.scalars->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  pdl_launch_dependents();
  if (!last) return;
  __threadfence();
  plan_call(v, a, scratch);
}

// Rank t of row `row`'s misses (segment, then position order) -> its key: the part holding it is
// the last of the row's parts whose start is <= the rank.
__device__ BlockKey miss_of_rank(const CacheDeviceView& v, const CacheCallArgs& a, int row, int t) {
  const int first = row * v.kv_heads * a.parts;
  const int target = v.part_start[first] + t;
  int lo = first, hi = first + v.kv_heads * a.parts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (v.part_start[mid] <= target) lo = mid;
    else hi = mid - 1;
  }
  const int s = lo / a.parts, x = lo % a.parts;
  const int cnt = a.selected_count[s];
  const int len = (cnt + a.parts - 1) / a.parts;
  return v.miss_key[a.selected_offset[s] + min(cnt, x * len) + (target - v.part_start[lo])];
}

__device__ void claim(const CacheDeviceView& v, const CacheCallArgs& a, const CacheRowPlan& plan, int row, int t,
                      int slot) {
  const BlockKey key = miss_of_rank(v, a, row, t);
  v.slot_key[slot] = key;
  v.slot_request[slot] = plan.request;
  v.slot_stamp[slot] = a.now;
  v.slot_pinned[slot] = 0;
  const int g = plan.admit_base + t;
  v.gather_page[g] = key / v.kv_heads;
  v.gather_head[g] = key % v.kv_heads;
  v.gather_slot[g] = slot;
  v.gather_key[g] = key;
}

// Stage 2: grid over slots (as the scan), then ring pops grid-stride.
__global__ void __launch_bounds__(kThreads) CacheEvictAdmitKernel(const __grid_constant__ CacheDeviceView v,
                                                                  const __grid_constant__ CacheCallArgs a) {
  extern __shared__ std::int8_t map[];  // [max_requests]
  __shared__ CacheRowPlan sh_plan[kMaxRows];
  // Before the wait: only state stage 1 does not write.
  build_row_map(v, a, map);
  int slot[kSlotsPerThread], owner[kSlotsPerThread];
  std::uint32_t stamp[kSlotsPerThread];
  BlockKey key[kSlotsPerThread];
  std::uint8_t pinned[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    slot[k] = slot_of_thread(static_cast<int>(blockIdx.x), k);
    owner[k] = slot[k] < v.slots ? v.slot_request[slot[k]] : -1;
  }
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const bool live = owner[k] >= 0;
    stamp[k] = live ? v.slot_stamp[slot[k]] : 0u;
    key[k] = live ? v.slot_key[slot[k]] : -1;
    pinned[k] = live ? v.slot_pinned[slot[k]] : std::uint8_t{1};
  }
  pdl_wait();
  const CacheScalars sc = *v.scalars;
  for (int b = threadIdx.x; b < a.batch; b += blockDim.x) sh_plan[b] = v.row_plan[b];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    if (owner[k] < 0) continue;
    if (v.slot_hit[slot[k]] == a.call_id) {  // hit by this call: used now, never evicted
      v.slot_stamp[slot[k]] = a.now;
      continue;
    }
    if (!sc.any_evict || pinned[k] || stamp[k] == a.now) continue;
    const int row = map[owner[k]];
    if (row < 0) continue;
    const CacheRowPlan& plan = sh_plan[row];
    if (cache_eviction_class(a.now - stamp[k], key[k], a.age_width) < plan.evict_from) continue;
    const int t = atomicAdd(&v.row_ticket[row], 1);
    if (t >= plan.evicted) continue;  // only if the plan's counts were off: never evict past them
    v.slot_of[key[k]] = -1;
    v.slot_key[slot[k]] = -1;
    v.slot_request[slot[k]] = -1;
    if (t < plan.quota) {
      claim(v, a, plan, row, t, slot[k]);
    } else {
      // Appended through a cursor, so the pushed range has no hole and the count is exact even
      // if a row finds fewer victims than planned (pushes go to the tail, pops come from the head).
      // One atomic per warp (the pushes of a whole old bucket can be thousands).
      const auto pushing = cooperative_groups::coalesced_threads();
      int at = 0;
      if (pushing.thread_rank() == 0) at = atomicAdd(&v.scalars->pushed, static_cast<int>(pushing.size()));
      at = pushing.shfl(at, 0) + static_cast<int>(pushing.thread_rank());
      v.free_ring[static_cast<int>((static_cast<long long>(sc.push_tail) + at) % v.slots)] = slot[k];
    }
  }
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < sc.pops; i += stride) {
    int lo = 0, hi = a.batch - 1;  // the last row whose pops start at or before i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (sh_plan[mid].pop_base <= i) lo = mid;
      else hi = mid - 1;
    }
    const CacheRowPlan& plan = sh_plan[lo];
    claim(v, a, plan, lo, plan.evicted + (i - plan.pop_base),
          v.free_ring[static_cast<int>((static_cast<long long>(sc.pop_head) + i) % v.slots)]);
  }
  // Stage 1 of the next call accumulates into zeroed histograms and counters.
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < a.batch * (kClasses + kAccFields);
       i += stride) {
    if (i < a.batch * kClasses) v.row_hist[i] = 0;
    else v.row_acc[i - a.batch * kClasses] = 0;
  }
  // The last block commits what was done: pushes actually written into the ring count, and for a
  // row that found fewer victims than planned (tickets < evicted: the plan's histogram counted a
  // block stage 2 did not evict), its use count and counters follow the evictions and claims made.
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&v.scalars->blocks_done, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int b = threadIdx.x; b < a.batch; b += blockDim.x) {
    const CacheRowPlan& plan = sh_plan[b];
    if (plan.request < 0 || plan.evicted == 0) continue;
    const int found = min(__ldcg(v.row_ticket + b), plan.evicted);
    if (found == plan.evicted) continue;
    const int missing = plan.evicted - found;                                     // not evicted
    const int unclaimed = min(plan.evicted, plan.quota) - min(found, plan.quota);  // not admitted
    atomicAdd(v.used + plan.request, missing - unclaimed);
    atomicAdd(&v.scalars->shortfall, missing);
    v.request_stats[plan.request].counters.evicted -= missing;
    v.request_stats[plan.request].counters.admitted -= unclaimed;
    v.request_stats[plan.request].counters.pcie_bytes -= static_cast<std::int64_t>(unclaimed) * v.block_bytes;
    add64(&v.step_stats->counters.evicted, -missing);
    add64(&v.step_stats->counters.admitted, -unclaimed);
    add64(&v.step_stats->counters.pcie_bytes, -static_cast<std::int64_t>(unclaimed) * v.block_bytes);
  }
  if (threadIdx.x == 0) {
    atomicAdd(&v.scalars->free_count, __ldcg(&v.scalars->pushed));
    v.scalars->blocks_done = 0;
  }
}

__global__ void CacheScatterKernel(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) slot_of[keys[i]] = values[i];
}

int slot_blocks(const CacheDeviceView& v) {
  constexpr int per_block = kThreads * kSlotsPerThread;
  return (v.slots + per_block - 1) / per_block;
}

std::size_t lookup_plan_smem(const CacheDeviceView& v, int batch) {
  const std::size_t scan = static_cast<std::size_t>(batch) * (kClasses + 1) * sizeof(int) +
                           static_cast<std::size_t>(v.max_requests);
  return std::max(scan, kClasses * sizeof(int));
}

}  // namespace

int cache_lookup_parts(int capacity, int segments, int max_parts) noexcept {
  if (segments <= 0) return 1;
  const long long per_segment = (static_cast<long long>(capacity) + segments - 1) / segments;
  const long long parts = (per_segment + kThreads - 1) / kThreads;
  return static_cast<int>(std::clamp<long long>(parts, 1, std::max(max_parts, 1)));
}

void launch_cache_lookup_plan(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  const std::size_t smem = lookup_plan_smem(v, a.batch);
  if (smem > 48 * 1024) {  // more than ~37 rows: opt in to the larger shared memory once (Hopper: 227 KB)
    static const bool opted = [] {
      int device = 0, optin = 0;
      HATTN_CUDA_CHECK(cudaGetDevice(&device));
      HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      HATTN_CUDA_CHECK(cudaFuncSetAttribute(CacheLookupPlanKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            optin - 4096));  // room for the static shared memory
      return true;
    }();
    (void)opted;
  }
  const int lookup_blocks = a.batch * v.kv_heads * a.parts;
  CacheLookupPlanKernel<<<lookup_blocks + slot_blocks(v), kThreads, smem, stream>>>(v, a, lookup_blocks);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_evict_admit(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(slot_blocks(v)));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<std::size_t>(v.max_requests);
  config.stream = reinterpret_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  HATTN_CUDA_CHECK(cudaLaunchKernelEx(&config, CacheEvictAdmitKernel, v, a));
}

void launch_cache_scatter(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n,
                          cuda::Stream stream) {
  if (n <= 0) return;
  CacheScatterKernel<<<(n + 255) / 256, 256, 0, stream>>>(slot_of, keys, values, n);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::detail
