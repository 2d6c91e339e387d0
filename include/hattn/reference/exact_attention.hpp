#pragma once
// Exact attention in double precision: the yardstick every kernel and policy is judged by.
// LSE is the natural log of the sum of exp(scale * q.k) over the attended keys.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/kv/paged_kv_store.hpp"

namespace hattn::reference {

/// Softmax-normalised output and its LSE (natural log) for a set of query heads.
/// An empty partial has lse = -inf and a zero output.
struct Partial {
  std::vector<double> out;  ///< [heads][head_dim]
  std::vector<double> lse;  ///< [heads]
};

/// Which tokens a head attends: positions in the sequence's page table, ascending, and optionally a
/// token mask per listed page (bit t set = token t of that page attended).
struct HeadSelection {
  std::vector<std::int32_t> pages;
  std::vector<std::uint64_t> token_masks;  ///< empty = every valid token of each listed page
};

/// Exact attention of one query vector over explicit key/value rows given as doubles.
/// keys, values: [n][dim]. Writes out[dim] and returns lse (natural log; -inf when n == 0).
inline double attend(std::span<const double> q, std::span<const double> keys, std::span<const double> values,
                     std::size_t n, double scale, std::span<double> out) {
  const std::size_t dim = q.size();
  std::vector<double> logits(n);
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < n; ++i) {
    double s = 0;
    for (std::size_t d = 0; d < dim; ++d) s += q[d] * keys[i * dim + d];
    logits[i] = s * scale;
    m = std::max(m, logits[i]);
  }
  for (std::size_t d = 0; d < dim; ++d) out[d] = 0;
  if (n == 0) return -std::numeric_limits<double>::infinity();
  double sum = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const double p = std::exp(logits[i] - m);
    sum += p;
    for (std::size_t d = 0; d < dim; ++d) out[d] += p * values[i * dim + d];
  }
  for (std::size_t d = 0; d < dim; ++d) out[d] /= sum;
  return m + std::log(sum);
}

/// Merges two partials of the same heads over disjoint key sets: the joint softmax.
/// Two empty partials give an empty partial (zeros, -inf), never NaN.
inline Partial merge(const Partial& a, const Partial& b) {
  detail::require(a.lse.size() == b.lse.size() && a.out.size() == b.out.size(), "reference::merge",
                  "partial sizes", detail::concat(a.out.size(), " vs ", b.out.size()), "equal");
  Partial r{std::vector<double>(a.out.size()), std::vector<double>(a.lse.size())};
  const std::size_t heads = a.lse.size();
  const std::size_t dim = heads ? a.out.size() / heads : 0;
  for (std::size_t h = 0; h < heads; ++h) {
    const double m = std::max(a.lse[h], b.lse[h]);
    if (m == -std::numeric_limits<double>::infinity()) {
      r.lse[h] = m;
      continue;
    }
    const double wa = std::exp(a.lse[h] - m);
    const double wb = std::exp(b.lse[h] - m);
    r.lse[h] = m + std::log(wa + wb);
    for (std::size_t d = 0; d < dim; ++d)
      r.out[h * dim + d] = (wa * a.out[h * dim + d] + wb * b.out[h * dim + d]) / (wa + wb);
  }
  return r;
}

/// Merges any number of partials of the same heads over pairwise disjoint key sets, left to right.
/// No partials at all is an error: the head count would be unknown.
inline Partial merge(std::span<const Partial> partials) {
  detail::require(!partials.empty(), "reference::merge", "partials.size()", partials.size(), ">= 1");
  Partial r = partials.front();
  for (std::size_t i = 1; i < partials.size(); ++i) r = merge(r, partials[i]);
  return r;
}

