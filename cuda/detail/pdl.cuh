#pragma once
// Programmatic dependent launch (Hopper, sm_90+): a decode step is a chain of small kernels
// (scores, selection, decode, merge) whose time is mostly launch latency and dependent-load
// round trips, not bandwidth. Launched "programmatic", the next kernel of the chain is scheduled
// while the one before it still runs, so its launch latency hides behind that kernel's tail.
//
// The contract every kernel launched by `launch_programmatic` keeps:
//  - it calls `pdl_wait()` before it reads or writes global memory that a kernel of ours may write
//    (summaries, scores, selections, partials, outputs). `wait` returns once every kernel before
//    it in the stream has completed and its writes are visible, so the chain keeps plain stream
//    order for that data;
//  - before the wait it may read only the caller's inputs (q, the page and group tables, indptrs,
//    lengths, budgets and exclusions), and only where the caller says they were complete before the
//    first kernel of the chain began (ScoreParams / SelectParams::inputs_ready). That needs saying:
//    a kernel of the caller's that triggers its dependents early (PDL-aware GEMMs do) lets ours
//    start before it has finished writing, and every kernel of a chain may run beside the ones
//    before it. The engine says so (a metadata copy heads each of its chains), and there the gain is
//    those loads and the launch latency hidden behind the tail of the kernel before;
//  - it calls `pdl_launch_dependents()` first thing, which lets the next kernel's blocks be
//    scheduled. A kernel launched after it without the attribute is ordered as usual.
// After a copy or a host function in the stream the attribute has no effect.
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdlib>
#include <utility>

#include "launch_check.cuh"

namespace hattn::cuda::detail {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/// Whether launches are programmatic: the device runs them (compute capability 9.0 or later) and
/// HATTN_PROGRAMMATIC_LAUNCH=0 does not turn them off (for A/B timing in one binary).
inline bool programmatic_launch_enabled() {
  const char* env = std::getenv("HATTN_PROGRAMMATIC_LAUNCH");
  if (env != nullptr && env[0] == '0') return false;
  int device = 0, major = 0;
  HATTN_CUDA_CHECK(cudaGetDevice(&device));
  HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9;
}

/// Launches `kernel<<<grid, block, smem, stream>>>(args...)` as a programmatic dependent of the
/// kernel before it in the stream (see the contract above), and checks the launch.
template <class... Params, class... Args>
void launch_programmatic(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                         Args&&... args) {
  static const bool enabled = programmatic_launch_enabled();
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = enabled ? 1 : 0;
  HATTN_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  HATTN_CUDA_CHECK_LAUNCH();
}

}  // namespace hattn::cuda::detail
