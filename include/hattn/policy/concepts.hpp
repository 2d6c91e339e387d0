#pragma once
// The three policy slots of HybridAttention as C++20 concepts, and the plain data they exchange.
// A policy sees the step only through these structs; it never touches pools, kernels or streams.
#include <concepts>
#include <cstdint>
#include <ostream>
#include <span>

#include "hattn/kv/paged_kv_store.hpp"

namespace hattn {

/// What a predictor believes a (layer, KV head) is.
enum class HeadClass : std::uint8_t { kUnknown, kRetrieval, kLocal, kDiffuse };

constexpr const char* to_string(HeadClass c) noexcept {
  switch (c) {
    case HeadClass::kRetrieval: return "retrieval";
    case HeadClass::kLocal: return "local";
    case HeadClass::kDiffuse: return "diffuse";
    default: return "unknown";
  }
}

/// A predictor's advice for one (layer, KV head).
struct HeadAdvice {
  HeadClass head_class = HeadClass::kUnknown;
  /// Predicted share of a request's pages the head needs to keep its attention output (for example
  /// the share that reached the mass threshold in recent steps); negative when unknown.
  float expected_share = -1.0f;
  /// Pages selected together as one unit (1 = page level; 4 = aligned runs of 4 pages).
  int granularity_pages = 1;
  friend bool operator==(const HeadAdvice&, const HeadAdvice&) = default;
};

/// What one step revealed about one (sequence, layer, KV head), fed back to the predictor.
struct HeadObservation {
  SeqId seq = -1;
  int layer = 0;
  int kv_head = 0;
  int pages = 0;            ///< pages in the sequence's layer
  int selected_pages = 0;   ///< pages the selection kept (GPU and CPU sides together)
  int rule_budget_pages = 0;  ///< the cap the selector set
  int forced_pages = 0;       ///< sinks + local window among them
  bool mass_rule = false;   ///< selected_pages is the count that reached the mass threshold (if < cap)
};

/// What a segment's pages are ranked by for selection. The Quest bound (the summary's min/max) keeps
/// a page holding a short needle near the top but also favours pages with one noisy key; the mean-key
/// estimate ranks by likely mass but dilutes needles. kBlend ranks by estimate + kRankBlend x (bound -
/// estimate): on the head zoo at 5% (CPU backend, weights 0 to 0.5 swept) 0.1 kept every needle the
/// bound finds and cut the mean output error from 0.129 to 0.104 for top-k.
enum class PageRank : std::uint8_t { kBound, kBlend };
inline constexpr float kRankBlend = 0.1f;

/// The rule a selector sets for one segment (request, KV head); the kernels carry it out.
struct SegmentRule {
  int budget_pages = 0;         ///< top-k: k; mass rule: the cap. Counts sinks and local pages.
  /// 0: top-k; (0, 1]: PSA's mass rule: pages in rank order until their estimated mass reaches this
  /// share of the segment's estimated mass.
  float mass_threshold = 0.0f;
  int granularity_pages = 1;
  PageRank rank = PageRank::kBound;
  friend bool operator==(const SegmentRule&, const SegmentRule&) = default;
};

struct SelectInputs {
  int layer = 0;
  int kv_heads = 0;
  double avg_budget = 0.05;                 ///< average share of pages per head, in (0, 1]
  int sink_pages = 1;
  int local_pages = 1;
  std::span<const int> pages_per_row;       ///< [batch] pages of each request in this layer
  std::span<const HeadAdvice> advice;       ///< [kv_heads] for this layer
};
struct SelectOutputs {
  std::span<SegmentRule> rules;             ///< [batch * kv_heads], segment s = b * kv_heads + h
};

struct ScheduleInputs {
  int layer = 0;
  int kv_heads = 0;
  int sink_pages = 1;
  int local_pages = 1;
  bool gpu = false;                          ///< a GPU side exists
  /// Recent share of the selected (page, head) blocks that were resident in the HBM cache when the
  /// step split its selection (0 without a cache).
  double hbm_hit_rate = 0.0;
  double block_bytes = 0;                    ///< K and V of one head of one page
  double summary_bytes = 0;                  ///< summary of one head of one page
  std::span<const SeqId> rows;               ///< [batch]
  std::span<const int> pages_per_row;        ///< [batch]
  std::span<const SegmentRule> rules;        ///< [batch * kv_heads]
};
struct ScheduleOutputs {
  /// [batch] share in [0, 1] of each request's selected blocks (all its KV heads together, rounded to
  /// blocks) that the CPU computes. The engine fills it with blocks the HBM cache lacks first, from
  /// every head in proportion to its missing blocks (the CPU reads them from DRAM faster than the GPU
  /// can across PCIe), and only then with cached ones; without a cache, with each head's earliest
  /// positions, in proportion to its selected blocks. The CPU backend computes everything whatever the share.
  std::span<double> cpu_share;
};

/// Measured times of one run() of one layer, fed back to the scheduler.
struct StepTiming {
  std::span<const SeqId> rows;
  /// Each side's time for its share of the selected pages. GPU backend: from the end of the GPU's
  /// selection to the end of the CPU side (q and selection copies and worker wake-up included) and
  /// to the end of the GPU decode. CPU backend: the CPU side's scoring, selection and attention.
  double cpu_us = 0;
  double gpu_us = 0;
  std::int64_t cpu_pages = 0;  ///< (page, head) blocks computed on the CPU
  std::int64_t gpu_pages = 0;
};

template <class P>
concept HeadPredictor = requires(P p, const P& cp, int layer, int kv_head, const HeadObservation& obs) {
  { cp.advise(layer, kv_head) } -> std::same_as<HeadAdvice>;
  p.observe(obs);
};

template <class S>
concept BudgetSelector = requires(S s, const SelectInputs& in, SelectOutputs& out) { s.select(in, out); };

template <class S>
concept Scheduler = requires(S s, const ScheduleInputs& in, ScheduleOutputs& out, const StepTiming& t, SeqId seq) {
  s.schedule(in, out);
  s.feedback(t);
  s.reset(seq);  // a request ended or began: drop its feedback state
};

namespace detail {
/// Pages forced into every selection of a request with n pages (sinks + local window, no overlap).
inline int forced_pages(int n, int sink_pages, int local_pages) {
  return std::min(n, std::max(0, sink_pages) + std::max(0, local_pages));
}
}  // namespace detail

}  // namespace hattn
