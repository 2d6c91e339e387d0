// PageLayout: HND offsets (K then V, each [kv_heads][page_size][head_dim]), byte sizes and the
// summary layout [kv_heads][3][head_dim].
#include <gtest/gtest.h>

#include <set>
#include <sstream>
#include <tuple>

#include "hattn/kv/page_layout.hpp"

namespace hattn {
namespace {

class PageLayoutSweep : public ::testing::TestWithParam<std::tuple<int, int, int, DType>> {};

TEST_P(PageLayoutSweep, OffsetsTileThePageExactlyOnce) {
  const auto [ps, heads, dim, dtype] = GetParam();
  const PageLayout l{ps, heads, dim, dtype};
  ASSERT_NO_THROW(l.validate());
  EXPECT_EQ(l.page_elems(), static_cast<std::size_t>(2 * heads * ps * dim));
  EXPECT_EQ(l.page_bytes(), l.page_elems() * dtype_bytes(dtype));
  EXPECT_EQ(l.summary_bytes(), static_cast<std::size_t>(heads * 3 * dim) * dtype_bytes(dtype));
  // Every (K or V, head, token) row starts at a distinct multiple of head_dim; together they cover
  // [0, page_elems) with K of all heads first.
  std::set<std::size_t> starts;
  for (int h = 0; h < heads; ++h) {
    for (int t = 0; t < ps; ++t) {
      EXPECT_EQ(l.key_offset(h, t), (static_cast<std::size_t>(h) * ps + t) * dim);
      EXPECT_LT(l.key_offset(h, t), l.page_elems() / 2);
      EXPECT_GE(l.value_offset(h, t), l.page_elems() / 2);
      starts.insert(l.key_offset(h, t));
      starts.insert(l.value_offset(h, t));
    }
  }
  EXPECT_EQ(starts.size(), static_cast<std::size_t>(2 * heads * ps));
  EXPECT_EQ(*starts.rbegin() + dim, l.page_elems());
  for (int h = 0; h < heads; ++h)
    for (int r = 0; r < PageLayout::kSummaryRows; ++r)
      EXPECT_EQ(l.summary_offset(h, r), (static_cast<std::size_t>(h) * 3 + r) * dim);
}

INSTANTIATE_TEST_SUITE_P(All, PageLayoutSweep,
                         ::testing::Combine(::testing::Values(16, 32, 64), ::testing::Values(1, 8),
                                            ::testing::Values(64, 128, 256),
                                            ::testing::Values(DType::kFloat32, DType::kBFloat16)));

TEST(PageLayout, ValidateNamesFieldAndValue) {
  const auto message = [](PageLayout l) {
    try {
      l.validate();
    } catch (const InvalidArgument& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_EQ(message({24, 2, 64, DType::kBFloat16}), "PageLayout: page_size must be 16, 32 or 64 (got 24)");
  EXPECT_EQ(message({16, 2, 96, DType::kBFloat16}), "PageLayout: head_dim must be 64, 128 or 256 (got 96)");
  EXPECT_EQ(message({16, -1, 64, DType::kBFloat16}), "PageLayout: kv_heads must be > 0 (got -1)");
  EXPECT_FALSE(is_supported_page_size(8));
  EXPECT_TRUE(is_supported_page_size(64));
  std::ostringstream os;
  os << PageLayout{32, 8, 128, DType::kFloat16};
  EXPECT_EQ(os.str(), "{page_size=32, kv_heads=8, head_dim=128, dtype=fp16}");
}

}  // namespace
}  // namespace hattn
