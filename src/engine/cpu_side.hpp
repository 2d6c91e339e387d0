#pragma once
// The CPU half of a layer: either score every page from its summary and select by the segment's rule
// (the CPU backend), or take the CPU's part of a selection the GPU made and split (the GPU backend);
// then run the SIMD kernel over the selected pages.
#include <cstdint>
#include <span>
#include <vector>

#include "hattn/config.hpp"
#include "hattn/detail/decode_engine.hpp"
#include "hattn/kernels/cpu_decode.hpp"
#include "hattn/kv/paged_kv_store.hpp"

namespace hattn::detail {

class CpuSide {
 public:
  CpuSide(const Config& config, const PagedKVStore& store, ThreadPool& threads, CpuIsa isa);

  CpuIsa isa() const noexcept { return decoder_.isa(); }
  /// Microseconds the last call spent in the SIMD kernel (the rest of it builds the page lists).
  double last_kernel_us() const noexcept { return last_kernel_us_; }

  /// The CPU backend: scores and selects every page of every segment by its rule, then decodes.
  /// q: [batch][q_heads][head_dim] host fp32. Writes out [batch][q_heads][head_dim] and lse
  /// [batch][q_heads] (natural log; rows with nothing selected get 0 and -inf) and the pages
  /// selected per segment into selected [batch * kv_heads]. Blocks until done.
  void compute(const LayerWork& work, const float* q, float* out, float* lse, int* selected);

  /// The CPU's part of a selection the GPU made over whole sequences: for segment s = b * kv_heads + h,
  /// the positions positions[offsets[s] .. offsets[s] + counts[s]), ascending. No scoring or selection
  /// here. Same outputs as compute().
  void compute_selected(const LayerWork& work, const float* q, const std::int32_t* positions,
                        const std::int32_t* offsets, const std::int32_t* counts, float* out, float* lse,
                        int* selected);

 private:
  struct Segment {
    std::vector<float> upper, estimate;
    std::vector<float> group_upper, group_estimate;  // two-level scoring (Config::coarse_keep)
    std::vector<std::int32_t> candidates;            // page positions of the kept groups
    std::vector<std::int32_t> positions;
    std::vector<PageId> pages;
  };
  void select_segment(const LayerWork& work, int row, int head, const float* q, Segment& seg, int& last_tokens);
  // Decodes the pages of segments_[0, batch * kv_heads) and writes every row's out and lse.
  void decode_segments(const LayerWork& work, const float* q, std::span<const int> last_tokens, float* out,
                       float* lse, int* selected);

  const Config& config_;
  const PagedKVStore& store_;
  ThreadPool& threads_;
  CpuDecoder decoder_;
  std::vector<Segment> segments_;
  std::vector<CpuDecodeItem> items_;
  double last_kernel_us_ = 0;
};

}  // namespace hattn::detail
