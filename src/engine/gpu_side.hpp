#pragma once
// The GPU half of the engine (built with CUDA only): device metadata and workspaces, the summary
// mirror, scoring, selection, sparse decode and merge on the caller's stream, and the hand-off with
// the CPU side through mapped pinned memory and a GPU-side wait for the CPU job's ticket.
#include <memory>
#include <span>
#include <string>

#include "cpu_side.hpp"
#include "hattn/config.hpp"
#include "hattn/kv/cache_policy.hpp"
#include "hattn/detail/decode_engine.hpp"
#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/step_stats.hpp"

namespace hattn::detail {

class GpuSide {
 public:
  /// True when a CUDA device can be used; otherwise `why` says what is missing.
  static bool device_present(std::string& why);

  GpuSide(const Config& config, PagedKVStore& store, CpuSide& cpu);
  ~GpuSide();

  /// Copies device K/V to host staging (waits on `stream`) so the store can append them.
  void stage_from_device(const TensorView& keys, const TensorView& values, cuda::Stream stream,
                         TensorView& host_keys, TensorView& host_values);
  /// Uploads the summaries of `pages` to the device mirror on `stream`.
  void upload_summaries(std::span<const PageId> pages, cuda::Stream stream);
  /// Waits for enqueued work that may read the request's pages and drops its HBM cache slots.
  void release(SeqId seq);

  void prepare(std::span<const SeqId> rows);
  void run(const LayerWork& work, const float* q, float* out, cuda::Stream stream, std::uint64_t generation,
           double caller_begin_us);
  const StepStats* finished(int layer);
  const StepStats& wait(int layer);
  double hbm_hit_rate() const noexcept;
  /// Blocks of the HBM cache (0 without one) and its totals of the latest step.
  std::int64_t hbm_slots() const noexcept;
  CacheStepStats cache_step_stats();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hattn::detail
