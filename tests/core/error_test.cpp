// Error messages name the function, the argument, the bad value and what was expected, so an engine
// author can act on them without reading our source.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "hattn/core/error.hpp"
#include "hattn/core/model_shape.hpp"
#include "hattn/core/tensor_view.hpp"

namespace hattn {
namespace {

template <class Fn>
std::string invalid_argument_message(Fn&& fn) {
  try {
    fn();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  ADD_FAILURE() << "no InvalidArgument thrown";
  return {};
}

TEST(Error, HierarchyLetsEnginesCatchOneBase) {
  EXPECT_THROW(throw InvalidArgument("x"), Error);
  EXPECT_THROW(throw OutOfCapacity("x"), Error);
  EXPECT_THROW(throw CudaError("x"), Error);
  EXPECT_THROW(throw Error("x"), std::runtime_error);
}

TEST(Error, RequireFormatsWhereNameExpectedAndValue) {
  EXPECT_NO_THROW(detail::require(true, "f", "n", 1, "anything"));
  EXPECT_EQ(invalid_argument_message([] { detail::require(false, "PageLayout", "page_size", 24, "16, 32 or 64"); }),
            "PageLayout: page_size must be 16, 32 or 64 (got 24)");
  EXPECT_EQ(detail::concat("a", 1, '-', 2.5), "a1-2.5");
}

// Parts of the expectation are joined, and a name or value given as a lambda is formatted, only when
// the check fails.
TEST(Error, RequireBuildsItsMessageOnlyOnFailure) {
  int calls = 0;
  auto name = [&] { ++calls; return detail::concat("items[", 3, "].kv_head"); };
  auto value = [&] { ++calls; return detail::concat("(", 1, ", ", 2, ")"); };
  detail::require(true, "f", name, value, "in [0, ", 8, ")");
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(invalid_argument_message([&] { detail::require(false, "f", name, value, "in [0, ", 8, ")"); }),
            "f: items[3].kv_head must be in [0, 8) (got (1, 2))");
  EXPECT_EQ(calls, 2);
}

struct BadShape {
  ModelShape shape;
  const char* field;
  const char* value;
};

class ModelShapeValidation : public ::testing::TestWithParam<BadShape> {};

TEST_P(ModelShapeValidation, NamesTheFirstBadFieldAndItsValue) {
  const BadShape& c = GetParam();
  const std::string msg = invalid_argument_message([&] { c.shape.validate(); });
  EXPECT_NE(msg.find(std::string(c.field) + " must be"), std::string::npos) << msg;
  EXPECT_NE(msg.find(std::string("(got ") + c.value + ")"), std::string::npos) << msg;
  EXPECT_EQ(msg.rfind("ModelShape: ", 0), 0u) << msg;
}

constexpr ModelShape kGood{.layers = 2, .q_heads = 8, .kv_heads = 2, .head_dim = 128};
ModelShape with(ModelShape s, int ModelShape::*field, int v) {
  s.*field = v;
  return s;
}

INSTANTIATE_TEST_SUITE_P(
    Fields, ModelShapeValidation,
    ::testing::Values(BadShape{with(kGood, &ModelShape::layers, 0), "layers", "0"},
                      BadShape{with(kGood, &ModelShape::kv_heads, -1), "kv_heads", "-1"},
                      BadShape{with(kGood, &ModelShape::q_heads, 5), "q_heads", "5"},  // not a multiple of kv_heads = 2
                      BadShape{with(kGood, &ModelShape::q_heads, 0), "q_heads", "0"},
                      BadShape{with(kGood, &ModelShape::head_dim, 96), "head_dim", "96"},
                      BadShape{with(kGood, &ModelShape::head_dim, 0), "head_dim", "0"}),
    [](const auto& info) { return std::string(info.param.field) + "_" + std::to_string(info.index); });

TEST(ModelShape, GoodShapeValidatesAndReportsGroupSize) {
  EXPECT_NO_THROW(kGood.validate());
  EXPECT_EQ(kGood.group_size(), 4);
  ModelShape odd = kGood;
  odd.q_heads = 7;
  EXPECT_NE(invalid_argument_message([&] { odd.validate(); }).find("q_heads must be a positive multiple of kv_heads (got 7)"),
            std::string::npos);
  std::ostringstream os;
  os << kGood;
  EXPECT_EQ(os.str(), "{layers=2, q_heads=8, kv_heads=2, head_dim=128, kv_dtype=bf16}");
}

TEST(TensorView, ContiguousStridesNumelAndPrinting) {
  std::vector<float> buf(2 * 3 * 4);
  const TensorView v = TensorView::contiguous(buf.data(), DType::kFloat32, {2, 3, 4});
  EXPECT_EQ(v.rank, 3);
  EXPECT_EQ(v.stride[0], 12);
  EXPECT_EQ(v.stride[1], 4);
  EXPECT_EQ(v.stride[2], 1);
  EXPECT_EQ(v.numel(), 24);
  EXPECT_TRUE(v.is_contiguous());
  TensorView strided = v;
  strided.stride[1] = 8;
  EXPECT_FALSE(strided.is_contiguous());
  std::ostringstream os;
  os << v;
  EXPECT_EQ(os.str(), "fp32[2, 3, 4]@host");
}

TEST(TensorView, RequireTensorNamesArgumentAndShows) {
  std::vector<std::uint16_t> buf(64);
  const auto v = TensorView::contiguous(buf.data(), DType::kBFloat16, {4, 2, 8});
  EXPECT_NO_THROW(detail::require_tensor(v, "f", "keys", DType::kBFloat16, {-1, 2, 8}));
  EXPECT_EQ(invalid_argument_message([&] { detail::require_tensor(v, "f", "keys", DType::kFloat16, {4, 2, 8}); }),
            "f: keys must have dtype fp16 (got bf16)");
  EXPECT_EQ(invalid_argument_message([&] { detail::require_tensor(v, "f", "keys", DType::kBFloat16, {-1, 2, 16}); }),
            "f: keys must have shape [*, 2, 16] (got bf16[4, 2, 8]@host)");
  EXPECT_EQ(invalid_argument_message([&] { detail::require_tensor(v, "f", "keys", DType::kBFloat16, {4, 16}); }),
            "f: keys must have shape [4, 16] (got bf16[4, 2, 8]@host)");
  TensorView negative = v;
  negative.shape[0] = -3;
  EXPECT_NE(invalid_argument_message([&] { detail::require_tensor(negative, "f", "keys", DType::kBFloat16, {-1, 2, 8}); })
                .find("keys must have shape [*, 2, 8] (got bf16[-3, 2, 8]@host)"),
            std::string::npos);
  TensorView strided = v;
  strided.stride[0] = 32;
  EXPECT_EQ(invalid_argument_message([&] { detail::require_tensor(strided, "f", "keys", DType::kBFloat16, {4, 2, 8}); }),
            "f: keys must be contiguous (got bf16[4, 2, 8]@host)");
  TensorView null = v;
  null.data = nullptr;
  EXPECT_EQ(invalid_argument_message([&] { detail::require_tensor(null, "f", "keys", DType::kBFloat16, {4, 2, 8}); }),
            "f: keys is null");
  const auto empty = TensorView::contiguous(nullptr, DType::kBFloat16, {0, 2, 8});
  EXPECT_NO_THROW(detail::require_tensor(empty, "f", "keys", DType::kBFloat16, {-1, 2, 8}))
      << "an empty tensor may have no storage";
}

}  // namespace
}  // namespace hattn
