#pragma once
// A step's metadata (page tables, budgets, offsets) from pinned mapped host memory to the device by a
// kernel that reads it in place. A cudaMemcpyAsync of the ~33 KB of a 128K-token layer took ~10 us on
// the device (copy-engine scheduling, not bytes); SMs reading across PCIe finish in a few.
#include <cstddef>
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// device[i] = host_mapped[i] for i < count. `host_mapped` is pinned, mapped host memory (UVA), 16-byte
/// aligned; `device` is device memory, 16-byte aligned.
void launch_upload_words(const std::int32_t* host_mapped, std::int32_t* device, std::size_t count, Stream stream);

}  // namespace hattn::cuda
