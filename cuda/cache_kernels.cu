// The HBM page cache's step on the GPU (kv/DeviceKVCache, DESIGN.md step 7) in two kernels:
//   1. lookup beside the age-histogram scan of every slot; the last block to finish commits the
//      previous call's evictions and plans each row;
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
//
// Why the code is shaped around round trips: the work is small (8K lookups, 100K slots) and the
// time is latency. Phase marks at 100K slots on an H100 (issue 6, 2026-11-23) showed chains of
// dependent loads of ~0.4 us each (the lookup had nine, the plan over twenty) and a few hundred
// instructions per warp in the scan. So each stage issues its independent loads together before it
// uses any, the plan gets all of its inputs in one round, and the eviction kernel ends with its
// stores: its pushes are committed by the next plan (CacheScalars::uncommitted_rows) instead of by
// a last block of its own, which cost a fence, a count and two more round trips.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "detail/block_scan.cuh"
#include "detail/launch_check.cuh"
#include "detail/pdl.cuh"
#include "detail/phase_marks.cuh"
#include "hattn/kv/device_kv_cache_kernels.hpp"

namespace hattn::detail {
namespace {

using cuda::detail::block_exclusive_sum;
using cuda::detail::kWarp;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kSlotsPerThread = 4;  // 100K slots -> 98 blocks: one wave on an H100's 132 SMs
constexpr int kClasses = kCacheEvictionClasses;
constexpr int kMaxRows = 128;       // DeviceKVCacheConfig::max_batch bound
// Stage 2 searches the parts' miss starts in shared memory up to this many parts (8 KB for the two
// arrays, so with the byte-per-request row map it stays under the default 48 KB); beyond, the same
// search reads them from global memory.
constexpr int kSharedParts = 1024;
// Histogram values each plan thread loads per round: 19 for 16 rows, so one round up to 20 rows.
constexpr int kPlanLoads = 20;
constexpr unsigned kAllLanes = 0xffffffffu;
enum : int { kAccHits, kAccMisses, kAccBypass, kAccFresh, kAccFields };
static_assert(kMaxRows <= kThreads, "the plan gives each row a thread");

// Programmatic dependent launch (detail/pdl.cuh): stage 2's blocks start and load what stage 1
// does not write while stage 1 runs; `pdl_wait` returns once stage 1 is complete and visible.
using cuda::detail::pdl_launch_dependents;
using cuda::detail::pdl_wait;

// Profiling only (CacheCallArgs::phase_ns): thread 0 of a block records a phase mark; the
// barrier makes it the block's, not one thread's.
__device__ __forceinline__ void mark_phase(const CacheCallArgs& a, int phase, bool sync = true) {
  if (a.phase_ns == nullptr) return;
  if (sync) __syncthreads();
  if (cache_phase_is_min(phase)) cuda::detail::mark_earliest(a.phase_ns, phase);
  else cuda::detail::mark_latest(a.phase_ns, phase);
}

__device__ __forceinline__ unsigned lanes_below() {
  unsigned m;
  asm("mov.u32 %0, %%lanemask_lt;" : "=r"(m));
  return m;
}

__device__ __forceinline__ void add64(std::int64_t* p, std::int64_t v) {
  if (v != 0) atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(v));
}

// cache_eviction_class (cache_policy.hpp) with the log2 of an age from one count of leading zeros:
// the host function's bit loop was a quarter of stage 1's instructions at 100K slots (ncu, issue
// 6). Any difference would show as a different victim in the GPU tests' model comparison.
__device__ __forceinline__ int eviction_class(std::uint32_t age, BlockKey key, std::uint32_t width) {
  static_assert(kCacheSubBuckets == 16, "the key hash keeps its top 4 bits");
  const std::uint32_t a = (width == 1 ? age : (age + width - 1) / width) - 1;
  int bucket = static_cast<int>(a);
  if (a >= 16) {
    const int e = 31 - __clz(static_cast<int>(a));
    bucket = min(16 + (e - 4) * 4 + static_cast<int>((a >> (e - 2)) & 3u), kCacheAgeBuckets - 1);
  }
  if (bucket >= kCacheRecentBuckets) return kCacheRecentBuckets * kCacheSubBuckets + (bucket - kCacheRecentBuckets);
  return bucket * kCacheSubBuckets + static_cast<int>((static_cast<std::uint32_t>(key) * 0x9E3779B1u) >> 28);
}

// Position `offset` past `base` in the free ring of `slots` entries, for base < slots and offset
// <= slots (a call pushes or pops each slot at most once): a compare and a subtract where a 64-bit
// `%` by a run-time value is a long dependent sequence at the end of every pushing thread's chain.
__device__ __forceinline__ int ring_at(int base, int offset, int slots) {
  const int i = base + offset;  // < 2 slots <= 2^31 (CacheShape::validate bounds slots by 2^30)
  return i >= slots ? i - slots : i;
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

// Rank of each flagged thread among the block's flagged threads in thread order, and their count:
// two barriers where a block prefix sum takes three.
__device__ __forceinline__ int block_rank(bool flag, int* warp_counts, int& total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const unsigned ballot = __ballot_sync(kAllLanes, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  int before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int c = warp_counts[w];
    before += w < warp ? c : 0;
    total += c;
  }
  __syncthreads();
  return before + __popc(ballot & lanes_below());
}

// Stage 1, lookup part p = s * parts + x: entries [x * L, (x + 1) * L) of segment s, L = ceil(count
// / parts). Hits are marked (not restamped: the scan beside reads stamps) and moved from their age
// class to `fresh` in the row's histogram; misses are compacted in position order. The first part
// of a row also copies the row's request values for the plan and counts the request's step.
__device__ void lookup_part(const CacheDeviceView& v, const CacheCallArgs& a, int p, int* warp_counts) {
  const int s = p / a.parts, x = p - s * a.parts;
  const int b = s / v.kv_heads, h = s - b * v.kv_heads;
  // Loads that need no other go first: a lookup is a chain of dependent round trips (selected ->
  // page table -> slot_of -> slot), so the row's request and budget ride beside the first ones.
  const int r = a.request_of_row[b];
  const int base = a.page_indptr[b];
  const int last = a.page_indptr[b + 1] - base - 1;
  const int off = a.selected_offset[s], cnt = a.selected_count[s];
  const int len = (cnt + a.parts - 1) / a.parts;
  const int begin = min(cnt, x * len), end = min(cnt, begin + len);
  int pos = begin + static_cast<int>(threadIdx.x) < end ? a.selected[off + begin + threadIdx.x] : -1;
  const bool valid = open_request(v, r);
  if (threadIdx.x == 0 && x == 0 && h == 0) {
    if (!valid) {
      if (atomicCAS(&v.scalars->error, 0, 1) == 0) {
        v.scalars->error_row = b;
        v.scalars->error_value = r;
      }
      v.row_info[b] = CacheRowInfo{};
    } else {
      v.row_info[b] = CacheRowInfo{.request = r, .budget = v.budget[r], .pinned = v.pinned[r], .used = v.used[r]};
      DeviceRequestCounters& rc = v.request_stats[r];
      if (rc.last_step != a.step) {  // rows name distinct requests: this thread is its only writer
        rc.last_step = a.step;
        ++rc.steps;
      }
    }
  }
  if (!valid) {
    if (threadIdx.x == 0) v.part_misses[p] = 0, v.part_base[p] = 0;
    return;
  }
  int* row_hist = v.row_hist + b * kClasses;
  int hits = 0, bypass = 0, fresh = 0, missed = 0;
  for (int i0 = begin; i0 < end; i0 += kThreads) {
    const int i = i0 + static_cast<int>(threadIdx.x);
    if (i0 != begin) pos = i < end ? a.selected[off + i] : -1;
    int miss = 0;
    BlockKey key = -1;
    if (i < end) {
      if (pos == last) {
        ++bypass;  // the page still being appended to is never cached
      } else {
        key = a.page_table[base + pos] * v.kv_heads + h;
        const int slot = v.slot_of[key];
        miss = 1;
        if (slot >= 0) {
          const BlockKey held = v.slot_key[slot];
          const std::uint8_t pinned = v.slot_pinned[slot];
          const std::uint32_t stamp = v.slot_stamp[slot];
          // A hit only if the slot still holds the key: a stale map entry would otherwise move the
          // slot's block out of the class of the key looked up instead of its own, the histogram
          // would then disagree with the eviction scan and a planned victim would not be found.
          // Taken as a miss instead, the key is admitted again and the gather rewrites its entry.
          if (held == key) {
            miss = 0;
            ++hits;
            v.slot_hit[slot] = a.call_id;
            if (!pinned && stamp != a.now) {  // the scan counts it in its old class: move it to fresh
              ++fresh;
              atomicSub(row_hist + eviction_class(a.now - stamp, key, a.age_width), 1);
            }
          }
        }
      }
    }
    int total;
    const int rank = block_rank(miss, warp_counts, total);
    if (miss) v.miss_key[off + begin + missed + rank] = key;
    missed += total;
  }
  // Warp totals straight to the row: no block-wide sums (each cost three barriers).
  hits = __reduce_add_sync(kAllLanes, hits);
  bypass = __reduce_add_sync(kAllLanes, bypass);
  fresh = __reduce_add_sync(kAllLanes, fresh);
  int* acc = v.row_acc + b * kAccFields;
  if (threadIdx.x % kWarp == 0) {
    if (hits) atomicAdd(acc + kAccHits, hits);
    if (bypass) atomicAdd(acc + kAccBypass, bypass);
    if (fresh) atomicAdd(acc + kAccFresh, fresh);
  }
  if (threadIdx.x == 0) {
    v.part_misses[p] = missed;
    v.part_base[p] = off + begin;
    if (missed) atomicAdd(acc + kAccMisses, missed);
  }
}

// Stage 1, slot scan: per row of the call, unpinned blocks of its request used this call (stamp
// now) and the others by eviction class, in shared memory, then added to the global histograms.
__device__ void scan_slots(const CacheDeviceView& v, const CacheCallArgs& a, int q, int* smem) {
  int* sh_hist = smem;                        // [batch][kClasses]
  int* sh_fresh = smem + a.batch * kClasses;  // [batch]
  auto* map = reinterpret_cast<std::int8_t*>(sh_fresh + a.batch);
  // The slots' loads first, one round trip for all of them, beside the row map's two.
  int slot[kSlotsPerThread], owner[kSlotsPerThread];
  std::uint32_t stamp[kSlotsPerThread];
  BlockKey key[kSlotsPerThread];
  std::uint8_t pinned[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    slot[k] = slot_of_thread(q, k);
    const bool in = slot[k] < v.slots;
    owner[k] = in ? v.slot_request[slot[k]] : -1;
    stamp[k] = in ? v.slot_stamp[slot[k]] : 0u;
    key[k] = in ? v.slot_key[slot[k]] : -1;
    pinned[k] = in ? v.slot_pinned[slot[k]] : std::uint8_t{1};
  }
  for (int i = threadIdx.x; i < a.batch * (kClasses + 1); i += blockDim.x) smem[i] = 0;
  build_row_map(v, a, map);
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const int row = owner[k] >= 0 ? map[owner[k]] : -1;
    if (row < 0 || pinned[k]) continue;
    if (stamp[k] == a.now) atomicAdd(&sh_fresh[row], 1);
    else atomicAdd(&sh_hist[row * kClasses + eviction_class(a.now - stamp[k], key[k], a.age_width)], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < a.batch * (kClasses + 1); i += blockDim.x)
    if (smem[i] != 0) {
      if (i < a.batch * kClasses) atomicAdd(&v.row_hist[i], smem[i]);
      else atomicAdd(&v.row_acc[(i - a.batch * kClasses) * kAccFields + kAccFresh], smem[i]);
    }
}

// A row plan written by an earlier kernel or block, read through L2.
__device__ __forceinline__ CacheRowPlan load_plan(const CacheRowPlan* p) {
  return CacheRowPlan{.request = __ldcg(&p->request), .evict_from = __ldcg(&p->evict_from), .quota = __ldcg(&p->quota),
                      .evicted = __ldcg(&p->evicted), .admit_base = __ldcg(&p->admit_base),
                      .pop_base = __ldcg(&p->pop_base)};
}

// The use-count correction of one row of the latest call if its eviction found fewer victims than
// planned (tickets < evicted: the plan's histogram counted a block stage 2 did not evict), with its
// counters following the evictions and claims made; 0 for a healthy row.
__device__ int commit_row(const CacheDeviceView& v, const CacheRowPlan& plan, int tickets) {
  if (plan.request < 0 || plan.evicted == 0) return 0;
  const int found = min(tickets, plan.evicted);
  if (found == plan.evicted) return 0;
  const int missing = plan.evicted - found;                                     // not evicted
  const int unclaimed = min(plan.evicted, plan.quota) - min(found, plan.quota);  // not admitted
  const std::int64_t bytes = static_cast<std::int64_t>(unclaimed) * v.block_bytes;
  atomicAdd(v.used + plan.request, missing - unclaimed);
  atomicAdd(&v.scalars->shortfall, missing);
  CacheCounters& rc = v.request_stats[plan.request].counters;
  add64(&rc.evicted, -missing);
  add64(&rc.admitted, -unclaimed);
  add64(&rc.pcie_bytes, -bytes);
  add64(&v.step_stats->counters.evicted, -missing);
  add64(&v.step_stats->counters.admitted, -unclaimed);
  add64(&v.step_stats->counters.pcie_bytes, -bytes);
  return missing - unclaimed;
}

struct PlanShared {
  int request[kMaxRows], admit[kMaxRows], need[kMaxRows], from[kMaxRows], evicted[kMaxRows];
  int fix_request[kMaxRows], fix_used[kMaxRows];  // the previous call's short rows
  int totals[5];                                  // hits, misses, bypass, admitted, evicted
  int free_count, free_head, prev_rows;
  std::uint32_t stats_step;
};

// The last block of stage 1. One round of loads brings everything in (the histograms into shared
// memory, the rows' totals and request values, the ring, the previous call's rows); the previous
// call is committed, every row planned in shared memory, and the results written once.
__device__ void plan_call(const CacheDeviceView& v, const CacheCallArgs& a, int* smem, int* scratch) {
  __shared__ PlanShared ps;
  const int t = static_cast<int>(threadIdx.x), lane = t % kWarp, warp = t / kWarp;
  const int batch = a.batch;
  const int parts = batch * v.kv_heads * a.parts;
  const bool row = t < batch;

  // ---- the one round of loads
  CacheRowInfo info{};
  int acc[kAccFields] = {};
  if (row) {
    info = CacheRowInfo{.request = __ldcg(&v.row_info[t].request), .budget = __ldcg(&v.row_info[t].budget),
                        .pinned = __ldcg(&v.row_info[t].pinned), .used = __ldcg(&v.row_info[t].used)};
#pragma unroll
    for (int f = 0; f < kAccFields; ++f) acc[f] = __ldcg(v.row_acc + t * kAccFields + f);
  }
  CacheRowPlan prev{};
  int prev_tickets = 0;
  if (t < v.max_batch) {  // whether they are the previous call's rows is known once the scalars are in
    prev = load_plan(v.row_plan + t);
    prev_tickets = __ldcg(v.row_ticket + t);
  }
  const int misses_first = t < parts ? __ldcg(v.part_misses + t) : 0;
  // Every thread loads the scalars (one L2 line) instead of thread 0 alone: thread 0's loads would
  // otherwise hold warp 0, and the barrier after it the block, for a round trip of their own.
  const CacheScalars& sc = *v.scalars;
  const int sc_rows = __ldcg(&sc.uncommitted_rows), sc_free = __ldcg(&sc.free_count);
  const int sc_pushed = __ldcg(&sc.pushed), sc_head = __ldcg(&sc.free_head);
  const std::uint32_t sc_step = __ldcg(&v.step_stats->step);
  if (t < 5) ps.totals[t] = 0;
  int* hist = smem;  // [batch][kClasses], staged so the warps' threshold searches read shared memory
  const int hist_n = batch * kClasses;
  for (int i0 = 0; i0 < hist_n; i0 += kPlanLoads * kThreads) {
    int val[kPlanLoads];
#pragma unroll
    for (int j = 0; j < kPlanLoads; ++j) {
      const int i = i0 + j * kThreads + t;
      val[j] = i < hist_n ? __ldcg(v.row_hist + i) : 0;
    }
#pragma unroll
    for (int j = 0; j < kPlanLoads; ++j)
      if (const int i = i0 + j * kThreads + t; i < hist_n) hist[i] = val[j];
  }
  if (t == 0) {
    ps.free_count = sc_free + (sc_rows > 0 ? sc_pushed : 0);
    ps.free_head = sc_head;
    ps.prev_rows = sc_rows;
    ps.stats_step = sc_step;
  }
  __syncthreads();

  // ---- commit of the previous call (its ring pushes; short rows, expected none)
  int fix = 0;
  if (t < sc_rows) fix = commit_row(v, prev, prev_tickets);
  ps.fix_request[t % kMaxRows] = -1;
  __syncthreads();
  if (fix != 0) ps.fix_request[t] = prev.request, ps.fix_used[t] = fix;
  const bool any_fix = __syncthreads_or(fix != 0);
  mark_phase(a, kPhasePlanLoaded, false);

  // ---- per row: quota and how many blocks must go
  if (row) {
    const bool valid = info.request >= 0;
    int used = info.used;  // read by the lookup before this commit: add what the commit changed
    if (any_fix)
      for (int k = 0; k < ps.prev_rows; ++k)
        if (ps.fix_request[k] == info.request) used += ps.fix_used[k];
    const int room = max(info.budget - info.pinned - acc[kAccFresh], 0);
    const int admit = valid ? min(acc[kAccMisses], room) : 0;
    ps.request[t] = valid ? info.request : -1;
    ps.admit[t] = admit;
    ps.need[t] = valid ? used + admit - info.budget : 0;
  }
  __syncthreads();

  // ---- per row, one warp: the threshold is the largest class c with (blocks in classes >= c) >=
  // need. Each lane sums ten classes, a warp scan finds the lane holding the threshold, and that
  // lane walks its ten.
  for (int b = warp; b < batch; b += kWarps) {
    const int need = ps.need[b];
    int from = kClasses, evicted = 0;
    if (need > 0) {
      const int* hb = hist + b * kClasses;
      constexpr int kPerLane = (kClasses + kWarp - 1) / kWarp;
      const int hi = max(kClasses - lane * kPerLane, 0);  // lane 0 holds the oldest classes
      int count[kPerLane];  // count[j] = class hi - 1 - j; fixed-size so the loads go out together
      int sum = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        count[j] = hi - 1 - j >= 0 ? hb[hi - 1 - j] : 0;
        sum += count[j];
      }
      const int incl = cuda::detail::warp_inclusive_sum(sum);
      const unsigned enough = __ballot_sync(kAllLanes, incl >= need);
      if (enough == 0) {
        from = 0;
        evicted = __shfl_sync(kAllLanes, incl, kWarp - 1);
      } else {
        const int owner = __ffs(enough) - 1;
        int acc_sum = incl - sum, c = hi;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j)
          if (acc_sum < need) acc_sum += count[j], --c;
        from = __shfl_sync(kAllLanes, c, owner);
        evicted = __shfl_sync(kAllLanes, acc_sum, owner);
      }
    }
    if (lane == 0) ps.from[b] = from, ps.evicted[b] = evicted;
  }
  __syncthreads();

  // ---- per row: use count, counters; then the layout of stage 2
  const int q = row ? ps.admit[t] : 0, e = row ? ps.evicted[t] : 0;
  if (row && ps.request[t] >= 0) {
    const int r = ps.request[t];
    atomicAdd(v.used + r, q - e);
    CacheCounters& rc = v.request_stats[r].counters;
    add64(&rc.hits, acc[kAccHits]);
    add64(&rc.misses, acc[kAccMisses]);
    add64(&rc.bypass, acc[kAccBypass]);
    add64(&rc.admitted, q);
    add64(&rc.evicted, e);
    add64(&rc.pcie_bytes, static_cast<std::int64_t>(q) * v.block_bytes);
    const int sums[5] = {acc[kAccHits], acc[kAccMisses], acc[kAccBypass], q, e};
#pragma unroll
    for (int f = 0; f < 5; ++f)
      if (sums[f]) atomicAdd(&ps.totals[f], sums[f]);
  }
  // Pops are planned here; pushes are appended by stage 2 and counted by the next commit.
  int admitted, pops;
  const int admit_base = block_exclusive_sum(q, scratch, admitted);
  const int pop_base = block_exclusive_sum(max(q - e, 0), scratch, pops);
  const bool any_evict = __syncthreads_or(e > 0);
  if (row) {
    v.row_plan[t] = CacheRowPlan{.request = ps.request[t], .evict_from = ps.from[t], .quota = q, .evicted = e,
                                 .admit_base = admit_base, .pop_base = pop_base};
    v.row_ticket[t] = 0;
  }
  if (t == 0) {
    CacheScalars& sc = *v.scalars;
    const int free_count = ps.free_count, head = ps.free_head;
    const int taken = min(pops, free_count);  // budgets partition the pool: pops <= free slots
    if (pops > free_count) atomicCAS(&sc.error, 0, 2);
    sc.gather_count = admitted;
    sc.pops = taken;
    sc.pop_head = head;
    sc.push_tail = ring_at(head, free_count, v.slots);
    sc.free_head = ring_at(head, taken, v.slots);
    sc.free_count = free_count - taken;
    sc.pushed = 0;
    sc.uncommitted_rows = batch;
    sc.any_evict = any_evict;
    sc.blocks_done = 0;  // for the next call's stage 1
    CacheStepStats& st = *v.step_stats;
    const std::int64_t totals[6] = {ps.totals[0], ps.totals[1], ps.totals[2], ps.totals[3], ps.totals[4],
                                    static_cast<std::int64_t>(ps.totals[3]) * v.block_bytes};
    if (ps.stats_step != a.step) {  // the first call of a step starts its totals
      st.step = a.step;
      st.counters = CacheCounters{.hits = totals[0], .misses = totals[1], .bypass = totals[2],
                                  .admitted = totals[3], .evicted = totals[4], .pcie_bytes = totals[5]};
    } else {
      add64(&st.counters.hits, totals[0]);
      add64(&st.counters.misses, totals[1]);
      add64(&st.counters.bypass, totals[2]);
      add64(&st.counters.admitted, totals[3]);
      add64(&st.counters.evicted, totals[4]);
      add64(&st.counters.pcie_bytes, totals[5]);
    }
  }
  // Entries without a slot (only if the ring ran dry or a row found fewer victims) stay -1: the
  // gather skips them.
  for (int g = t; g < admitted; g += kThreads) v.gather_slot[g] = -1;
  if (admitted == 0) return;
  int carry = 0;
  for (int p0 = 0; p0 < parts; p0 += kThreads) {
    const int p = p0 + t;
    const int m = p0 == 0 ? misses_first : (p < parts ? __ldcg(v.part_misses + p) : 0);
    int total;
    const int ex = block_exclusive_sum(m, scratch, total);
    if (p < parts) v.part_start[p] = carry + ex;
    carry += total;
  }
}

