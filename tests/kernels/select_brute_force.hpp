#pragma once
// Brute-force page selection for the GPU selection tests: the rule of cpu_select_top_k /
// cpu_select_mass over the allowed set [0, n) minus [exclude_begin, exclude_end), by full sorts in
// double precision. Ties go to the lower position.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace hattn::test {

struct Rule {
  int sink, local, exclude_begin, exclude_end;
  bool allowed(int i) const { return i < exclude_begin || i >= exclude_end; }
  bool forced(int i, int n) const { return i < sink || i >= n - local; }
};

inline std::vector<int> by_descending(const std::vector<float>& s, const std::vector<int>& idx) {
  std::vector<int> order = idx;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return s[a] > s[b]; });
  return order;
}

inline std::vector<std::int32_t> finish(std::vector<char>& take, const std::vector<float>& s, const Rule& r) {
  const int n = static_cast<int>(s.size());
  std::vector<std::int32_t> out;
  for (int i = 0; i < n; ++i)
    if (r.allowed(i) && (take[i] || r.forced(i, n))) out.push_back(i);
  return out;
}

inline std::vector<std::int32_t> brute_top_k(const std::vector<float>& s, int k, const Rule& r) {
  const int n = static_cast<int>(s.size());
  std::vector<int> ranked;
  int forced = 0;
  for (int i = 0; i < n; ++i) {
    if (!r.allowed(i)) continue;
    if (r.forced(i, n)) ++forced;
    else ranked.push_back(i);
  }
  std::vector<char> take(n, 0);
  const auto order = by_descending(s, ranked);
  for (int j = 0; j < std::min<int>(std::max(k - forced, 0), static_cast<int>(order.size())); ++j) take[order[j]] = 1;
  return finish(take, s, r);
}

/// The mass rule as cpu_select_mass documents it: forced pages' estimated mass counts toward the
/// threshold, then the other pages in descending rank (ties to the lower position) add theirs until
/// the share reaches the threshold, at most `cap` of them. Also returns the smallest distance between
/// a prefix share and the threshold, so tests can skip inputs where fp32 and double sums could disagree.
inline std::vector<std::int32_t> brute_mass(const std::vector<float>& rank, const std::vector<float>& lm, float threshold,
                                     int cap, const Rule& r, double* margin = nullptr) {
  const int n = static_cast<int>(rank.size());
  std::vector<int> ranked;
  double mx = -INFINITY, total = 0, cum = 0;
  for (int i = 0; i < n; ++i)
    if (r.allowed(i)) mx = std::max<double>(mx, lm[i]);
  for (int i = 0; i < n; ++i) {
    if (!r.allowed(i)) continue;
    total += std::exp(lm[i] - mx);
    if (r.forced(i, n)) cum += std::exp(lm[i] - mx);
    else ranked.push_back(i);
  }
  const auto order = by_descending(rank, ranked);
  std::vector<char> take(n, 0);
  double closest = total > 0 ? std::abs(cum / total - threshold) : 1.0;
  int taken = 0;
  for (int i : order) {
    if (taken >= cap) break;
    if (threshold < 1.0f && cum >= threshold * total) break;
    take[i] = 1;
    ++taken;
    cum += std::exp(lm[i] - mx);
    closest = std::min(closest, std::abs(cum / total - threshold));
  }
  if (margin) *margin = closest;
  return finish(take, rank, r);
}

}  // namespace hattn::test
