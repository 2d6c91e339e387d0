// GPU sparse paged decode + LSE merge against reference/ exact attention (double), on structured
// layers with pages mixed between HBM slots and the mapped host pool.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include "cuda_test_support.hpp"
#include "hattn/kernels/cuda_decode.hpp"
#include "hattn/kernels/cuda_gather.hpp"
#include "hattn/reference/exact_attention.hpp"

namespace hattn::test {
namespace {

/// Everything the decode launcher reads, built for one StructuredLayer and one selection.
struct DecodeFixture {
  const StructuredLayer& layer;
  int batch, kvh, qh, dim, ps;
  std::vector<std::int32_t> page_table, page_indptr, seq_len;
  std::vector<std::int32_t> selected, selected_offset, selected_count;
  std::vector<std::uint64_t> token_masks;
  std::vector<std::int32_t> slot_of;
  std::int64_t n_slots = 0;

  explicit DecodeFixture(const StructuredLayer& l)
      : layer(l), batch(static_cast<int>(l.seqs.size())), kvh(l.shape.kv_heads), qh(l.shape.q_heads),
        dim(l.shape.head_dim), ps(l.page_size) {
    page_indptr.push_back(0);
    for (int b = 0; b < batch; ++b) {
      const auto pages = l.store.pages(l.seqs[b], 0);
      page_table.insert(page_table.end(), pages.begin(), pages.end());
      page_indptr.push_back(static_cast<std::int32_t>(page_table.size()));
      seq_len.push_back(static_cast<std::int32_t>(l.length(b)));
    }
  }
  int pages_of(int b) const { return page_indptr[b + 1] - page_indptr[b]; }
  std::int64_t segment_offset(int b, int h) const {
    return static_cast<std::int64_t>(page_indptr[b]) * kvh + static_cast<std::int64_t>(h) * pages_of(b);
  }

  /// Sets the selection from per-(b, h) lists (ascending positions) and optional masks.
  void select(const std::vector<std::vector<reference::HeadSelection>>& sel) {
    selected.assign(static_cast<std::size_t>(page_indptr[batch]) * kvh, -1);
    token_masks.assign(selected.size(), 0);
    selected_offset.clear();
    selected_count.clear();
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < kvh; ++h) {
        const auto off = segment_offset(b, h);
        selected_offset.push_back(static_cast<std::int32_t>(off));
        const auto& hs = sel[b][h];
        selected_count.push_back(static_cast<std::int32_t>(hs.pages.size()));
        for (std::size_t i = 0; i < hs.pages.size(); ++i) {
          selected[off + i] = hs.pages[i];
          token_masks[off + i] = hs.token_masks.empty() ? ~0ull : hs.token_masks[i];
        }
      }
  }

