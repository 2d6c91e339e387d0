#pragma once
// CPU sparse decode attention over pages of a HostKVPool, with runtime ISA dispatch.
#include <cstdint>
#include <memory>
#include <span>

#include "hattn/core/thread_pool.hpp"
#include "hattn/kernels/cpu_isa.hpp"
#include "hattn/kv/host_kv_pool.hpp"

namespace hattn {

/// One unit of work: the query heads of one GQA group of one request over a list of pages.
struct CpuDecodeItem {
  const float* q = nullptr;                    ///< [group][head_dim] fp32, not yet scaled
  const PageId* pages = nullptr;               ///< n_pages ids in the pool, in token order
  const std::uint64_t* token_masks = nullptr;  ///< nullptr, or [n_pages]: bit t set = token t attended
  std::int32_t n_pages = 0;
  std::int32_t last_page_tokens = 0;  ///< valid tokens of pages[n_pages - 1], 1..page_size; others full
  std::int32_t kv_head = 0;
  float* out = nullptr;  ///< [group][head_dim] fp32, normalised by its own softmax sum
  float* lse = nullptr;  ///< [group] natural log; -inf (and out = 0) when nothing is attended
};

/// Resolves the ISA once and keeps its scratch, so run() neither dispatches nor allocates per call
/// (beyond growing scratch the first time a larger batch arrives).
class CpuDecoder {
 public:
  CpuDecoder(ThreadPool& threads, CpuIsa isa = detect_cpu_isa());
  ~CpuDecoder();
  CpuIsa isa() const noexcept;
  /// Computes every item, splitting long page lists across workers along the pages and merging the
  /// pieces by LSE. logits are scale * q.k. Blocks until done. `group_size` query heads per item.
  /// Throws InvalidArgument (before any work) for a bad group size, KV head, null pointer or
  /// last_page_tokens; page ids are not checked. One run() at a time per decoder (it owns the
  /// scratch); several decoders may share one ThreadPool (their calls are serialised there).
  void run(const HostKVPool& pool, int group_size, float scale, std::span<const CpuDecodeItem> items);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hattn
