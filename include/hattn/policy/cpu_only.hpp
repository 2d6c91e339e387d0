#pragma once
// Every page on the CPU (the SIMD kernel over host memory); the GPU, if any, only merges.
#include "hattn/policy/concepts.hpp"

namespace hattn {

struct CpuOnly {
  void schedule(const ScheduleInputs& in, ScheduleOutputs& out) {
    for (std::size_t b = 0; b < in.rows.size(); ++b) out.cpu_share[b] = 1.0;
  }
  void feedback(const StepTiming& /*t*/) {}
  void reset(SeqId /*seq*/) {}
};
static_assert(Scheduler<CpuOnly>);

}  // namespace hattn