  /// Puts (page, head) blocks with (page + head + parity) odd into HBM slots: a mixed layout.
  DeviceBuffer<std::byte> place_in_hbm(int parity) {
    const PageLayout& lay = layer.store.layout();
    const std::int64_t pool_pages = layer.store.pool().capacity_pages();
    slot_of.assign(static_cast<std::size_t>(pool_pages) * kvh, -1);
    n_slots = 0;
    const std::size_t block = lay.head_block_elems() * dtype_bytes(lay.dtype);
    std::vector<std::byte> host;
    for (std::int32_t page : page_table)
      for (int h = 0; h < kvh; ++h) {
        if (((page + h + parity) & 1) == 0) continue;
        slot_of[static_cast<std::size_t>(page) * kvh + h] = static_cast<std::int32_t>(n_slots++);
        const std::byte* pg = layer.store.pool().page(page);
        const std::byte* k = pg + lay.key_offset(h, 0) * dtype_bytes(lay.dtype);
        const std::byte* v = pg + lay.value_offset(h, 0) * dtype_bytes(lay.dtype);
        host.insert(host.end(), k, k + block);
        host.insert(host.end(), v, v + block);
      }
    DeviceBuffer<std::byte> slots(host);
    return slots;
  }
};

struct Result {
  std::vector<float> out, lse;
};

Result run_gpu(DecodeFixture& f, int splits, bool masks, const std::byte* hbm_slots, bool use_slots,
               const float* extra_out = nullptr, const float* extra_lse = nullptr) {
  std::vector<float> q;
  for (const auto& qq : f.layer.queries) q.insert(q.end(), qq.begin(), qq.end());
  DeviceBuffer<float> dq(q);
  DeviceBuffer<std::int32_t> pt(f.page_table), pi(f.page_indptr), sl(f.seq_len), sel(f.selected),
      so(f.selected_offset), sc(f.selected_count), slot(f.slot_of.empty() ? std::vector<std::int32_t>{-1} : f.slot_of);
  DeviceBuffer<std::uint64_t> tm(f.token_masks);
  const int rows = f.batch * f.qh;
  DeviceBuffer<float> po(static_cast<std::size_t>(splits) * rows * f.dim), pl(static_cast<std::size_t>(splits) * rows);
  DeviceBuffer<float> out(static_cast<std::size_t>(rows) * f.dim), lse(rows);

  cuda::SparseDecodeParams p;
  p.q = dq.get();
  p.page_table = pt.get();
  p.page_indptr = pi.get();
  p.seq_len = sl.get();
  p.selected = sel.get();
  p.selected_offset = so.get();
  p.selected_count = sc.get();
  p.token_masks = masks ? tm.get() : nullptr;
  p.slot_of = use_slots ? slot.get() : nullptr;
  p.host_pages = f.layer.store.pool().pages_base();
  p.hbm_slots = hbm_slots;
  p.batch = f.batch;
  p.q_heads = f.qh;
  p.kv_heads = f.kvh;
  p.head_dim = f.dim;
  p.page_size = f.ps;
  p.dtype = f.layer.shape.kv_dtype;
  p.scale = 1.0f / std::sqrt(static_cast<float>(f.dim));
  p.splits = splits;
  p.partial_out = po.get();
  p.partial_lse = pl.get();
  cuda::launch_sparse_decode(p, nullptr);

  cuda::MergeParams m;
  m.partial_out = po.get();
  m.partial_lse = pl.get();
  m.splits = splits;
  m.extra_out = extra_out;
  m.extra_lse = extra_lse;
  m.rows = rows;
  m.head_dim = f.dim;
  m.out = out.get();
  m.lse = lse.get();
  cuda::launch_merge_partials(m, nullptr);
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  return {out.download(), lse.download()};
}

/// Reference over the selection; `dense` ignores it and attends every token (the 100% case).
reference::Partial reference_all(const DecodeFixture& f, const std::vector<std::vector<reference::HeadSelection>>& sel,
                                 bool dense = false) {
  reference::Partial all;
  const double scale = 1.0 / std::sqrt(static_cast<double>(f.dim));
  for (int b = 0; b < f.batch; ++b) {
    auto r = reference::decode(f.layer.store, f.layer.seqs[b], 0, f.layer.queries[b], scale,
                                dense ? nullptr : &sel[b]);
    all.out.insert(all.out.end(), r.out.begin(), r.out.end());
    all.lse.insert(all.lse.end(), r.lse.begin(), r.lse.end());
  }
  return all;
}

// Inputs are exact in the KV dtype on both sides; the GPU accumulates in fp32 with exp2f, so
// differences are fp32 rounding over up to a few thousand tokens.
void expect_close(const Result& gpu, const reference::Partial& ref, double tol = 2e-3) {
  ASSERT_EQ(gpu.out.size(), ref.out.size());
  for (std::size_t i = 0; i < ref.out.size(); ++i) {
    ASSERT_FALSE(std::isnan(gpu.out[i])) << "out[" << i << "]";
    ASSERT_NEAR(gpu.out[i], ref.out[i], tol) << "out[" << i << "]";
  }
  for (std::size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      EXPECT_TRUE(std::isinf(gpu.lse[i]) && gpu.lse[i] < 0) << "lse[" << i << "]";
    } else {
      ASSERT_NEAR(gpu.lse[i], ref.lse[i], tol * std::max(1.0, std::abs(ref.lse[i]))) << "lse[" << i << "]";
    }
  }
}

