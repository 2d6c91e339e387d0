// See include/hattn/kernels/cuda_upload.hpp.
#include <cuda_runtime.h>

#include <algorithm>

#include "detail/launch_check.cuh"
#include "hattn/core/error.hpp"
#include "hattn/kernels/cuda_upload.hpp"

namespace hattn::cuda {
namespace {

constexpr int kThreads = 256;

// 16-byte reads: each is one PCIe read request, all of them in flight at once.
__global__ void __launch_bounds__(kThreads) UploadWordsKernel(const int4* __restrict__ src, int4* __restrict__ dst,
                                                              const std::int32_t* __restrict__ src_words,
                                                              std::int32_t* __restrict__ dst_words,
                                                              long long vectors, long long count) {
  const long long i = static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x;
  if (i < vectors) dst[i] = src[i];
  const long long tail = 4 * vectors + i;  // the last count % 4 words
  if (i < 4 && tail < count) dst_words[tail] = src_words[tail];
}

}  // namespace

void launch_upload_words(const std::int32_t* host_mapped, std::int32_t* device, std::size_t count, Stream stream) {
  constexpr const char* kWhere = "launch_upload_words";
  if (count == 0) return;
  hattn::detail::require(host_mapped != nullptr && device != nullptr, kWhere, "pointers", "null", "both set");
  hattn::detail::require(reinterpret_cast<std::uintptr_t>(host_mapped) % 16 == 0 &&
                             reinterpret_cast<std::uintptr_t>(device) % 16 == 0,
                         kWhere, "alignment", "not 16 bytes", "16-byte aligned buffers");
  const long long vectors = static_cast<long long>(count / 4);
  const long long blocks = std::max<long long>(1, (vectors + kThreads - 1) / kThreads);
  UploadWordsKernel<<<static_cast<unsigned>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const int4*>(host_mapped), reinterpret_cast<int4*>(device), host_mapped, device, vectors,
      static_cast<long long>(count));
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda
