#pragma once
// A stream waits on the GPU for a value the host writes into mapped pinned memory: the hand-off from
// the CPU side's partials to the merge. A host function on the stream (cudaLaunchHostFunc) does the
// same through the runtime's callback thread, whose wake-up cost 100+ us per layer on the device
// (H100 host, 128K x 1 with a CPU share, 2026-12-07: docs/performance.md); a one-thread kernel that
// polls the word across PCIe sees it within a microsecond or two.
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Enqueues a wait until `*word` (mapped pinned host memory, or device memory) reaches `value`,
/// compared as a wrapping 32-bit counter: `int32(*word - value) >= 0`. Work after it on `stream` starts
/// once the value is seen and the work before it is done. The host publishes the value with a release
/// store after writing what the later work reads. A value that never comes hangs the stream, as a host
/// function that never returns would.
void launch_wait_host_value(const std::uint32_t* word, std::uint32_t value, Stream stream);

}  // namespace hattn::cuda
