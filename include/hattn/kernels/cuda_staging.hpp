#pragma once
// An HBM area where the decode keeps a copy of the host blocks it reads, so that the cache admits
// a step's misses from HBM afterwards instead of reading them across PCIe a second time
// (DeviceKVCache's staged admission, docs/architecture.md). The decode writes it, the gather reads
// it, and the cache owns and resets it.
#include <cstdint>

namespace hattn::cuda {

struct StagingArea {
  void* blocks = nullptr;            ///< [capacity][2][page_size][head_dim]: K then V, as an HBM slot
  std::int32_t* key_of = nullptr;    ///< [capacity] block key (page * kv_heads + head) of each entry
  /// [pool_pages * kv_heads] entry of a key; only an entry below min(*count, capacity) whose key_of
  /// names the key is meant (stale values from earlier steps are never cleared).
  std::int32_t* index_of = nullptr;
  /// Entries taken since the last reset. May pass `capacity`: entries past it are not written, and
  /// their blocks are admitted from the host as without staging.
  std::int32_t* count = nullptr;
  std::int32_t capacity = 0;  ///< 0: no staging

  bool enabled() const noexcept { return capacity > 0; }
};

}  // namespace hattn::cuda