// Stage 1: the first blocks scan slots, the last `lookup_blocks` look up parts; the last block to
// finish plans. Block order does not matter measurably: with the scans first (the longer chain)
// they still ended at 6.9 us against 6.6 us with the lookups first (H100, 100K slots, 2026-11-23).
__global__ void __launch_bounds__(kThreads) CacheLookupPlanKernel(const __grid_constant__ CacheDeviceView v,
                                                                  const __grid_constant__ CacheCallArgs a,
                                                                  int lookup_blocks) {
  extern __shared__ int smem[];
  __shared__ int scratch[kWarp + 1];
  __shared__ bool last;
  mark_phase(a, kPhaseLookupStart, false);
  // Stage 2 may be scheduled now: its blocks read only what this kernel does not write until they
  // reach their wait, and they fit beside this grid (324 blocks of 256 threads at 100K slots).
  pdl_launch_dependents();
  const int scan_blocks = static_cast<int>(gridDim.x) - lookup_blocks;
  const bool lookup = static_cast<int>(blockIdx.x) >= scan_blocks;
  if (lookup) lookup_part(v, a, static_cast<int>(blockIdx.x) - scan_blocks, scratch);
  else scan_slots(v, a, static_cast<int>(blockIdx.x), smem);
  mark_phase(a, lookup ? kPhaseLookupDone : kPhaseScanDone);
  // One thread fences and counts for the block after the barrier (as cooperative groups' grid sync
  // does), instead of every thread waiting on a fence of its own.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&v.scalars->blocks_done, 1u) == gridDim.x - 1;
    if (last) __threadfence();
  }
  __syncthreads();
  if (!last) return;
  mark_phase(a, kPhasePlanBegin, false);
  plan_call(v, a, smem, scratch);
  mark_phase(a, kPhasePlanEnd);
}