std::vector<std::vector<reference::HeadSelection>> random_selection(const DecodeFixture& f, double fraction,
                                                                     bool masks, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<std::vector<reference::HeadSelection>> sel(f.batch, std::vector<reference::HeadSelection>(f.kvh));
  for (int b = 0; b < f.batch; ++b)
    for (int h = 0; h < f.kvh; ++h) {
      auto& hs = sel[b][h];
      for (int i = 0; i < f.pages_of(b); ++i)
        if (fraction >= 1.0 || u(rng) < fraction || i == 0) {
          hs.pages.push_back(i);
          if (masks) hs.token_masks.push_back((static_cast<std::uint64_t>(rng()) << 32 | rng()) | 1ull);
        }
    }
  return sel;
}

using DecodeCase = std::tuple<DType, int /*dim*/, int /*page*/, int /*group*/>;

class CudaSparseDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CudaSparseDecode, MatchesReferenceMixedHbmAndHost) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const auto [dtype, dim, ps, group] = GetParam();
  const ModelShape shape{1, 2 * group, 2, dim, dtype};
  // Ragged: a partial last page, an exact multiple, a single token, a long one.
  const std::vector<std::int64_t> lengths{ps * 7 + 5, ps * 12, 1, ps * 40 + ps - 1};
  StructuredLayer layer(shape, ps, lengths, 1234u + dim + ps + group);
  DecodeFixture f(layer);
  for (int variant = 0; variant < 3; ++variant) {
    const bool masks = variant == 2;
    const auto sel = random_selection(f, variant == 0 ? 1.0 : 0.3, masks, 99u + variant);
    f.select(sel);
    auto slots = f.place_in_hbm(variant);
    const auto ref = reference_all(f, sel, /*dense=*/variant == 0);
    for (int splits : {1, 3, 16}) {
      SCOPED_TRACE(::testing::Message() << "variant " << variant << " splits " << splits);
      expect_close(run_gpu(f, splits, masks, slots.get(), true), ref);
    }
    // Host only: every page through the mapped pool.
    expect_close(run_gpu(f, 4, masks, slots.get(), false), ref);
  }
}

INSTANTIATE_TEST_SUITE_P(
    DtypeDimPageGroup, CudaSparseDecode,
    ::testing::Combine(::testing::Values(DType::kBFloat16, DType::kFloat16), ::testing::Values(64, 128, 256),
                       ::testing::Values(16, 32, 64), ::testing::Values(1, 4, 8)),
    [](const auto& info) {
      return std::string(to_string(std::get<0>(info.param))) + "_d" + std::to_string(std::get<1>(info.param)) +
             "_p" + std::to_string(std::get<2>(info.param)) + "_g" + std::to_string(std::get<3>(info.param));
    });

TEST(CudaSparseDecodeMerge, CpuAndGpuPartialsMergeToOnePass) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const ModelShape shape{1, 8, 2, 128, DType::kBFloat16};
  StructuredLayer layer(shape, 16, {16 * 50 + 3, 16 * 9}, 77u);
  DecodeFixture f(layer);
  const auto all = random_selection(f, 1.0, false, 5u);
  // The GPU takes even positions, the CPU (reference math, converted to float) the odd ones.
  std::vector<std::vector<reference::HeadSelection>> gpu_sel(f.batch, std::vector<reference::HeadSelection>(f.kvh)),
      cpu_sel = gpu_sel;
  for (int b = 0; b < f.batch; ++b)
    for (int h = 0; h < f.kvh; ++h)
      for (auto p : all[b][h].pages) (p % 2 ? cpu_sel : gpu_sel)[b][h].pages.push_back(p);
  f.select(gpu_sel);
  auto slots = f.place_in_hbm(0);
  const auto cpu = reference_all(f, cpu_sel);
  std::vector<float> cpu_out(cpu.out.begin(), cpu.out.end()), cpu_lse(cpu.lse.begin(), cpu.lse.end());
  DeviceBuffer<float> extra_out(cpu_out), extra_lse(cpu_lse);
  const auto merged = run_gpu(f, 5, false, slots.get(), true, extra_out.get(), extra_lse.get());
  expect_close(merged, reference_all(f, all));
}

