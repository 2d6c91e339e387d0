#pragma once
// The argument checks of launch_score_pages and launch_select_pages, as functions: the fused
// two-level launcher runs a score pass and a selection inside one kernel of its own and checks their
// descriptions by the same rules. Each throws InvalidArgument naming `where` and the field.
#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"

namespace hattn::cuda::detail {

/// Checks `p`; returns false for an empty batch (nothing to launch, the pointers unchecked).
bool check_score_params(const ScoreParams& p, const char* where);
/// Checks `p`; returns false for an empty batch (nothing to launch, the pointers unchecked).
bool check_select_params(const SelectParams& p, const char* where);

}  // namespace hattn::cuda::detail
