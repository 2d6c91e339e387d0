#pragma once
// Fluxion's scheduler: a cost model of the GPU (HBM and zero-copy host reads), PCIe and the CPU decides
// how many of each request's selected blocks the CPU takes so both sides finish together; measured
// times correct the model step by step. The engine starts the longest CPU work first. With a GPU the
// selection is made on the GPU over whole sequences and the CPU's share is filled with the blocks the
// HBM cache lacks first, so the GPU side keeps its HBM hits and the CPU replaces PCIe reads with DRAM
// reads; without a GPU the CPU also scores every page.
#include <algorithm>
#include <ostream>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class Priority {
 public:
  /// Rates in bytes per microsecond (1 GB/s = 1e3 bytes/us). Measured on the device
  /// (H100 PCIe Gen5 + 16-core Sapphire Rapids, DESIGN.md): HBM ~2.8 TB/s, zero-copy gather of
  /// mapped pinned pages ~50 GB/s, AVX-512 DRAM read on 16 threads ~100 GB/s.
  struct CostModel {
    double hbm_bytes_per_us = 2.8e6;
    double host_zero_copy_bytes_per_us = 5.0e4;
    /// The CPU kernel's rate on a 5% selection of a 128K layer, 16 threads: 43 GB/s
    /// (docs/results/cpu_kernel.json, 2026-11-23); DRAM itself reads ~100 GB/s.
    double cpu_bytes_per_us = 4.3e4;
    /// Fixed costs of a side per layer beyond the GPU's scoring and selection, which both sides wait
    /// for. The CPU side waits for the split's lists in mapped memory and wakes its workers, and the
    /// GPU merge polls for the CPU's published ticket; the GPU side launches its decode and the merge.
    /// Starting points: the measured-time corrections below adjust both sides' totals.
    double cpu_fixed_us = 40.0;
    double gpu_fixed_us = 10.0;
    /// Below this CPU share, splitting costs more in fixed time than it saves. On the device (128K,
    /// batch 1, 5%, cache 19% of the KV, 2026-11-23) the model asked for ~3% of the blocks at a ~90%
    /// hit rate, and steps that split that little varied from 270 to 630 us with the CPU's fixed
    /// costs; GPU-only steps of the same selection took ~260 us.
    double min_cpu_share = 0.05;
    double max_cpu_share = 0.95;
    /// At this HBM hit rate and above the GPU computes everything: its few misses are gathered into
    /// HBM before its decode (Admission::kBeforeDecode, then the default) at PCIe speed, and a CPU share did not beat
    /// that on the device (128K x 1, cache 19% of the KV, ~85% hits, 2026-11-23: GPU-only 210-224 us
    /// per layer, with the CPU's share 283 us; without a cache the split won, 452-473 against 611 us).
    double gpu_only_hit_rate = 0.5;
    /// Weight of the newest measured/predicted ratio in the correction factors.
    double ema = 0.25;
    friend bool operator==(const CostModel&, const CostModel&) = default;
  };

  Priority() = default;
  explicit Priority(CostModel m) : model_(m) {
    detail::require(m.hbm_bytes_per_us > 0 && m.host_zero_copy_bytes_per_us > 0 && m.cpu_bytes_per_us > 0,
                    "Priority", "rates", m.cpu_bytes_per_us, "> 0");
    detail::require(m.ema > 0 && m.ema <= 1, "Priority", "ema", m.ema, "in (0, 1]");
  }

  void schedule(const ScheduleInputs& in, ScheduleOutputs& out) {
    predicted_cpu_us_ = predicted_gpu_us_ = 0;
    for (std::size_t b = 0; b < in.rows.size(); ++b) {
      double selected = 0;
      for (int h = 0; h < in.kv_heads; ++h) selected += in.rules[b * in.kv_heads + h].budget_pages;
      const double x = in.gpu ? cpu_share(in, selected) : 1.0;
      out.cpu_share[b] = x;
      predicted_cpu_us_ += cpu_time(in, x * selected, in.gpu ? 0 : in.pages_per_row[b] * in.kv_heads);
      predicted_gpu_us_ += gpu_time(in, selected, x * selected);
    }
  }

  void feedback(const StepTiming& t) {
    auto correct = [&](double& factor, double measured, double predicted) {
      if (!(measured > 0) || !(predicted > 0)) return;  // also NaN, which would stick
      // Bounded: a side measured 5x off its rates is waiting on something the model does not see
      // (an admission in flight, a busy DRAM), and an unbounded factor would also scale its fixed
      // cost until the other side got everything.
      factor = std::clamp((1 - model_.ema) * factor + model_.ema * (measured / predicted), 0.2, 5.0);
    };
    if (t.cpu_pages > 0) correct(cpu_factor_, t.cpu_us, predicted_cpu_us_);
    if (t.gpu_pages > 0) correct(gpu_factor_, t.gpu_us, predicted_gpu_us_);
  }

  void reset(SeqId /*seq*/) {}
  const CostModel& model() const noexcept { return model_; }
  double cpu_correction() const noexcept { return cpu_factor_; }
  double gpu_correction() const noexcept { return gpu_factor_; }

 private:
  double cpu_time(const ScheduleInputs& in, double blocks, double scored_blocks) const {
    if (blocks <= 0) return 0;
    return cpu_factor_ * (model_.cpu_fixed_us +
                          (blocks * in.block_bytes + scored_blocks * in.summary_bytes) / model_.cpu_bytes_per_us);
  }
  // The GPU's part of `selected` blocks when the CPU takes `cpu` of them, uncached ones first: the
  // cached blocks it keeps come from HBM, the uncached ones across PCIe.
  double gpu_time(const ScheduleInputs& in, double selected, double cpu) const {
    const double cached = std::clamp(in.hbm_hit_rate, 0.0, 1.0) * selected;
    const double uncached = selected - cached;
    const double from_host = std::max(0.0, uncached - cpu);
    const double from_hbm = cached - std::max(0.0, cpu - uncached);
    return gpu_factor_ * (model_.gpu_fixed_us + in.block_bytes * (from_hbm / model_.hbm_bytes_per_us +
                                                                  from_host / model_.host_zero_copy_bytes_per_us));
  }
  // Finish together: cpu_time(c) = gpu_time(c). Both are linear in c on each side of c = uncached
  // (the GPU's saving per block moves from the PCIe rate to the HBM rate there).
  double cpu_share(const ScheduleInputs& in, double selected) const {
    if (selected <= 0 || in.hbm_hit_rate >= model_.gpu_only_hit_rate) return 0;
    const double b = in.block_bytes;
    const double cached = std::clamp(in.hbm_hit_rate, 0.0, 1.0) * selected;
    const double uncached = selected - cached;
    const double fixed = gpu_factor_ * model_.gpu_fixed_us - cpu_factor_ * model_.cpu_fixed_us;
    const double cpu_rate = cpu_factor_ * b / model_.cpu_bytes_per_us;
    double c = (fixed + gpu_factor_ * b * (cached / model_.hbm_bytes_per_us + uncached / model_.host_zero_copy_bytes_per_us)) /
               (cpu_rate + gpu_factor_ * b / model_.host_zero_copy_bytes_per_us);
    if (c > uncached)
      c = (fixed + gpu_factor_ * b * selected / model_.hbm_bytes_per_us) /
          (cpu_rate + gpu_factor_ * b / model_.hbm_bytes_per_us);
    const double x = std::max(0.0, c) / selected;
    return x < model_.min_cpu_share ? 0.0 : std::min(x, model_.max_cpu_share);
  }

  CostModel model_{};
  double cpu_factor_ = 1.0, gpu_factor_ = 1.0;
  double predicted_cpu_us_ = 0, predicted_gpu_us_ = 0;
};
static_assert(Scheduler<Priority>);

}  // namespace hattn