// Rank t of row `row`'s misses (segment, then position order) -> its key: the part holding it is
// the last of the row's parts whose start is <= the rank. `starts`/`bases` are shared or global.
__device__ __forceinline__ BlockKey miss_of_rank(const CacheDeviceView& v, const CacheCallArgs& a, const int* starts,
                                                 const int* bases, int row, int t) {
  const int first = row * v.kv_heads * a.parts;
  const int target = starts[first] + t;
  int lo = first, hi = first + v.kv_heads * a.parts - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= target) lo = mid;
    else hi = mid - 1;
  }
  return v.miss_key[bases[lo] + (target - starts[lo])];
}

__device__ __forceinline__ void claim(const CacheDeviceView& v, const CacheCallArgs& a, const CacheRowPlan& plan,
                                      int t, int slot, BlockKey key) {
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

// Tickets of evicting threads in their rows, one atomic per row present in a warp (a whole old
// class of one request can be tens of thousands of blocks: one counter took them one by one), the
// atomics of all of a thread's slots in flight together. Every lane of the warp must call it.
__device__ __forceinline__ void take_tickets(const int (&row)[kSlotsPerThread], int (&ticket)[kSlotsPerThread],
                                             int* tickets) {
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  unsigned takers[kSlotsPerThread], peers[kSlotsPerThread];
  int leader[kSlotsPerThread], first[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    takers[k] = __ballot_sync(kAllLanes, row[k] >= 0);
    peers[k] = 0, leader[k] = 0, first[k] = 0;
    if (row[k] < 0) continue;
    peers[k] = __match_any_sync(takers[k], row[k]);
    leader[k] = __ffs(peers[k]) - 1;
    if (lane == leader[k]) first[k] = atomicAdd(tickets + row[k], __popc(peers[k]));
  }
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    ticket[k] = -1;
    if (row[k] < 0) continue;
    ticket[k] = __shfl_sync(takers[k], first[k], leader[k]) + __popc(peers[k] & lanes_below());
  }
}

