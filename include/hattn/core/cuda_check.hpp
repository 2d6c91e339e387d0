#pragma once
// The one checked CUDA call helper. Include only from translation units built with CUDA.
#include <cuda_runtime_api.h>

#include "hattn/core/error.hpp"

namespace hattn::detail {

inline void cuda_check(cudaError_t status, const char* expr, const char* file, int line) {
  if (status != cudaSuccess)
    throw CudaError(concat(file, ":", line, ": ", expr, " failed: ", cudaGetErrorName(status), ": ",
                           cudaGetErrorString(status)));
}

}  // namespace hattn::detail

/// Throws hattn::CudaError with file, line and the CUDA error string when `expr` fails.
#define HATTN_CUDA_CHECK(expr) ::hattn::detail::cuda_check((expr), #expr, __FILE__, __LINE__)
