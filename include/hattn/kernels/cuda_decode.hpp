#pragma once
// GPU sparse paged decode (flash-decoding over the selected pages) and the LSE merge of partials
// (DESIGN.md steps 5 and 6). Pages are read from HBM slots when cached, else straight from the
// mapped pinned host pool (zero-copy).
#include <cstddef>
#include <cstdint>

#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cuda_staging.hpp"
#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Which decode kernel runs. kAuto lets launch_sparse_decode choose (decode_kernel_for says what it
/// picks); the others force one, for tests and benchmarks, and throw where it cannot run.
enum class DecodeKernel {
  kAuto,
  kCudaCores,    ///< fp32 FMAs per query head; any group size, head dims 64, 128, 256
  kTensorCores,  ///< mma.sync over the GQA group as one 16-row tile; groups 1..8, head dims 64, 128
};

/// "auto", "cuda_cores" or "tensor_cores".
const char* to_string(DecodeKernel k);

struct SparseDecodeParams {
  const float* q = nullptr;                   ///< [batch][q_heads][head_dim] fp32, device
  const std::int32_t* page_table = nullptr;   ///< page ids, request b at [page_indptr[b], page_indptr[b + 1])
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1]
  const std::int32_t* seq_len = nullptr;      ///< [batch] tokens (the last page may be partial)
  /// Selected page positions of segment s = b * kv_heads + h at selected[selected_offset[s] + i],
  /// i < selected_count[s], ascending.
  const std::int32_t* selected = nullptr;
  const std::int32_t* selected_offset = nullptr;  ///< [batch * kv_heads]
  const std::int32_t* selected_count = nullptr;   ///< [batch * kv_heads]
  const std::uint64_t* token_masks = nullptr;     ///< nullptr, or parallel to selected: bit t = token t attended
  const std::int32_t* slot_of = nullptr;  ///< nullptr, or [pool_pages * kv_heads]: HBM slot of (page, head) or -1
  const void* host_pages = nullptr;       ///< pool page arena (mapped, UVA), PageLayout HND
  const void* hbm_slots = nullptr;        ///< [slots][2][page_size][head_dim]: K then V of one head of one page
  int batch = 0, q_heads = 0, kv_heads = 0, head_dim = 0, page_size = 0;
  DType dtype = DType::kBFloat16;
  float scale = 0;
  int splits = 1;  ///< chunks per segment along its selected list (flash-decoding); partials per row
  float* partial_out = nullptr;  ///< [splits][batch * q_heads][head_dim]
  float* partial_lse = nullptr;  ///< [splits][batch * q_heads], natural log, -inf for an empty chunk
  DecodeKernel kernel = DecodeKernel::kAuto;
  /// The merge folded in (a step with no other partial to merge, such as the CPU's): where set, the
  /// last split block of each segment to finish merges the segment's rows as launch_merge_partials
  /// would into out [batch * q_heads][head_dim] (and lse, natural log, where set), so no merge
  /// launch follows. `arrivals`: decode_workspace_bytes() bytes, zeroed once when allocated; every
  /// launch leaves it zeroed.
  float* out = nullptr;
  float* lse = nullptr;
  std::uint32_t* arrivals = nullptr;
  /// Where enabled (DeviceKVCache::staging(), filled by launch_stage_blocks), the tensor-core kernel
  /// reads a block without an HBM slot from the staging area when it is there. The CUDA-core kernel
  /// reads such blocks from the host.
  StagingArea staging;
};

/// What launch_stage_blocks needs to stage the misses of the decode `p` into p.staging before `p`
/// runs: its selection, its pools and its area. `max_count` bounds every selected_count.
inline StageParams stage_params_for(const SparseDecodeParams& p, std::int32_t max_count) {
  StageParams s;
  s.page_table = p.page_table;
  s.page_indptr = p.page_indptr;
  s.seq_len = p.seq_len;
  s.selected = p.selected;
  s.selected_offset = p.selected_offset;
  s.selected_count = p.selected_count;
  s.slot_of = p.slot_of;
  s.host_pages = p.host_pages;
  s.batch = p.batch;
  s.kv_heads = p.kv_heads;
  s.head_dim = p.head_dim;
  s.page_size = p.page_size;
  s.dtype = p.dtype;
  s.max_count = max_count;
  s.staging = p.staging;
  return s;
}

/// Bytes of SparseDecodeParams::arrivals for `segments` (request, KV head) segments.
std::size_t decode_workspace_bytes(int segments);

void launch_sparse_decode(const SparseDecodeParams& p, Stream stream);

/// The kernel launch_sparse_decode runs for `p` (never kAuto); throws InvalidArgument when a forced
/// kernel does not support the shape.
DecodeKernel decode_kernel_for(const SparseDecodeParams& p);

/// Plan-time helper: splits per segment that fill the current device with one wave of blocks
/// without chunks shorter than 8 tiles of 16 tokens. `max_selected_pages`: the longest
/// selected list of any segment.
int suggest_decode_splits(int segments, std::int64_t max_selected_pages, int page_size);

/// out[r] = LSE merge of partial_out[0..splits)[r] and, if extra_out is set, extra_out[r] (the CPU
/// partials, possibly in mapped host memory). Empty partials (lse = -inf) merge to (0, -inf).
struct MergeParams {
  const float* partial_out = nullptr;  ///< [splits][rows][head_dim]
  const float* partial_lse = nullptr;  ///< [splits][rows]
  int splits = 0;
  const float* extra_out = nullptr;  ///< nullptr or [rows][head_dim]
  const float* extra_lse = nullptr;  ///< nullptr or [rows]
  int rows = 0, head_dim = 0;
  float* out = nullptr;  ///< [rows][head_dim] fp32
  float* lse = nullptr;  ///< [rows] natural log; may be nullptr
};

void launch_merge_partials(const MergeParams& p, Stream stream);

}  // namespace hattn::cuda
