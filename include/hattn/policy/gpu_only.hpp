#pragma once
// Every page on the GPU: from the HBM cache when cached, else read straight from pinned host memory.
#include "hattn/policy/concepts.hpp"

namespace hattn {

struct GpuOnly {
  void schedule(const ScheduleInputs& in, ScheduleOutputs& out) {
    for (std::size_t b = 0; b < in.rows.size(); ++b) out.cpu_share[b] = 0.0;
  }
  void feedback(const StepTiming& /*t*/) {}
  void reset(SeqId /*seq*/) {}
};
static_assert(Scheduler<GpuOnly>);

}  // namespace hattn