// Stage 2: grid over slots (as the scan), then ring pops grid-stride. `shared_parts`: parts whose
// miss starts are staged in shared memory (0: read from global memory).
__global__ void __launch_bounds__(kThreads) CacheEvictAdmitKernel(const __grid_constant__ CacheDeviceView v,
                                                                  const __grid_constant__ CacheCallArgs a,
                                                                  int shared_parts) {
  extern __shared__ int smem[];  // [shared_parts] starts, [shared_parts] bases, [max_requests] row map bytes
  __shared__ CacheRowPlan sh_plan[kMaxRows];
  int* sh_start = smem;
  int* sh_base = smem + shared_parts;
  auto* map = reinterpret_cast<std::int8_t*>(smem + 2 * shared_parts);
  mark_phase(a, kPhaseEvictStart, false);
  // Before the wait: only state stage 1 does not write.
  int slot[kSlotsPerThread], owner[kSlotsPerThread];
  std::uint32_t stamp[kSlotsPerThread];
  BlockKey key[kSlotsPerThread];
  std::uint8_t pinned[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    slot[k] = slot_of_thread(static_cast<int>(blockIdx.x), k);
    const bool in = slot[k] < v.slots;
    owner[k] = in ? v.slot_request[slot[k]] : -1;
    stamp[k] = in ? v.slot_stamp[slot[k]] : 0u;
    key[k] = in ? v.slot_key[slot[k]] : -1;
    pinned[k] = in ? v.slot_pinned[slot[k]] : std::uint8_t{1};
  }
  build_row_map(v, a, map);
  pdl_wait();
  mark_phase(a, kPhaseEvictWaited, false);
  // One round of loads of what stage 1 wrote.
  const bool any_evict = __ldcg(&v.scalars->any_evict) != 0;
  const int pops = __ldcg(&v.scalars->pops), pop_head = __ldcg(&v.scalars->pop_head);
  const int push_tail = __ldcg(&v.scalars->push_tail);
  std::uint32_t hit[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) hit[k] = owner[k] >= 0 ? __ldcg(v.slot_hit + slot[k]) : 0u;
  for (int b = threadIdx.x; b < a.batch; b += blockDim.x) sh_plan[b] = load_plan(v.row_plan + b);
  for (int i = threadIdx.x; i < shared_parts; i += blockDim.x) {
    sh_start[i] = __ldcg(v.part_start + i);
    sh_base[i] = __ldcg(v.part_base + i);
  }
  __syncthreads();
  const int* starts = shared_parts > 0 ? sh_start : v.part_start;
  const int* bases = shared_parts > 0 ? sh_base : v.part_base;

  int row[kSlotsPerThread], ticket[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    row[k] = -1;
    if (owner[k] < 0) continue;
    if (hit[k] == a.call_id) {  // hit by this call: used now, never evicted
      v.slot_stamp[slot[k]] = a.now;
      continue;
    }
    if (!any_evict || pinned[k] || stamp[k] == a.now) continue;
    const int r = map[owner[k]];
    if (r >= 0 && eviction_class(a.now - stamp[k], key[k], a.age_width) >= sh_plan[r].evict_from) row[k] = r;
  }
  take_tickets(row, ticket, v.row_ticket);
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k)  // only if the plan's counts were off: never evict past them
    if (row[k] >= 0 && ticket[k] >= sh_plan[row[k]].evicted) row[k] = -1;
  // The admissions' keys first (their loads together), then the stores.
  BlockKey admit_key[kSlotsPerThread];
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k)
    admit_key[k] = row[k] >= 0 && ticket[k] < sh_plan[row[k]].quota
                       ? miss_of_rank(v, a, starts, bases, row[k], ticket[k])
                       : -1;
