#pragma once
// Sequences over a HostKVPool: a page table per layer, append (prefill chunks and single decode
// tokens), readback and release. Summaries are kept current on every append.
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <unordered_map>
#include <vector>

#include "hattn/core/model_shape.hpp"
#include "hattn/core/tensor_view.hpp"
#include "hattn/kv/host_kv_pool.hpp"
#include "hattn/kv/page_summary.hpp"

namespace hattn {

/// Identifies a sequence (a request) for its whole life; ids are never reused by one store.
using SeqId = std::int64_t;

/// The KV of every layer of every sequence, in one pool.
class PagedKVStore {
 public:
  /// Layout is taken from `shape` (KV heads, head dim, dtype) and `page_size`.
  PagedKVStore(const ModelShape& shape, int page_size, std::size_t pool_bytes,
               HostMemoryRequest request = HostMemoryRequest::kAuto);

  SeqId add_sequence();
  /// Appends `keys` and `values`, host tensors [n_tokens, kv_heads, head_dim] in the KV dtype (the
  /// layout attention projections produce). All pages needed are taken before anything is written:
  /// on OutOfCapacity or bad input the sequence is unchanged. Fine and coarse summaries of the
  /// touched pages are current when it returns. Appends to different sequences may run concurrently;
  /// appends to one sequence must not overlap each other or readers of that sequence.
  void append(SeqId seq, int layer, const TensorView& keys, const TensorView& values);
  /// Copies tokens [begin, begin + n) back into host tensors [n, kv_heads, head_dim].
  void read(SeqId seq, int layer, std::int64_t begin, std::int64_t n, const TensorView& keys_out,
            const TensorView& values_out) const;
  /// Returns every page of every layer of `seq` to the pool.
  void release(SeqId seq);

  bool contains(SeqId seq) const;
  std::int64_t length(SeqId seq, int layer) const;
  /// Tokens in the last page of `layer` (page_size when it is full; 0 when there are no pages).
  int last_page_tokens(SeqId seq, int layer) const;
  /// Page ids of `layer` in token order; page i holds tokens [i * page_size, (i + 1) * page_size).
  /// The span is valid until the next append to this (seq, layer).
  std::span<const PageId> pages(SeqId seq, int layer) const;
  /// Coarse summaries of `layer`, fp32 [groups][kv_heads][3][head_dim], group g covering pages
  /// [g * kPagesPerSummaryGroup, (g + 1) * kPagesPerSummaryGroup): element-wise min and max of the
  /// group's keys (exact) and their mean (accumulated in double, rounded once to fp32).
  /// Fine summaries (per page, in the KV dtype) are in pool().summary(page): see compute_page_summary.
  /// The span is valid until the next append to this (seq, layer).
  std::span<const float> group_summaries(SeqId seq, int layer) const;
  std::vector<SeqId> sequences() const;

  const ModelShape& shape() const noexcept { return shape_; }
  const PageLayout& layout() const noexcept { return pool_.layout(); }
  HostKVPool& pool() noexcept { return pool_; }
  const HostKVPool& pool() const noexcept { return pool_; }

 private:
  struct LayerTable {
    std::vector<PageId> pages;
    std::int64_t length = 0;
    std::vector<float> groups;  // [groups][kv_heads][3][head_dim]
    // Running state of the last page (fp32, as compute_page_summary accumulates) and of the last
    // coarse group (double sum), each [kv_heads][head_dim]: appends cost O(new tokens).
    std::vector<float> page_min, page_max, page_sum;
    std::vector<double> group_sum;
  };
  struct Sequence {
    std::vector<LayerTable> layers;
  };

  const Sequence& find(SeqId seq, const char* where) const;
  Sequence& find(SeqId seq, const char* where);
  void check_layer(int layer, const char* where) const;
  template <class T>
  void update_summaries(LayerTable& table, const T* keys, std::int64_t n);

  ModelShape shape_;
  HostKVPool pool_;
  mutable std::mutex mutex_;
  std::unordered_map<SeqId, std::unique_ptr<Sequence>> sequences_;
  SeqId next_id_ = 0;
};

}  // namespace hattn
