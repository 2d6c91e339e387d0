#include "zoo/zoo_trace.hpp"

#include <algorithm>
#include <cmath>

#include "hattn/core/error.hpp"
#include "hattn/kernels/cpu_select.hpp"
#include "hattn/kv/page_layout.hpp"
#include "hattn/kv/paged_kv_store.hpp"

namespace hattn::zoo {

namespace {
constexpr int kPageSize = 16;
}

struct ZooSelectionTrace::State {
  ZooTraceConfig config;
  HeadZoo zoo;
  PagedKVStore store;
  SeqId seq;
  int step = 0;
  std::vector<std::vector<int>> selected;  // [layer * kv_heads + kv_head], ascending positions
  std::vector<float> q, upper, estimate;
  std::vector<std::int32_t> chosen;

  // Every layer's pages of the prompt and the steps, each with its summaries.
  static std::size_t pool_bytes(const ZooTraceConfig& c, const ModelShape& s) {
    const PageLayout layout{kPageSize, s.kv_heads, s.head_dim, s.kv_dtype};
    const std::int64_t pages = (c.zoo.context_tokens + c.max_steps + 1 + kPageSize - 1) / kPageSize;
    return static_cast<std::size_t>(pages) * s.layers * (layout.page_bytes() + layout.summary_bytes());
  }
  State(const ZooTraceConfig& c, HeadZoo z)
      : config(c), zoo(std::move(z)), store(zoo.shape(), kPageSize, pool_bytes(c, zoo.shape()), HostMemoryRequest::kAligned),
        seq(store.add_sequence()) {}
};

ZooSelectionTrace::ZooSelectionTrace(const ZooTraceConfig& config) {
  const char* kWhere = "ZooSelectionTrace";
  detail::require(config.budget > 0.0 && config.budget <= 1.0, kWhere, "budget", config.budget, "in (0, 1]");
  detail::require(config.sink_pages >= 0 && config.local_pages >= 0, kWhere, "sink_pages/local_pages",
                  std::min(config.sink_pages, config.local_pages), ">= 0");
  detail::require(config.max_steps > 0, kWhere, "max_steps", config.max_steps, "> 0");
  state_ = std::make_unique<State>(config, HeadZoo(config.zoo, config.max_steps + 1));
  auto& st = *state_;
  const ModelShape& s = st.zoo.shape();
  const std::int64_t n = config.zoo.context_tokens;
  std::vector<bfloat16_t> keys(static_cast<std::size_t>(n) * s.kv_heads * s.head_dim), values(keys.size());
  for (int l = 0; l < s.layers; ++l) {
    st.zoo.tokens(l, 0, n, keys, values);
    st.store.append(st.seq, l, TensorView::contiguous(keys.data(), DType::kBFloat16, {n, s.kv_heads, s.head_dim}),
                    TensorView::contiguous(values.data(), DType::kBFloat16, {n, s.kv_heads, s.head_dim}));
  }
  st.selected.resize(static_cast<std::size_t>(s.layers) * s.kv_heads);
  st.q.resize(static_cast<std::size_t>(s.q_heads) * s.head_dim);
  append_and_select();
}

ZooSelectionTrace::~ZooSelectionTrace() = default;
ZooSelectionTrace::ZooSelectionTrace(ZooSelectionTrace&&) noexcept = default;
ZooSelectionTrace& ZooSelectionTrace::operator=(ZooSelectionTrace&&) noexcept = default;

int ZooSelectionTrace::layers() const noexcept { return state_->zoo.shape().layers; }
int ZooSelectionTrace::kv_heads() const noexcept { return state_->zoo.shape().kv_heads; }
int ZooSelectionTrace::step() const noexcept { return state_->step; }
HeadKind ZooSelectionTrace::kind(int layer, int kv_head) const { return state_->zoo.kind(layer, kv_head); }

int ZooSelectionTrace::pages(int request) const {
  detail::require(request == 0, "ZooSelectionTrace::pages", "request", request, "0 (one request)");
  return static_cast<int>(state_->store.pages(state_->seq, 0).size());
}

const std::vector<int>& ZooSelectionTrace::selected(int request, int layer, int kv_head) const {
  const char* kWhere = "ZooSelectionTrace::selected";
  detail::require(request == 0, kWhere, "request", request, "0 (one request)");
  detail::require(layer >= 0 && layer < layers(), kWhere, "layer", layer, "in [0, layers)");
  detail::require(kv_head >= 0 && kv_head < kv_heads(), kWhere, "kv_head", kv_head, "in [0, kv_heads)");
  return state_->selected[static_cast<std::size_t>(layer) * kv_heads() + kv_head];
}

void ZooSelectionTrace::advance() {
  auto& st = *state_;
  detail::require(st.step + 1 <= st.config.max_steps, "ZooSelectionTrace::advance", "step", st.step + 1,
                  "<= max_steps");
  ++st.step;
  append_and_select();
}

void ZooSelectionTrace::append_and_select() {
  auto& st = *state_;
  const ModelShape& s = st.zoo.shape();
  const int group = s.group_size();
  // As a decode step runs: the step's token is appended to every layer, then its query attends over
  // the whole sequence, its own token included.
  std::vector<bfloat16_t> k(static_cast<std::size_t>(s.kv_heads) * s.head_dim), v(k.size());
  for (int l = 0; l < s.layers; ++l) {
    st.zoo.tokens(l, st.zoo.step_position(st.step), 1, k, v);
    st.store.append(st.seq, l, TensorView::contiguous(k.data(), DType::kBFloat16, {1, s.kv_heads, s.head_dim}),
                    TensorView::contiguous(v.data(), DType::kBFloat16, {1, s.kv_heads, s.head_dim}));
  }
  for (int l = 0; l < s.layers; ++l) {
    st.zoo.query(l, st.step, st.q);
    const auto pages = st.store.pages(st.seq, l);
    const int n = static_cast<int>(pages.size());
    const int k = std::max(1, static_cast<int>(std::ceil(st.config.budget * n)));
    st.upper.resize(static_cast<std::size_t>(n));
    st.estimate.resize(static_cast<std::size_t>(n));
    for (int h = 0; h < s.kv_heads; ++h) {
      const std::span<const float> q(st.q.data() + static_cast<std::size_t>(h) * group * s.head_dim,
                                     static_cast<std::size_t>(group) * s.head_dim);
      cpu_score_pages(st.store.pool(), h, q, group, st.zoo.scale(), pages, st.store.last_page_tokens(st.seq, l),
                      st.upper, st.estimate);
      cpu_select_top_k(st.upper, k, st.config.sink_pages, st.config.local_pages, 0, n, st.chosen);
      auto& out = st.selected[static_cast<std::size_t>(l) * s.kv_heads + h];
      out.assign(st.chosen.begin(), st.chosen.end());
    }
  }
}

}  // namespace hattn::zoo
