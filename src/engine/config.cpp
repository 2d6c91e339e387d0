#include "hattn/config.hpp"

#include <cmath>

#include "hattn/kernels/cpu_select.hpp"

namespace hattn {

float Config::logit_scale() const noexcept {
  return scale > 0 ? scale : 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
}

void Config::validate() const {
  shape.validate();
  detail::require(shape.group_size() <= kMaxCpuScoreGroup, "Config", "shape.q_heads / shape.kv_heads",
                  shape.group_size(), "<= ", kMaxCpuScoreGroup, " (query heads per KV head the CPU scoring takes)");
  detail::require(is_supported_page_size(page_size), "Config", "page_size", page_size, "16, 32 or 64");
  detail::require(host_pool_bytes > 0, "Config", "host_pool_bytes", host_pool_bytes, "> 0");
  detail::require(avg_budget > 0 && avg_budget <= 1, "Config", "avg_budget", avg_budget, "in (0, 1]");
  detail::require(sink_pages >= 0, "Config", "sink_pages", sink_pages, ">= 0");
  detail::require(local_pages >= 0, "Config", "local_pages", local_pages, ">= 0");
  detail::require(cpu_threads >= 0, "Config", "cpu_threads", cpu_threads, ">= 0 (0 = one per hardware thread; half of them with a GPU)");
  detail::require(scale >= 0 && std::isfinite(scale), "Config", "scale", scale, ">= 0 (0 = 1/sqrt(head_dim))");
  detail::require(max_batch >= 1, "Config", "max_batch", max_batch, ">= 1");
  detail::require(coarse_keep == 0 || (coarse_keep >= 1 && std::isfinite(coarse_keep)), "Config", "coarse_keep",
                  coarse_keep, "0 (score every page) or >= 1 (groups kept as a multiple of the page budget)");
}

std::ostream& operator<<(std::ostream& os, const Config& c) {
  return os << "{shape=" << c.shape << ", page_size=" << c.page_size << ", host_pool_bytes=" << c.host_pool_bytes
            << ", hbm_cache_bytes=" << c.hbm_cache_bytes << ", admission=" << to_string(c.admission)
            << ", cpu_threads=" << c.cpu_threads
            << ", avg_budget=" << c.avg_budget << ", coarse_keep=" << c.coarse_keep << ", sink_pages=" << c.sink_pages << ", local_pages=" << c.local_pages
            << ", backend=" << to_string(c.backend) << "}";
}

}  // namespace hattn
