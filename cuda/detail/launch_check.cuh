#pragma once
// The check every launcher runs right after its kernel launch: a bad configuration surfaces here,
// with file and line, instead of at the next unrelated CUDA call.
#include "hattn/core/cuda_check.hpp"

#define HATTN_CUDA_CHECK_LAUNCH() HATTN_CUDA_CHECK(cudaGetLastError())
