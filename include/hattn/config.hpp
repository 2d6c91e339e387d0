#pragma once
// What an engine tells HybridAttention at construction: model shape, paging and memory budgets.
#include <cstddef>
#include <cstdint>
#include <ostream>

#include "hattn/core/model_shape.hpp"
#include "hattn/kv/host_kv_pool.hpp"

namespace hattn {

/// Where a HybridAttention object computes.
enum class Backend : std::uint8_t {
  kAuto,  ///< the GPU (with CPU help as the scheduler decides) when built with CUDA and a device is present, else kCpu
  kGpu,   ///< require the GPU; construction throws when there is none
  kCpu,   ///< CPU only: queries and outputs are host tensors, run() is synchronous
};

constexpr const char* to_string(Backend b) noexcept {
  return b == Backend::kGpu ? "gpu" : b == Backend::kCpu ? "cpu" : "auto";
}

/// How an HBM cache admits the blocks a layer selected that it did not hold (its misses). The
/// cache's maintenance (lookup, eviction) runs beside the decode in every mode.
enum class Admission : std::uint8_t {
  /// The misses (full pages) are copied into an HBM staging area right after the selection, beside
  /// the cache's maintenance (lookup, eviction); the decode reads them there, and the cache admits
  /// them from there after the decode. Each miss crosses PCIe once, by the gather kernel, and the
  /// decode waits for nothing but that copy. The staging area takes 1/10 of hbm_cache_bytes (a cache
  /// meant to hold a whole working set needs that much more). Only the tensor-core decode kernel
  /// (head dim 64 or 128, groups up to 8) reads the area: for other shapes kStaged admits as
  /// kBeforeDecode does.
  kStaged,
  /// The decode waits until the cache has gathered the misses into HBM and reads them there: each
  /// crosses PCIe once, but the maintenance and the gather come before the decode. With a CPU share
  /// in the layer it does not wait (the CPU computes the misses first; the GPU keeps the hits).
  kBeforeDecode,
  /// The gather copies the misses into HBM while the decode reads them in place: each crosses PCIe
  /// twice, at the same time.
  kBesideDecode,
};

constexpr const char* to_string(Admission a) noexcept {
  return a == Admission::kStaged ? "staged" : a == Admission::kBeforeDecode ? "before_decode" : "beside_decode";
}
inline std::ostream& operator<<(std::ostream& os, Admission a) { return os << to_string(a); }

struct Config {
  ModelShape shape;
  int page_size = 16;                  ///< tokens per page: 16, 32 or 64
  std::size_t host_pool_bytes = 0;     ///< pinned host pool for every layer's KV and summaries
  std::size_t hbm_cache_bytes = 0;     ///< HBM page cache (0: none; every GPU-side page read from host)
  /// How the HBM cache admits a layer's misses (Admission).
  Admission admission = Admission::kStaged;
  /// Workers of the CPU side. 0: one per hardware thread for the CPU backend; half of them for the
  /// GPU backend, whose caller's thread keeps launching (or waiting on) GPU work while the CPU side
  /// computes, and whose CPU side shares DRAM with the GPU's zero-copy reads (on the device, 8
  /// workers were as fast as 12 and 1.6x faster than 15: docs/performance.md).
  int cpu_threads = 0;
  double avg_budget = 0.05;            ///< average share of a request's pages each head attends, in (0, 1]
  /// Two-level scoring (SPIN's coarse metadata): where > 0, each head first ranks groups of 16 pages
  /// by their coarse summaries and keeps ceil(coarse_keep x its page budget / 16) of them plus the
  /// sink and local groups (kept_summary_groups); only the kept groups' pages are scored and selected
  /// from. Scoring then reads ~1/16 of the page summaries plus the kept groups' instead of all of
  /// them. 0: every page is scored (one pass). A page whose group ranks low is never selected, so
  /// quality depends on this; measure it (hattn-eval) before serving with it.
  double coarse_keep = 0.0;
  int sink_pages = 1;                  ///< first pages always attended (attention sinks)
  int local_pages = 2;                 ///< last pages always attended (the local window)
  float scale = 0.0f;                  ///< logit scale; 0 = 1 / sqrt(head_dim)
  int max_batch = 256;                 ///< most requests in one plan()
  Backend backend = Backend::kAuto;
  HostMemoryRequest host_memory = HostMemoryRequest::kAuto;
  /// Record CUDA events between the GPU phases of every run() and report them in
  /// StepStats::gpu_phases (a few microseconds of event overhead per run; off for serving).
  bool time_phases = false;

  float logit_scale() const noexcept;
  /// Throws InvalidArgument naming the first bad field.
  void validate() const;
};

std::ostream& operator<<(std::ostream& os, const Config& c);

}  // namespace hattn
