#pragma once
// The stream type launchers take, declared without CUDA headers so public headers compile with g++.
struct CUstream_st;

namespace hattn::cuda {
/// Same type as cudaStream_t; nullptr is the legacy default stream.
using Stream = CUstream_st*;
}  // namespace hattn::cuda
