// The stream-side wait for a host-written counter (hattn/kernels/cuda_host_wait.hpp).
#include <cuda_runtime.h>

#include "detail/pdl.cuh"
#include "hattn/core/error.hpp"
#include "hattn/kernels/cuda_host_wait.hpp"

namespace hattn::cuda {
namespace {

__device__ __forceinline__ std::uint32_t load_acquire_system(const std::uint32_t* word) {
  std::uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(word) : "memory");
  return v;
}

// One thread. It lets the next kernel launch at once (its griddepcontrol.wait still waits for this
// grid to finish), but waits itself for the kernel before it: this grid's completion then stands for
// both, as the next kernel's wait requires.
__global__ void __launch_bounds__(1) WaitHostValueKernel(const std::uint32_t* word, std::uint32_t value) {
  detail::pdl_launch_dependents();
  detail::pdl_wait();
  while (static_cast<std::int32_t>(load_acquire_system(word) - value) < 0) __nanosleep(200);
}

}  // namespace

void launch_wait_host_value(const std::uint32_t* word, std::uint32_t value, Stream stream) {
  hattn::detail::require(word != nullptr, "launch_wait_host_value", "word", "null", "a mapped host or device address");
  detail::launch_programmatic(WaitHostValueKernel, dim3(1), dim3(1), 0, reinterpret_cast<cudaStream_t>(stream), word,
                              value);
}

}  // namespace hattn::cuda
