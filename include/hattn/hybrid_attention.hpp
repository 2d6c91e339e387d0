#pragma once
// hattn::HybridAttention: the one object an engine calls. Per decode step: plan() once for the batch,
// then run() per layer. Each run scores pages from their summaries, selects pages per request and KV
// head (Selector), splits them between the GPU and the CPU (Scheduler), computes both sides at once and
// merges their partials by LSE; the Predictor learns each head's needs from what the steps revealed.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "hattn/config.hpp"
#include "hattn/detail/decode_engine.hpp"
#include "hattn/policy/concepts.hpp"
#include "hattn/policy/cpu_only.hpp"
#include "hattn/policy/fixed_budget.hpp"
#include "hattn/policy/gpu_only.hpp"
#include "hattn/policy/hybridgen_feedback.hpp"
#include "hattn/policy/mass_threshold.hpp"
#include "hattn/policy/no_prediction.hpp"
#include "hattn/policy/online_head_profile.hpp"
#include "hattn/policy/output_aware.hpp"
#include "hattn/policy/priority.hpp"
#include "hattn/step_stats.hpp"

namespace hattn {

/// The host-side decisions for one decode step of a batch: rows, and per layer the selector's rules
/// and the scheduler's CPU shares. Made by plan(), consumed by run(); cheap to keep one per step.
struct Plan {
  std::vector<SeqId> rows;                          ///< [batch]
  std::vector<std::vector<SegmentRule>> rules;      ///< [layers][batch * kv_heads]
  std::vector<std::vector<double>> cpu_share;        ///< [layers][batch]
};

template <HeadPredictor Predictor = OnlineHeadProfile, BudgetSelector Selector = OutputAware,
          Scheduler Sched = Priority>
class HybridAttention {
 public:
  /// Allocates the host pool, the HBM cache, streams, the thread pool and the workspaces once.
  /// Throws InvalidArgument for a bad config, Error when kGpu is asked for without a device.
  explicit HybridAttention(const Config& config, Predictor predictor = {}, Selector selector = {}, Sched scheduler = {})
      : engine_(config), predictor_(std::move(predictor)), selector_(std::move(selector)), scheduler_(std::move(scheduler)) {}

  /// A new request with no tokens.
  SeqId add_sequence() {
    const SeqId seq = engine_.add_sequence();
    scheduler_.reset(seq);
    return seq;
  }

  /// Appends K/V of `layer`: keys and values [n_tokens, kv_heads, head_dim] in the KV dtype, on the
  /// host or (GPU backend) the device. A prefill chunk or one decode token. On any error the sequence
  /// is unchanged. Device inputs are copied on `stream` and waited for.
  void append(SeqId seq, int layer, const TensorView& keys, const TensorView& values, cuda::Stream stream = nullptr) {
    engine_.append(seq, layer, keys, values, stream);
  }

  /// Host side, once per step: validates the batch, feeds back what finished steps revealed, and asks
  /// the policies for every layer's rules and CPU shares.
  Plan plan(std::span<const SeqId> batch) {
    engine_.prepare(batch);
    const Config& c = engine_.config();
    const int heads = c.shape.kv_heads;
    Plan p;
    p.rows.assign(batch.begin(), batch.end());
    p.rules.resize(static_cast<std::size_t>(c.shape.layers));
    p.cpu_share.resize(static_cast<std::size_t>(c.shape.layers));
    std::vector<int> pages(batch.size());
    std::vector<HeadAdvice> advice(static_cast<std::size_t>(heads));
    for (int layer = 0; layer < c.shape.layers; ++layer) {
      learn(layer);
      for (std::size_t b = 0; b < batch.size(); ++b) pages[b] = engine_.pages(batch[b], layer);
      for (int h = 0; h < heads; ++h) advice[h] = predictor_.advise(layer, h);
      auto& rules = p.rules[layer];
      rules.assign(batch.size() * heads, SegmentRule{});
      SelectInputs in{layer, heads, c.avg_budget, c.sink_pages, c.local_pages, pages, advice};
      SelectOutputs out{rules};
      selector_.select(in, out);
      validate_rules(rules, pages, heads);
      auto& shares = p.cpu_share[layer];
      shares.assign(batch.size(), 0.0);
      const PageLayout& l = engine_.store().layout();
      ScheduleInputs sin{layer, heads, c.sink_pages, c.local_pages, engine_.backend() == Backend::kGpu,
                         engine_.hbm_hit_rate(),
                         static_cast<double>(2 * l.head_block_elems() * dtype_bytes(l.dtype)),
                         static_cast<double>(PageLayout::kSummaryRows * l.head_dim * dtype_bytes(l.dtype)),
                         p.rows, pages, rules};
      ScheduleOutputs sout{shares};
      scheduler_.schedule(sin, sout);
      validate_shares(shares);
      if (engine_.backend() == Backend::kCpu) std::fill(shares.begin(), shares.end(), 1.0);  // no GPU side
    }
    return p;
  }

  /// Enqueues one layer: queries [batch, q_heads, head_dim] fp32 and output [batch, q_heads, head_dim]
  /// fp32, on the device for the GPU backend (the caller's thread does not wait for the GPU) or on the
  /// host for the CPU backend (synchronous). Output rows are exact-softmax-normalised over the
  /// selected keys.
  void run(const Plan& plan, int layer, const TensorView& queries, const TensorView& output,
           cuda::Stream stream = nullptr) {
    detail::require(layer >= 0 && layer < engine_.config().shape.layers, "HybridAttention::run", "layer", layer,
                    "a layer of the model");
    detail::require(plan.rules.size() == static_cast<std::size_t>(engine_.config().shape.layers),
                    "HybridAttention::run", "plan", "empty", "a plan made by plan()");
    engine_.run(detail::LayerWork{layer, plan.rows, plan.rules[layer], plan.cpu_share[layer]}, queries, output,
                stream);
  }

  /// Ends a request: its pages go back to the pool, its cache slots and feedback state are dropped.
  void release(SeqId seq) {
    engine_.release(seq);
    scheduler_.reset(seq);
  }

  /// Stats of the last run() of `layer`; blocks until the enqueued work has finished.
  const StepStats& stats(int layer) { return engine_.wait_stats(layer); }

  /// (page, KV head) blocks the HBM cache can hold (0 without one); times the block bytes, its HBM.
  std::int64_t hbm_cache_blocks() const noexcept { return engine_.hbm_cache_blocks(); }
  /// The HBM cache's hits, misses, admissions and PCIe bytes of the latest step (waits for its GPU work).
  CacheStepStats cache_stats() { return engine_.cache_step_stats(); }
  /// Recent share of GPU-side blocks found in the HBM cache, as the scheduler sees it.
  double hbm_hit_rate() const noexcept { return engine_.hbm_hit_rate(); }

  const Config& config() const noexcept { return engine_.config(); }
  Backend backend() const noexcept { return engine_.backend(); }
  CpuIsa cpu_isa() const noexcept { return engine_.cpu_isa(); }
  PagedKVStore& store() noexcept { return engine_.store(); }
  const PagedKVStore& store() const noexcept { return engine_.store(); }
  Predictor& predictor() noexcept { return predictor_; }
  Selector& selector() noexcept { return selector_; }
  Sched& scheduler() noexcept { return scheduler_; }

 private:
  // Feeds the predictor and the scheduler with the last finished run() of `layer`, once.
  void learn(int layer) {
    const StepStats* s = engine_.finished_stats(layer);
    if (s == nullptr || s->batch == 0) return;
    if (learned_gen_.size() <= static_cast<std::size_t>(layer)) learned_gen_.resize(static_cast<std::size_t>(layer) + 1, 0);
    if (learned_gen_[layer] == s->generation) return;
    learned_gen_[layer] = s->generation;
    const int heads = engine_.config().shape.kv_heads;
    const Config& c = engine_.config();
    for (int b = 0; b < s->batch; ++b) {
      const int n = s->pages_per_row[b];
      for (int h = 0; h < heads; ++h) {
        const SegmentRule& r = s->rules[b * heads + h];
        predictor_.observe(HeadObservation{s->row_ids[b], layer, h, n, s->selected_pages[b * heads + h],
                                           r.budget_pages, detail::forced_pages(n, c.sink_pages, c.local_pages),
                                           r.mass_threshold > 0});
      }
    }
    // Both sides' work on the selected pages starts when the GPU's selection ends (GPU backend).
    const double from = s->gpu_selected_us;
    const double cpu_us = from > 0 && s->cpu_blocks > 0 ? s->cpu_end_us - from : s->cpu_us;
    const double gpu_us = from > 0 ? s->gpu_decoded_us - from : s->gpu_us;
    scheduler_.feedback(StepTiming{s->row_ids, cpu_us, gpu_us, s->cpu_blocks, s->gpu_blocks});
  }
  static void validate_rules(std::span<const SegmentRule> rules, std::span<const int> pages, int heads) {
    for (std::size_t i = 0; i < rules.size(); ++i) {
      const int n = pages[i / heads];
      detail::require(rules[i].budget_pages >= 0 && rules[i].budget_pages <= n, "Selector", "budget_pages",
                      rules[i].budget_pages, "in [0, ", n, "] (pages of the request)");
      detail::require(rules[i].mass_threshold >= 0 && rules[i].mass_threshold <= 1, "Selector", "mass_threshold",
                      rules[i].mass_threshold, "in [0, 1]");
      detail::require(rules[i].granularity_pages >= 1, "Selector", "granularity_pages", rules[i].granularity_pages,
                      ">= 1");
    }
  }
  static void validate_shares(std::span<const double> shares) {
    for (double x : shares) detail::require(x >= 0 && x <= 1, "Scheduler", "cpu_share", x, "in [0, 1]");
  }

  detail::DecodeEngine engine_;
  Predictor predictor_;
  Selector selector_;
  Sched scheduler_;
  std::vector<std::uint64_t> learned_gen_;
};

/// The systems the benchmarks compare, all the same object with other policies.
using FluxionAttention = HybridAttention<OnlineHeadProfile, OutputAware, Priority>;   ///< the default
using Fixed5HybridAttention = HybridAttention<NoPrediction, FixedBudget, HybridGenFeedback>;  ///< FixedBudget(0.05)
using QuestGpuAttention = HybridAttention<NoPrediction, FixedBudget, GpuOnly>;  ///< Quest-like, GPU only
using PsaAttention = HybridAttention<NoPrediction, MassThreshold, GpuOnly>;
/// Dense baselines: construct with FixedBudget(1.0).
using DenseGpuAttention = HybridAttention<NoPrediction, FixedBudget, GpuOnly>;
using DenseCpuAttention = HybridAttention<NoPrediction, FixedBudget, CpuOnly>;

}  // namespace hattn