#pragma unroll
  for (int k = 0; k < kSlotsPerThread; ++k) {
    const bool push = row[k] >= 0 && admit_key[k] < 0;
    if (row[k] >= 0) {
      v.slot_of[key[k]] = -1;
      if (push) {
        v.slot_key[slot[k]] = -1;
        v.slot_request[slot[k]] = -1;
      } else {
        claim(v, a, sh_plan[row[k]], ticket[k], slot[k], admit_key[k]);
      }
    }
    // Appended through a cursor, so the pushed range has no hole and the count is exact even if a
    // row finds fewer victims than planned (pushes go to the tail, pops come from the head); one
    // atomic per warp (the pushes of a whole old bucket can be thousands).
    const unsigned pushing = __ballot_sync(kAllLanes, push);
    if (pushing == 0) continue;
    const int lane = static_cast<int>(threadIdx.x % kWarp), leader = __ffs(pushing) - 1;
    int at = 0;
    if (lane == leader) at = atomicAdd(&v.scalars->pushed, __popc(pushing));
    at = __shfl_sync(kAllLanes, at, leader) + __popc(pushing & lanes_below());
    if (push) v.free_ring[ring_at(push_tail, at, v.slots)] = slot[k];
  }
  mark_phase(a, kPhaseEvictDone);
  const int stride = static_cast<int>(gridDim.x * blockDim.x);
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < pops; i += stride) {
    int lo = 0, hi = a.batch - 1;  // the last row whose pops start at or before i
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (sh_plan[mid].pop_base <= i) lo = mid;
      else hi = mid - 1;
    }
    const CacheRowPlan& plan = sh_plan[lo];
    const int t = plan.evicted + (i - plan.pop_base);
    const int free_slot = v.free_ring[ring_at(pop_head, i, v.slots)];
    claim(v, a, plan, t, free_slot, miss_of_rank(v, a, starts, bases, lo, t));
  }
  // Stage 1 of the next call accumulates into zeroed histograms and counters.
  for (int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x); i < a.batch * (kClasses + kAccFields);
       i += stride) {
    if (i < a.batch * kClasses) v.row_hist[i] = 0;
    else v.row_acc[i - a.batch * kClasses] = 0;
  }
  mark_phase(a, kPhaseClaimsDone);
}

