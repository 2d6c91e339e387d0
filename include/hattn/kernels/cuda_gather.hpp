#pragma once
// Copies (page, KV head) blocks of the pinned host pool into HBM slots at PCIe speed, one kernel for
// a whole list (one cudaMemcpyAsync per 4 KB block reaches only ~1.4 GB/s; a gather kernel ~50 GB/s).
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

struct GatherParams {
  const void* host_pages = nullptr;      ///< pool page arena (mapped, UVA), PageLayout HND
  void* hbm_slots = nullptr;             ///< [slots][2][page_size][head_dim]
  const std::int32_t* page_ids = nullptr;  ///< [n] device
  const std::int32_t* heads = nullptr;     ///< [n] KV head of each block
  const std::int32_t* slots = nullptr;     ///< [n] destination slot; a negative slot skips the entry
  const std::int32_t* count = nullptr;     ///< nullptr, or a device count <= n (set by an earlier kernel)
  int n = 0;
  int kv_heads = 0, page_size = 0, head_dim = 0;
  DType dtype = DType::kBFloat16;
};

void launch_gather_pages(const GatherParams& p, Stream stream);

}  // namespace hattn::cuda
