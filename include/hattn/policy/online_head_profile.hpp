#pragma once
// Fluxion's head-property predictor, online: per (layer, KV head) running statistics of what the
// selection needed, turned into a head class, a predicted page share and a granularity.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/policy/concepts.hpp"

namespace hattn {

class OnlineHeadProfile {
 public:
  struct Tuning {
    /// Weight of the newest observation in the running means. 0.3 lets a head's class settle in
    /// about 3 steps yet survive one odd query.
    float ema = 0.3f;
    /// A head whose mass threshold is met within this many pages beyond the forced ones is local:
    /// its sinks and window carry the output (DuoAttention's streaming heads).
    float local_extra_pages = 1.0f;
    /// Below this share of pages a non-local head is a retrieval head, above it diffuse.
    float retrieval_share = 0.10f;
    /// Diffuse heads are selected in aligned runs of this many pages (coarser granularity, fewer
    /// and longer reads); 4 pages of 16 tokens = 64-token runs.
    int diffuse_granularity = 4;
    friend bool operator==(const Tuning&, const Tuning&) = default;
  };

  OnlineHeadProfile() = default;
  explicit OnlineHeadProfile(Tuning t) : tuning_(t) {
    detail::require(t.ema > 0 && t.ema <= 1, "OnlineHeadProfile", "ema", t.ema, "in (0, 1]");
    detail::require(t.diffuse_granularity >= 1, "OnlineHeadProfile", "diffuse_granularity",
                    t.diffuse_granularity, ">= 1");
  }

  HeadAdvice advise(int layer, int kv_head) const {
    const Stats* s = find(layer, kv_head);
    if (s == nullptr || s->observations == 0) return {};
    HeadAdvice a;
    a.expected_share = s->share;
    if (s->extra_pages <= tuning_.local_extra_pages) a.head_class = HeadClass::kLocal;
    else if (s->share < tuning_.retrieval_share) a.head_class = HeadClass::kRetrieval;
    else a.head_class = HeadClass::kDiffuse;
    a.granularity_pages = a.head_class == HeadClass::kDiffuse ? tuning_.diffuse_granularity : 1;
    return a;
  }

  /// Only mass-rule observations that stayed under their cap say how many pages the head needed;
  /// a capped count says "at least", which raises the estimate instead.
  void observe(const HeadObservation& o) {
    if (o.pages <= 0 || !o.mass_rule) return;
    Stats& s = at(o.layer, o.kv_head);
    const bool capped = o.selected_pages >= o.rule_budget_pages;
    const float share = static_cast<float>(o.selected_pages) / static_cast<float>(o.pages);
    const float extra = static_cast<float>(o.selected_pages - o.forced_pages);
    const float w = s.observations == 0 ? 1.0f : tuning_.ema;
    const float target_share = capped ? std::max(share * 1.5f, s.share) : share;
    s.share = (1 - w) * s.share + w * std::min(1.0f, target_share);
    s.extra_pages = (1 - w) * s.extra_pages + w * (capped ? std::max(extra, s.extra_pages + 1) : extra);
    ++s.observations;
  }

  const Tuning& tuning() const noexcept { return tuning_; }

 private:
  struct Stats {
    float share = 0;        // running share of pages needed
    float extra_pages = 0;  // running pages needed beyond the forced ones
    long observations = 0;
  };
  const Stats* find(int layer, int kv_head) const {
    const std::size_t i = index(layer, kv_head);
    return i < stats_.size() ? &stats_[i] : nullptr;
  }
  Stats& at(int layer, int kv_head) {
    detail::require(layer >= 0, "OnlineHeadProfile::observe", "layer", layer, ">= 0");
    detail::require(kv_head >= 0 && kv_head < 256, "OnlineHeadProfile::observe", "kv_head", kv_head, "in [0, 256)");
    const std::size_t i = index(layer, kv_head);
    if (i >= stats_.size()) stats_.resize(i + 1);
    return stats_[i];
  }
  // Heads per layer are fixed by the model; 256 bounds any real model's KV heads.
  static std::size_t index(int layer, int kv_head) { return static_cast<std::size_t>(layer) * 256 + kv_head; }

  Tuning tuning_{};
  std::vector<Stats> stats_;
};
static_assert(HeadPredictor<OnlineHeadProfile>);

}  // namespace hattn
