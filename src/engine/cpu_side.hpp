#pragma once
// The CPU half of a layer: score the pages of each request's CPU range from their summaries, select
// within the range by the segment's rule, and run the SIMD kernel over the selection.
#include <cstdint>
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

  /// q: [batch][q_heads][head_dim] host fp32. Writes out [batch][q_heads][head_dim] and lse
  /// [batch][q_heads] (natural log; rows whose range is empty get 0 and -inf) and the pages
  /// selected per segment into selected [batch * kv_heads]. Blocks until done.
  void compute(const LayerWork& work, const float* q, float* out, float* lse, int* selected);

 private:
  struct Segment {
    std::vector<float> upper, estimate;
    std::vector<std::int32_t> positions;
    std::vector<PageId> pages;
    std::vector<std::uint64_t> masks;
  };
  void select_segment(const LayerWork& work, int row, int head, const float* q, Segment& seg, int& last_tokens);

  const Config& config_;
  const PagedKVStore& store_;
  ThreadPool& threads_;
  CpuDecoder decoder_;
  std::vector<Segment> segments_;
  std::vector<CpuDecodeItem> items_;
  std::vector<int> order_;
};

}  // namespace hattn::detail
