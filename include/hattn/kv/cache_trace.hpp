#pragma once
// Synthetic page-selection traces for judging a cache policy before the head zoo exists: growing
// sequences whose heads select sinks and a local window, a hot set that drifts a few pages at a
// time (retrieval and diffuse heads), and needles that recur at long, jittered periods (the reuse
// distance that separates a good LRU approximation from a bad one). Deterministic for a seed.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "hattn/core/error.hpp"

namespace hattn {

struct SelectionTraceConfig {
  int requests = 4;
  int layers = 4;
  int kv_heads = 4;
  int start_pages = 256;     ///< pages of every sequence at step 0
  int page_size = 16;        ///< a sequence gains a page every page_size steps (one token per step)
  int sinks = 1;             ///< first pages, always selected
  int window = 2;            ///< last pages, always selected
  int hot_pages = 24;        ///< hot set of a retrieval head (diffuse heads: twice that)
  double drift = 0.05;       ///< per step, chance that a hot page moves a few pages
  double jump = 0.01;        ///< per step, chance that a hot page jumps anywhere
  int needles = 4;           ///< recurring pages of a retrieval head
  int needle_period = 40;    ///< mean steps between a needle's selections (jittered +-50%)
  int noise = 2;             ///< uniformly random pages per step of a diffuse head
  std::uint64_t seed = 1;
};

/// Per step, per request, layer and KV head, the page positions a selector would pick.
class SelectionTrace {
 public:
  enum class HeadKind : std::uint8_t { kRetrieval, kDiffuse, kLocal };

  explicit SelectionTrace(const SelectionTraceConfig& c) : c_(c), rng_(c.seed) {
    detail::require(c.requests > 0 && c.layers > 0 && c.kv_heads > 0, "SelectionTrace", "requests/layers/kv_heads",
                    c.requests * c.layers * c.kv_heads, "> 0 each");
    detail::require(c.start_pages > c.sinks + c.window, "SelectionTrace", "start_pages", c.start_pages,
                    "> sinks + window");
    pages_.assign(static_cast<std::size_t>(c.requests), c.start_pages);
    heads_.resize(static_cast<std::size_t>(c.requests) * c.layers * c.kv_heads);
    for (auto& h : heads_) {
      const double u = uniform();
      h.kind = u < 0.5 ? HeadKind::kRetrieval : (u < 0.75 ? HeadKind::kDiffuse : HeadKind::kLocal);
      const int hot = h.kind == HeadKind::kRetrieval ? c.hot_pages : (h.kind == HeadKind::kDiffuse ? 2 * c.hot_pages : 0);
      for (int i = 0; i < hot; ++i) h.hot.push_back(random_page(c.start_pages));
      if (h.kind == HeadKind::kRetrieval)
        for (int i = 0; i < c.needles; ++i) {
          const int period = std::max(2, c.needle_period / 2 + static_cast<int>(uniform() * c.needle_period));
          h.needles.push_back({random_page(c.start_pages), period, static_cast<int>(uniform() * period)});
        }
    }
    selected_.resize(heads_.size());
    fill();
  }

  /// Next decode step: every sequence gains a token, hot sets drift, needles come due.
  void advance() {
    ++step_;
    for (auto& p : pages_)
      if (step_ % c_.page_size == 0) ++p;
    for (std::size_t i = 0; i < heads_.size(); ++i) {
      const int n = pages_[i / (static_cast<std::size_t>(c_.layers) * c_.kv_heads)];
      for (auto& p : heads_[i].hot) {
        const double u = uniform();
        if (u < c_.jump) p = random_page(n);
        else if (u < c_.jump + c_.drift) p = std::clamp(p + static_cast<int>(uniform() * 7) - 3, 0, n - 1);
      }
    }
    fill();
  }

  /// Page positions (ascending, distinct) selected by (request, layer, head) at the current step.
  const std::vector<int>& selected(int request, int layer, int head) const { return selected_[index(request, layer, head)]; }
  HeadKind kind(int request, int layer, int head) const { return heads_[index(request, layer, head)].kind; }
  /// Pages of a request's sequence (every layer has the same count).
  int pages(int request) const { return pages_[static_cast<std::size_t>(request)]; }
  int step() const noexcept { return step_; }
  const SelectionTraceConfig& config() const noexcept { return c_; }
  int requests() const noexcept { return c_.requests; }
  int layers() const noexcept { return c_.layers; }
  int kv_heads() const noexcept { return c_.kv_heads; }

 private:
  struct Needle {
    int page, period, phase;
  };
  struct Head {
    HeadKind kind = HeadKind::kLocal;
    std::vector<int> hot;
    std::vector<Needle> needles;
  };

  std::size_t index(int r, int l, int h) const {
    return (static_cast<std::size_t>(r) * c_.layers + l) * c_.kv_heads + h;
  }
  double uniform() { return std::uniform_real_distribution<double>(0.0, 1.0)(rng_); }
  int random_page(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }

  void fill() {
    for (std::size_t i = 0; i < heads_.size(); ++i) {
      const int n = pages_[i / (static_cast<std::size_t>(c_.layers) * c_.kv_heads)];
      auto& out = selected_[i];
      out.clear();
      for (int p = 0; p < c_.sinks; ++p) out.push_back(p);
      for (int p = n - c_.window; p < n; ++p) out.push_back(p);
      const auto& h = heads_[i];
      out.insert(out.end(), h.hot.begin(), h.hot.end());
      for (const auto& nd : h.needles)
        if (step_ % nd.period == nd.phase) out.push_back(nd.page);
      if (h.kind == HeadKind::kDiffuse)
        for (int k = 0; k < c_.noise; ++k) out.push_back(random_page(n));
      std::sort(out.begin(), out.end());
      out.erase(std::unique(out.begin(), out.end()), out.end());
    }
  }

  SelectionTraceConfig c_;
  std::mt19937_64 rng_;
  int step_ = 0;
  std::vector<int> pages_;
  std::vector<Head> heads_;
  std::vector<std::vector<int>> selected_;
};

}  // namespace hattn
