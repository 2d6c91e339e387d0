#pragma once
// Page-selection traces of the head zoo, for judging the HBM cache on structured heads rather than
// on SelectionTrace's synthetic hot sets: the prompt of every zoo layer goes into a PagedKVStore,
// and each decode step appends its token and selects, per KV head, the pages a GPU-only
// Quest-like system would read: the top `budget` share of pages by the Quest bound of the group's
// queries (cpu_score_pages, cpu_select_top_k), sinks and the local window forced. Queries drift and
// retrieval heads switch needles as the zoo makes them, so the trace carries the zoo's churn.
#include <memory>
#include <vector>

#include "zoo/head_zoo.hpp"

namespace hattn::zoo {

struct ZooTraceConfig {
  ZooConfig zoo;            ///< layers, context and seed of the generated heads
  double budget = 0.05;     ///< share of a head's pages selected per step (forced pages included)
  int sink_pages = 1;       ///< first pages, always selected
  int local_pages = 1;      ///< last pages, always selected
  int max_steps = 64;       ///< decode steps advance() may take
};

/// One request over the zoo's layers; the interface hattn::replay() takes (ReplayableTrace).
class ZooSelectionTrace {
 public:
  /// Generates and stores the prompt (context_tokens of every layer), appends step 0's token and
  /// selects step 0.
  explicit ZooSelectionTrace(const ZooTraceConfig& config);
  ~ZooSelectionTrace();
  ZooSelectionTrace(ZooSelectionTrace&&) noexcept;
  ZooSelectionTrace& operator=(ZooSelectionTrace&&) noexcept;

  int requests() const noexcept { return 1; }
  int layers() const noexcept;
  int kv_heads() const noexcept;
  /// Pages of the sequence (every layer holds the same tokens count).
  int pages(int request) const;
  /// Ascending page positions selected by (layer, KV head) at the current step.
  const std::vector<int>& selected(int request, int layer, int kv_head) const;
  int step() const noexcept;
  /// What the zoo built KV head `kv_head` of generated layer `layer` to be.
  HeadKind kind(int layer, int kv_head) const;
  /// The next decode step: appends its token to every layer and selects. Throws InvalidArgument
  /// past max_steps.
  void advance();

 private:
  struct State;
  void append_and_select();
  std::unique_ptr<State> state_;
};

}  // namespace hattn::zoo
