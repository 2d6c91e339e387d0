#pragma once
// What one run() of one layer did: where pages ran, budget used, bytes moved and times.
#include <cstdint>
#include <vector>

#include "hattn/policy/concepts.hpp"

namespace hattn {

struct StepStats {
  int layer = -1;
  int batch = 0;
  std::uint64_t generation = 0;        ///< 1 + the number of earlier run() calls of the engine
  std::vector<SeqId> row_ids;          ///< [batch]
  std::vector<int> pages_per_row;      ///< [batch] pages of each request in this layer
  std::int64_t total_blocks = 0;       ///< (page, KV head) blocks of the batch: sum over rows of pages * kv_heads
  std::int64_t gpu_blocks = 0;         ///< selected blocks computed on the GPU
  std::int64_t cpu_blocks = 0;         ///< selected blocks computed on the CPU
  /// GPU blocks the HBM cache held when the step's split looked: blocks gathered into HBM before the
  /// decode (Admission::kBeforeDecode) count as misses here, though the decode reads them from HBM.
  /// Without a CPU share the count runs beside the layer's own cache step (off the decode's path), so
  /// a block that step's gather published before the count reached it counts as a hit: an estimate
  /// for the stats and the bench's floor; the scheduler's hit rate comes from the cache's counters.
  std::int64_t hbm_hits = 0;
  std::int64_t host_read_bytes = 0;    ///< KV bytes read from host memory (CPU side + the GPU's misses, read in place or gathered)
  std::int64_t pcie_bytes = 0;         ///< bytes over PCIe (zero-copy reads + cache admission + q/partials)
  double cpu_us = 0;                   ///< CPU side: scoring + selection + attention
  double cpu_kernel_us = 0;            ///< of cpu_us, the SIMD attention kernel alone
  double gpu_us = 0;                   ///< GPU side from events: first kernel to the merge
  double caller_us = 0;                ///< time the caller's thread spent inside run()
  double caller_begin_us = 0;          ///< when run() was entered, on the clock of cpu_begin_us below
  /// When each side computed, in microseconds on one host clock (std::chrono::steady_clock since the
  /// engine was built); GPU times are event times mapped onto it. 0 when the side had no work.
  double cpu_begin_us = 0, cpu_end_us = 0, gpu_begin_us = 0, gpu_end_us = 0;
  /// GPU backend, same clock: when the GPU's selection was done (both sides' work on the selected
  /// pages starts here) and when its decode was done (before the merge, which waits for the CPU).
  double gpu_selected_us = 0, gpu_decoded_us = 0;
  std::vector<int> selected_pages;     ///< [batch * kv_heads] selected pages per segment (both sides)
  std::vector<SegmentRule> rules;      ///< [batch * kv_heads] what the selector asked for
  std::vector<double> cpu_share;       ///< [batch] share of the selected blocks the scheduler gave the CPU

  /// Where the GPU side's time went, from CUDA events between its phases on the caller's stream
  /// (only with Config::time_phases; zeros otherwise). upload_us is the copy of the run's metadata
  /// (page tables, budgets) before the first kernel, outside gpu_us; cache_wait_us the wait for the
  /// previous call's cache admission and, with Admission::kBeforeDecode and no CPU share, for
  /// this layer's own lookup, eviction and gather of its misses; cpu_wait_us the wait for the CPU
  /// partials before the merge. With HATTN_FUSED_STEP=1 (docs/api.md) two-level top-k scores and
  /// selects in one launch sequence (launch_select_two_level): score_us holds both and select_us the
  /// split; and without a CPU share the decode merges its own splits: merge_us is then ~0.
  struct GpuPhases {
    double upload_us = 0, score_us = 0, select_us = 0, cache_wait_us = 0, decode_us = 0, cpu_wait_us = 0, merge_us = 0;
  } gpu_phases;

  /// Share of the batch's blocks that were attended.
  double budget_used() const noexcept {
    return total_blocks ? static_cast<double>(gpu_blocks + cpu_blocks) / static_cast<double>(total_blocks) : 0.0;
  }
};

}  // namespace hattn