// The host's commit of the latest call (DeviceKVCache::synchronize): the same as the next plan's.
__global__ void __launch_bounds__(kMaxRows) CacheCommitKernel(const __grid_constant__ CacheDeviceView v) {
  const int rows = v.scalars->uncommitted_rows;
  if (rows == 0) return;
  const int t = static_cast<int>(threadIdx.x);
  if (t < rows) commit_row(v, load_plan(v.row_plan + t), __ldcg(v.row_ticket + t));
  __syncthreads();
  if (t == 0) {
    v.scalars->free_count += v.scalars->pushed;
    v.scalars->pushed = 0;
    v.scalars->uncommitted_rows = 0;
  }
}

__global__ void CacheEmptyKernel() { pdl_launch_dependents(); }
__global__ void CacheEmptyDependentKernel() { pdl_wait(); }

__global__ void CacheScatterKernel(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) slot_of[keys[i]] = values[i];
}

int slot_blocks(const CacheDeviceView& v) {
  constexpr int per_block = kThreads * kSlotsPerThread;
  return (v.slots + per_block - 1) / per_block;
}

// The scan's histograms and row map; the plan reuses the histogram part.
std::size_t lookup_plan_smem(const CacheDeviceView& v, int batch) {
  return static_cast<std::size_t>(batch) * (kClasses + 1) * sizeof(int) + static_cast<std::size_t>(v.max_requests);
}

