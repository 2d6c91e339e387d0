#pragma once
// Run-time values -> template instantiations, as one constexpr table per parameter and a generic
// lambda (STYLE.md: no DISPATCH_* macros). Head dim and KV dtype are template parameters of every
// kernel; page size and GQA group size stay run-time values so CI compiles few instantiations.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>

#include "hattn/core/dtype.hpp"
#include "hattn/core/error.hpp"

namespace hattn::cuda::detail {

/// Head dims with kernel instantiations.
inline constexpr std::array<int, 3> kHeadDims{64, 128, 256};

/// Calls fn.template operator()<D>() for the instantiated head dim equal to `head_dim`; an
/// unsupported value throws InvalidArgument naming `where`.
template <class Fn>
void dispatch_head_dim(int head_dim, const char* where, Fn&& fn) {
  switch (head_dim) {
    case kHeadDims[0]: fn.template operator()<kHeadDims[0]>(); return;
    case kHeadDims[1]: fn.template operator()<kHeadDims[1]>(); return;
    case kHeadDims[2]: fn.template operator()<kHeadDims[2]>(); return;
    default: break;
  }
  hattn::detail::require(false, where, "head_dim", head_dim, "64, 128 or 256");
}

/// Calls fn.template operator()<T>() with T = __nv_bfloat16 or __half; fp32 KV has no GPU kernels.
template <class Fn>
void dispatch_kv_dtype(DType dtype, const char* where, Fn&& fn) {
  switch (dtype) {
    case DType::kBFloat16: fn.template operator()<__nv_bfloat16>(); return;
    case DType::kFloat16: fn.template operator()<__half>(); return;
    default: break;
  }
  hattn::detail::require(false, where, "dtype", dtype, "bf16 or fp16 (the GPU kernels' KV types)");
}

}  // namespace hattn::cuda::detail
