#pragma once
// GPU page selection without host synchronisation (DESIGN.md step 2): per segment top-k or the
// attention-mass threshold, with sinks and the local window forced in. Counts stay on the device.
#include <cstddef>
#include <cstdint>

#include "hattn/kernels/cuda_stream.hpp"

namespace hattn::cuda {

/// Both rules rank the ranked (non-forced, allowed) positions by `scores`, descending, ties to the
/// lower position, NaN lowest. Top-k takes the first budget - forced of them. The mass rule takes
/// the shortest prefix of that order whose estimated mass exp(log_mass), added to the forced
/// positions' mass, reaches mass_threshold of the estimated mass of all allowed positions, then at
/// most budget_pages of it: cpu_select_mass's rule, so the GPU and the CPU select alike (up to fp32
/// sums against double ones at the threshold). Ranking by the Quest bound keeps a few-token needle
/// that the mean key dilutes inside its page; the estimate says how much mass is covered.
struct SelectParams {
  const float* scores = nullptr;              ///< rank scores, segments as in ScoreParams (the Quest bound `upper`)
  const float* log_mass = nullptr;            ///< mass rule: log estimated mass, same segments (`estimate`); else unused
  const std::int32_t* page_indptr = nullptr;  ///< [batch + 1], host-planned, on the device
  int batch = 0, kv_heads = 0;
  const std::int32_t* budget_pages = nullptr;  ///< [batch * kv_heads] k (top-k) or page cap (mass mode)
  float mass_threshold = 0;  ///< 0: top-k; in (0, 1]: the mass rule (above)
  int sink_pages = 1, local_pages = 1;
  /// Positions in [exclude_begin[b], exclude_end[b]) are never selected here (the CPU side owns them);
  /// nullptr = exclude nothing. Forced pages inside the excluded range are not selected either.
  const std::int32_t* exclude_begin = nullptr;
  const std::int32_t* exclude_end = nullptr;
  std::int32_t* selected = nullptr;      ///< positions, ascending, at the segment's offset
  std::int32_t* selected_count = nullptr;  ///< [batch * kv_heads]
  /// select_workspace_bytes() bytes, device, zeroed once when allocated (every launch that uses it
  /// leaves it zeroed): arrival counts of the fused two-level selection (launch_select_two_level).
  /// The other launches need none.
  void* workspace = nullptr;
  /// Candidate segments (the fine pass of two-level scoring, ScoreParams::position_of): where set,
  /// segment s holds `candidates` entries of scores / log_mass at s * candidates whose page positions
  /// are position_of[s * candidates + j] (ascending, -1 = padding, never selected). Sinks, the local
  /// window and the excluded range apply to those page positions (page_indptr still gives each
  /// request's page count); `selected` receives page positions at the page segment's offset. The mass
  /// rule's total is the candidates' mass: the pruned groups' is not estimated. Forced pages take part
  /// only where they are candidates, so the group selection must keep the sink and local groups.
  const std::int32_t* position_of = nullptr;
  int candidates = 0;
  /// Optional bound on the entries of any segment (pages, or `candidates` in candidate mode; 0 =
  /// unknown). Top-k with a bound of at most 16K runs a compact kernel that selects the same positions;
  /// a segment longer than the bound stops that kernel with a device trap (a CudaError at the next
  /// sync). The engine passes its longest row (or the candidates).
  int max_entries = 0;
  /// As ScoreParams::inputs_ready, for page_indptr, budget_pages and the exclusions.
  bool inputs_ready = false;
};

/// Workspace bytes for a batch of at most `total_pages` pages over `kv_heads` (plan time): one count
/// per (request, KV head) segment, never per page or token.
std::size_t select_workspace_bytes(std::int64_t total_pages, int kv_heads, int batch);
void launch_select_pages(const SelectParams& p, Stream stream);
/// Every position of every segment (a budget that covers whole sequences): no scores are read, only
/// page_indptr, batch, kv_heads, selected and selected_count.
void launch_select_all_pages(const SelectParams& p, Stream stream);

}  // namespace hattn::cuda
