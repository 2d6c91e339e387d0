#pragma once
// One host clock for every timestamp in StepStats: microseconds of std::chrono::steady_clock since
// the first use in the process.
#include <chrono>

namespace hattn::detail {

inline double engine_clock_us() {
  static const auto epoch = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - epoch).count();
}

}  // namespace hattn::detail
