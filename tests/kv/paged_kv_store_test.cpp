#include <gtest/gtest.h>
#include "hattn/kv/paged_kv_store.hpp"
#include "hattn/reference/exact_attention.hpp"
TEST(Smoke, Builds) {
  hattn::PagedKVStore s({.layers = 2, .q_heads = 4, .kv_heads = 2, .head_dim = 64}, 16, 1 << 20);
  auto id = s.add_sequence();
  EXPECT_EQ(s.length(id, 0), 0);
}
