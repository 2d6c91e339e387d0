#pragma once
// The predictor that knows nothing: every head is unknown, every selector falls back to its own rule.
#include "hattn/policy/concepts.hpp"

namespace hattn {

struct NoPrediction {
  HeadAdvice advise(int /*layer*/, int /*kv_head*/) const { return {}; }
  void observe(const HeadObservation& /*obs*/) {}
};
static_assert(HeadPredictor<NoPrediction>);

}  // namespace hattn
