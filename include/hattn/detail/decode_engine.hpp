#pragma once
// The non-template machinery behind HybridAttention: the KV store, the CPU side (thread pool and
// SIMD kernels), and, when built with CUDA, device buffers, streams, the summary mirror and the HBM
// cache. Policies decide; the engine carries the decisions out. Engines use HybridAttention instead.
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "hattn/config.hpp"
#include "hattn/core/tensor_view.hpp"
#include "hattn/kernels/cpu_decode.hpp"
#include "hattn/kernels/cuda_stream.hpp"
#include "hattn/kv/cache_policy.hpp"
#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/policy/concepts.hpp"
#include "hattn/step_stats.hpp"

namespace hattn::detail {

/// The decisions of the policies for one layer of one step.
struct LayerWork {
  int layer = 0;
  std::span<const SeqId> rows;            ///< [batch]
  std::span<const SegmentRule> rules;     ///< [batch * kv_heads]
  std::span<const double> cpu_share;      ///< [batch] share of each row's selected blocks for the CPU
};

class DecodeEngine {
 public:
  explicit DecodeEngine(const Config& config);
  ~DecodeEngine();
  DecodeEngine(const DecodeEngine&) = delete;
  DecodeEngine& operator=(const DecodeEngine&) = delete;

  const Config& config() const noexcept;
  /// kGpu or kCpu: what kAuto resolved to.
  Backend backend() const noexcept;
  CpuIsa cpu_isa() const noexcept;
  PagedKVStore& store() noexcept;
  const PagedKVStore& store() const noexcept;

  SeqId add_sequence();
  void append(SeqId seq, int layer, const TensorView& keys, const TensorView& values, cuda::Stream stream);
  void release(SeqId seq);

  /// Checks a batch at plan time (known ids, no duplicates, size) and sizes the workspaces for it.
  void prepare(std::span<const SeqId> rows);
  /// Pages of `seq` in `layer` now.
  int pages(SeqId seq, int layer) const;
  /// Recent share of GPU-side blocks found in HBM (0 without a cache).
  double hbm_hit_rate() const noexcept;
  /// (page, KV head) blocks the HBM cache holds at most (0 without one).
  std::int64_t hbm_cache_blocks() const noexcept;
  /// The HBM cache's totals of the latest step (waits for its GPU work); zeros without a cache.
  CacheStepStats cache_step_stats();

  /// Validates q and out against the batch (cheap shape checks), then enqueues the layer.
  void run(const LayerWork& work, const TensorView& queries, const TensorView& output, cuda::Stream stream);
  /// Stats of the last run() of `layer` if its GPU work has finished, else nullptr. Never blocks.
  const StepStats* finished_stats(int layer);
  /// Blocks until every enqueued layer has finished, then returns the stats of `layer`.
  const StepStats& wait_stats(int layer);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hattn::detail
