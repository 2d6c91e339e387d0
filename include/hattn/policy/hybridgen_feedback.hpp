#pragma once
// HybridGen's feedback rule, the hybrid baseline: the CPU computes a share of every request's selected
// pages, and that share moves by fixed factors from measured times (HybridGen adapts its CPU/GPU ratio
// the same way). Which pages the share covers is the engine's rule (ScheduleOutputs::cpu_share).
#include <algorithm>
#include <unordered_map>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class HybridGenFeedback {
 public:
  struct Tuning {
    /// Share of the selected pages the CPU starts with for a new request.
    double initial_cpu_share = 0.5;
    /// HybridGen's factors and bounds: x1.2 when the CPU side finished first, x0.8 otherwise,
    /// within [0.01, 0.5] of its ratio; here applied to the CPU's share of the pages.
    double grow = 1.2, shrink = 0.8, min_share = 0.01, max_share = 0.95;
    /// Steps between adjustments (HybridGen's N).
    int every_steps = 1;
    friend bool operator==(const Tuning&, const Tuning&) = default;
  };

  HybridGenFeedback() = default;
  explicit HybridGenFeedback(Tuning t) : tuning_(t) {
    detail::require(t.min_share > 0 && t.min_share <= t.max_share && t.max_share <= 1, "HybridGenFeedback",
                    "min_share/max_share", t.min_share, "0 < min_share <= max_share <= 1");
    detail::require(t.every_steps >= 1, "HybridGenFeedback", "every_steps", t.every_steps, ">= 1");
  }

  void schedule(const ScheduleInputs& in, ScheduleOutputs& out) {
    for (std::size_t b = 0; b < in.rows.size(); ++b) out.cpu_share[b] = state(in.rows[b]).share;
  }

  void feedback(const StepTiming& t) {
    if (t.cpu_pages == 0 || t.gpu_pages == 0) return;
    for (SeqId seq : t.rows) {
      State& s = state(seq);
      if (++s.steps % tuning_.every_steps != 0) continue;
      s.share = std::clamp(s.share * (t.cpu_us < t.gpu_us ? tuning_.grow : tuning_.shrink), tuning_.min_share,
                           tuning_.max_share);
    }
  }

  void reset(SeqId seq) { states_.erase(seq); }
  /// The CPU share a request has now (tests read the feedback state through this).
  double cpu_share(SeqId seq) { return state(seq).share; }

 private:
  struct State {
    double share;
    long steps = 0;
  };
  State& state(SeqId seq) { return states_.try_emplace(seq, State{tuning_.initial_cpu_share}).first->second; }

  Tuning tuning_{};
  std::unordered_map<SeqId, State> states_;
};
static_assert(Scheduler<HybridGenFeedback>);

}  // namespace hattn