template <class Kernel, class... Args>
void launch_dependent(Kernel kernel, int blocks, std::size_t smem, cuda::Stream stream, Args... args) {
  cuda::detail::launch_programmatic(kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), smem,
                                    reinterpret_cast<cudaStream_t>(stream), args...);
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
  const int parts = a.batch * v.kv_heads * a.parts;
  const int shared_parts = parts <= kSharedParts ? parts : 0;
  const std::size_t smem = 2 * static_cast<std::size_t>(shared_parts) * sizeof(int) + static_cast<std::size_t>(v.max_requests);
  launch_dependent(CacheEvictAdmitKernel, slot_blocks(v), smem, stream, v, a, shared_parts);
}

void launch_cache_commit(const CacheDeviceView& v, cuda::Stream stream) {
  CacheCommitKernel<<<1, kMaxRows, 0, reinterpret_cast<cudaStream_t>(stream)>>>(v);
  HATTN_CUDA_CHECK_LAUNCH();
}

void launch_cache_empty_stages(const CacheDeviceView& v, const CacheCallArgs& a, cuda::Stream stream) {
  CacheEmptyKernel<<<a.batch * v.kv_heads * a.parts + slot_blocks(v), kThreads, 0,
                     reinterpret_cast<cudaStream_t>(stream)>>>();
  HATTN_CUDA_CHECK_LAUNCH();
  launch_dependent(CacheEmptyDependentKernel, slot_blocks(v), 0, stream);
}

void launch_cache_scatter(std::int32_t* slot_of, const BlockKey* keys, const std::int32_t* values, int n,
                          cuda::Stream stream) {
  if (n <= 0) return;
  CacheScatterKernel<<<(n + 255) / 256, 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(slot_of, keys, values, n);
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::detail