TEST(CudaSparseDecodeMerge, EmptyPartialsGiveZeroAndMinusInfinity) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const ModelShape shape{1, 4, 1, 64, DType::kFloat16};
  StructuredLayer layer(shape, 16, {40, 33}, 3u);
  DecodeFixture f(layer);
  // Request 0 selects two pages (most of 16 splits are empty), request 1 selects nothing.
  std::vector<std::vector<reference::HeadSelection>> sel(2, std::vector<reference::HeadSelection>(1));
  sel[0][0].pages = {0, 2};
  f.select(sel);
  auto slots = f.place_in_hbm(1);
  const auto gpu = run_gpu(f, 16, false, slots.get(), true);
  expect_close(gpu, reference_all(f, sel));
  for (int r = 4; r < 8; ++r) {
    EXPECT_TRUE(std::isinf(gpu.lse[r]) && gpu.lse[r] < 0);
    for (int d = 0; d < 64; ++d) EXPECT_EQ(gpu.out[r * 64 + d], 0.0f);
  }
}

TEST(CudaSparseDecodeMerge, RejectsUnsupportedValues) {
  cuda::SparseDecodeParams p;
  p.batch = 1;
  p.q_heads = 4;
  p.kv_heads = 1;
  p.head_dim = 128;
  p.page_size = 24;
  EXPECT_THROW(cuda::launch_sparse_decode(p, nullptr), InvalidArgument);
  p.page_size = 16;
  p.splits = 0;
  EXPECT_THROW(cuda::launch_sparse_decode(p, nullptr), InvalidArgument);
  cuda::MergeParams m;
  m.rows = 1;
  m.head_dim = 6;
  EXPECT_THROW(cuda::launch_merge_partials(m, nullptr), InvalidArgument);
}

TEST(CudaGather, CopiesHostBlocksIntoSlots) {
  HATTN_REQUIRE_CUDA_DEVICE();
  for (int ps : {16, 64}) {
    const ModelShape shape{1, 8, 4, 128, DType::kBFloat16};
    StructuredLayer layer(shape, ps, {ps * 20 + 3}, 11u);
    const PageLayout& lay = layer.store.layout();
    const auto pages = layer.store.pages(layer.seqs[0], 0);
    std::vector<std::int32_t> ids, heads, slots;
    for (std::size_t i = 0; i < pages.size(); ++i)
      for (int h = 0; h < 4; ++h) {
        ids.push_back(pages[i]);
        heads.push_back(h);
        slots.push_back(((i + h) % 5 == 0) ? -1 : static_cast<std::int32_t>(ids.size() - 1));
      }
    const int n = static_cast<int>(ids.size());
    const int counted = n - 7;  // a device count below n: the tail is not copied
    const std::size_t block = lay.head_block_elems() * dtype_bytes(lay.dtype);
    DeviceBuffer<std::byte> dst(static_cast<std::size_t>(n) * 2 * block);
    DeviceBuffer<std::int32_t> d_ids(ids), d_heads(heads), d_slots(slots), d_count(std::vector<std::int32_t>{counted});
    cuda::GatherParams g;
    g.host_pages = layer.store.pool().pages_base();
    g.hbm_slots = dst.get();
    g.page_ids = d_ids.get();
    g.heads = d_heads.get();
    g.slots = d_slots.get();
    g.count = d_count.get();
    g.n = n;
    g.kv_heads = 4;
    g.page_size = ps;
    g.head_dim = 128;
    g.dtype = lay.dtype;
    cuda::launch_gather_pages(g, nullptr);
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    const auto got = dst.download();
    for (int e = 0; e < n; ++e) {
      const std::byte* slot = got.data() + static_cast<std::size_t>(e) * 2 * block;
      const std::byte* page = layer.store.pool().page(ids[e]);
      const bool copied = slots[e] >= 0 && e < counted;
      const bool k_same = std::memcmp(slot, page + lay.key_offset(heads[e], 0) * 2, block) == 0;
      const bool v_same = std::memcmp(slot + block, page + lay.value_offset(heads[e], 0) * 2, block) == 0;
      EXPECT_EQ(k_same && v_same, copied) << "entry " << e << " page size " << ps;
      if (!copied) EXPECT_EQ(static_cast<unsigned>(slot[0]), 0xffu) << "entry " << e << " was written";
    }
  }
}

}  // namespace
}  // namespace hattn::test