/// Exact decode attention of one sequence and layer: q is [q_heads][head_dim] (fp32), GQA group g
/// reads KV head g / (q_heads / kv_heads). `selection`, if given, holds one HeadSelection per KV head;
/// otherwise every token is attended. Returns out [q_heads][head_dim] and lse [q_heads].
inline Partial decode(const PagedKVStore& store, SeqId seq, int layer, std::span<const float> q, double scale,
                      const std::vector<HeadSelection>* selection = nullptr) {
  const ModelShape& shape = store.shape();
  const PageLayout& layout = store.layout();
  const int dim = shape.head_dim;
  detail::require(q.size() == static_cast<std::size_t>(shape.q_heads) * dim, "reference::decode", "q.size()",
                  q.size(), "q_heads * head_dim");
  detail::require(selection == nullptr || selection->size() == static_cast<std::size_t>(shape.kv_heads),
                  "reference::decode", "selection.size()", selection ? selection->size() : 0, "kv_heads");
  detail::require(std::isfinite(scale), "reference::decode", "scale", scale, "finite");
  const auto pages = store.pages(seq, layer);
  const std::int64_t length = store.length(seq, layer);
  Partial r{std::vector<double>(static_cast<std::size_t>(shape.q_heads) * dim),
            std::vector<double>(static_cast<std::size_t>(shape.q_heads))};
  const int group = shape.group_size();
  for (int kvh = 0; kvh < shape.kv_heads; ++kvh) {
    std::vector<double> keys, values;
    auto take = [&](std::int64_t page_index, int tok) {
      const std::byte* page = store.pool().page(pages[page_index]);
      for (int d = 0; d < dim; ++d) {
        keys.push_back(load_as_float(page, layout.key_offset(kvh, tok) + d, layout.dtype));
        values.push_back(load_as_float(page, layout.value_offset(kvh, tok) + d, layout.dtype));
      }
    };
    auto valid = [&](std::int64_t page_index) {
      return static_cast<int>(std::min<std::int64_t>(layout.page_size, length - page_index * layout.page_size));
    };
    if (selection == nullptr) {
      for (std::int64_t p = 0; p < static_cast<std::int64_t>(pages.size()); ++p)
        for (int t = 0; t < valid(p); ++t) take(p, t);
    } else {
      const HeadSelection& sel = (*selection)[kvh];
      detail::require(sel.token_masks.empty() || sel.token_masks.size() == sel.pages.size(), "reference::decode",
                      "selection.token_masks.size()", sel.token_masks.size(),
                      "0 or pages.size() = ", sel.pages.size());
      for (std::size_t i = 0; i < sel.pages.size(); ++i) {
        const std::int32_t p = sel.pages[i];
        detail::require(p >= 0 && p < static_cast<std::int64_t>(pages.size()), "reference::decode",
                        "selected page index", p,
                        "in [0, ", pages.size(), ") (the page table)");
        // A page listed twice would count its keys twice; ascending order rules that out.
        detail::require(i == 0 || p > sel.pages[i - 1], "reference::decode", "selected page index", p,
                        "strictly ascending within a head's selection");
        for (int t = 0; t < valid(p); ++t)
          if (sel.token_masks.empty() || ((sel.token_masks[i] >> t) & 1u)) take(p, t);
      }
    }
    const std::size_t n = keys.size() / dim;
    for (int g = 0; g < group; ++g) {
      const int qh = kvh * group + g;
      std::vector<double> qd(q.begin() + static_cast<std::ptrdiff_t>(qh) * dim,
                             q.begin() + static_cast<std::ptrdiff_t>(qh + 1) * dim);
      r.lse[qh] = attend(qd, keys, values, n, scale, std::span<double>(r.out).subspan(static_cast<std::size_t>(qh) * dim, dim));
    }
  }
  return r;
}

/// Exact decode attention of a batch: sequence seqs[b] attends with queries q[b], where q is
/// [batch][q_heads][head_dim] (fp32). Sequences may have any (ragged) lengths. Returns one Partial per
/// sequence, as decode() would.
inline std::vector<Partial> decode_batch(const PagedKVStore& store, std::span<const SeqId> seqs, int layer,
                                         std::span<const float> q, double scale) {
  const std::size_t per_seq = static_cast<std::size_t>(store.shape().q_heads) * store.shape().head_dim;
  detail::require(q.size() == seqs.size() * per_seq, "reference::decode_batch", "q.size()", q.size(),
                  "batch * q_heads * head_dim = ", seqs.size() * per_seq);
  std::vector<Partial> out;
  out.reserve(seqs.size());
  for (std::size_t b = 0; b < seqs.size(); ++b) out.push_back(decode(store, seqs[b], layer, q.subspan(b * per_seq, per_seq), scale));
  return out;
}

}  // namespace hattn::reference
