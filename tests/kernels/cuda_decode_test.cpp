// GPU sparse paged decode + LSE merge against reference/ exact attention (double), on structured
// layers with pages mixed between HBM slots and the mapped host pool.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include "cuda_test_support.hpp"
#include "hattn/kernels/cuda_decode.hpp"
#include "hattn/kernels/cuda_gather.hpp"
#include "hattn/kernels/cuda_staging.hpp"
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

/// Decode, then merge: by launch_merge_partials (with the extra partial where given), or, with
/// `fold_merge`, inside the decode (SparseDecodeParams::out), launched twice so that the second
/// launch finds the arrival counts the first left at zero.
Result run_gpu(DecodeFixture& f, int splits, bool masks, const std::byte* hbm_slots, bool use_slots,
               const float* extra_out = nullptr, const float* extra_lse = nullptr,
               cuda::DecodeKernel kernel = cuda::DecodeKernel::kAuto, bool fold_merge = false,
               const cuda::StagingArea& staging = {}) {
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
  p.kernel = kernel;
  p.staging = staging;
  if (fold_merge) {
    DeviceBuffer<std::byte> arrivals(std::vector<std::byte>(cuda::decode_workspace_bytes(f.batch * f.kvh), std::byte{0}));
    p.out = out.get();
    p.lse = lse.get();
    p.arrivals = reinterpret_cast<std::uint32_t*>(arrivals.get());
    cuda::launch_sparse_decode(p, nullptr);
    cuda::launch_sparse_decode(p, nullptr);
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    for (std::byte c : arrivals.download()) EXPECT_EQ(c, std::byte{0}) << "arrival counts left set";
    return {out.download(), lse.download()};
  }
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

// Tolerances. Inputs are exact in the KV dtype on both sides. The CUDA-core kernel keeps q and the
// weights in fp32, so differences are fp32 rounding over up to a few thousand tokens: 2e-3. The
// tensor-core kernel rounds q (times scale) and the softmax weights P to the KV dtype before the
// mma (accumulating in fp32): relative errors up to 2^-9 per weight for bf16 and 2^-12 for fp16,
// on values of magnitude ~1 (random normal V), so the bound is bf16's usual 1e-2 and fp16's 4e-3.
// A wrong page, mask or scale moves outputs by O(0.1) or more (see DetectsAWrongSelection).
double tolerance(cuda::DecodeKernel kernel, DType dtype) {
  if (kernel == cuda::DecodeKernel::kCudaCores) return 2e-3;
  return dtype == DType::kBFloat16 ? 1e-2 : 4e-3;
}

/// Largest |gpu - ref| over the outputs and, relative to max(1, |ref|), the LSEs; infinity when a
/// NaN appears or an empty row's LSE is not -inf.
double max_error(const Result& gpu, const reference::Partial& ref) {
  if (gpu.out.size() != ref.out.size() || gpu.lse.size() != ref.lse.size()) return INFINITY;
  double worst = 0;
  for (std::size_t i = 0; i < ref.out.size(); ++i) {
    if (std::isnan(gpu.out[i])) return INFINITY;
    worst = std::max(worst, std::abs(gpu.out[i] - ref.out[i]));
  }
  for (std::size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      if (!(std::isinf(gpu.lse[i]) && gpu.lse[i] < 0)) return INFINITY;
    } else {
      if (std::isnan(gpu.lse[i])) return INFINITY;
      worst = std::max(worst, std::abs(gpu.lse[i] - ref.lse[i]) / std::max(1.0, std::abs(ref.lse[i])));
    }
  }
  return worst;
}

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

using DecodeCase = std::tuple<DType, int /*dim*/, int /*page*/, int /*group*/, cuda::DecodeKernel>;

class CudaSparseDecode : public ::testing::TestWithParam<DecodeCase> {};

TEST_P(CudaSparseDecode, MatchesReferenceMixedHbmAndHost) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const auto [dtype, dim, ps, group, kernel] = GetParam();
  const ModelShape shape{1, 2 * group, 2, dim, dtype};
  // Ragged: a partial last page, an exact multiple, a single token, a long one.
  const std::vector<std::int64_t> lengths{ps * 7 + 5, ps * 12, 1, ps * 40 + ps - 1};
  StructuredLayer layer(shape, ps, lengths, 1234u + dim + ps + group);
  DecodeFixture f(layer);
  const double tol = tolerance(kernel, dtype);
  double worst = 0;
  for (int variant = 0; variant < 3; ++variant) {
    const bool masks = variant == 2;
    const auto sel = random_selection(f, variant == 0 ? 1.0 : 0.3, masks, 99u + variant);
    f.select(sel);
    auto slots = f.place_in_hbm(variant);
    const auto ref = reference_all(f, sel, /*dense=*/variant == 0);
    for (int splits : {1, 3, 16})
      for (bool fold : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "variant " << variant << " splits " << splits << " merge folded " << fold);
        const Result gpu = run_gpu(f, splits, masks, slots.get(), true, nullptr, nullptr, kernel, fold);
        worst = std::max(worst, max_error(gpu, ref));
        expect_close(gpu, ref, tol);
      }
    // Host only: every page through the mapped pool.
    const Result host = run_gpu(f, 4, masks, slots.get(), false, nullptr, nullptr, kernel);
    worst = std::max(worst, max_error(host, ref));
    expect_close(host, ref, tol);
  }
  // The margin, for choosing tolerances from device runs.
  RecordProperty("max_error", std::to_string(worst));
  std::printf("[ margin   ] %s: max error %.2e of %.0e\n",
              ::testing::UnitTest::GetInstance()->current_test_info()->name(), worst, tol);
}

/// A staging area as DeviceKVCache allocates it, for blocks of `layer`'s layout.
struct Staging {
  DeviceBuffer<std::byte> blocks;
  DeviceBuffer<std::int32_t> key_of, index_of, count;
  cuda::StagingArea area;
  std::size_t block_bytes;

  Staging(const StructuredLayer& layer, int capacity)
      : blocks(static_cast<std::size_t>(capacity) * block_bytes_of(layer)), key_of(capacity),
        index_of(static_cast<std::size_t>(layer.store.pool().capacity_pages()) * layer.shape.kv_heads),
        count(std::vector<std::int32_t>{0}),
        area{.blocks = blocks.get(), .key_of = key_of.get(), .index_of = index_of.get(), .count = count.get(),
             .capacity = capacity},
        block_bytes(block_bytes_of(layer)) {}
  static std::size_t block_bytes_of(const StructuredLayer& l) {
    return 2 * l.store.layout().head_block_elems() * dtype_bytes(l.store.layout().dtype);
  }
};

// launch_stage_blocks copies every selected full page's block without an HBM slot into the staging
// area (an exact copy of K then V, as a slot holds it), indexed by key, and nothing else; entries past
// the capacity are counted but not written. The tensor-core kernel (with and without the merge
// folded in) then reads those blocks there: with the copies it matches the reference, with every
// copy overwritten it does not.
class CudaSparseDecodeStaging : public ::testing::TestWithParam<std::tuple<DType, int, int>> {};

TEST_P(CudaSparseDecodeStaging, StagesFullHostPagesAndTheDecodeReadsThem) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const auto [dtype, dim, ps] = GetParam();
  const ModelShape shape{1, 8, 2, dim, dtype};
  const std::vector<std::int64_t> lengths{ps * 7 + 5, ps * 12, 1, ps * 30 + ps - 1};
  StructuredLayer layer(shape, ps, lengths, 77u + dim + ps);
  DecodeFixture f(layer);
  const PageLayout& lay = layer.store.layout();
  const std::size_t e = dtype_bytes(lay.dtype), half = lay.head_block_elems() * e;
  const auto kTc = cuda::DecodeKernel::kTensorCores;
  for (int variant = 0; variant < 2; ++variant) {
    const bool masks = variant == 1;
    const auto sel = random_selection(f, 0.5, masks, 5u + variant);
    f.select(sel);
    auto slots = f.place_in_hbm(variant);
    const auto ref = reference_all(f, sel);
    std::vector<std::int32_t> want_keys;  // selected, full, without a slot
    for (int b = 0; b < f.batch; ++b)
      for (int h = 0; h < f.kvh; ++h)
        for (std::int32_t pos : sel[b][h].pages) {
          const std::int32_t key = f.page_table[f.page_indptr[b] + pos] * f.kvh + h;
          if (static_cast<std::int64_t>(pos + 1) * ps <= f.seq_len[b] && f.slot_of[key] < 0) want_keys.push_back(key);
        }
    ASSERT_GT(want_keys.size(), 8u);
    DeviceBuffer<std::int32_t> pt(f.page_table), pi(f.page_indptr), sl(f.seq_len), dsel(f.selected),
        so(f.selected_offset), sc(f.selected_count), slot(f.slot_of);
    for (int capacity : {static_cast<int>(want_keys.size()) + 3, 5}) {
      SCOPED_TRACE(::testing::Message() << "variant " << variant << " capacity " << capacity);
      Staging st(layer, capacity);
      cuda::StageParams sp{.page_table = pt.get(), .page_indptr = pi.get(), .seq_len = sl.get(),
                           .selected = dsel.get(), .selected_offset = so.get(), .selected_count = sc.get(),
                           .slot_of = slot.get(), .host_pages = layer.store.pool().pages_base(), .batch = f.batch,
                           .kv_heads = f.kvh, .head_dim = f.dim, .page_size = ps, .dtype = dtype,
                           .max_count = *std::max_element(f.selected_count.begin(), f.selected_count.end()),
                           .staging = st.area};
      cuda::launch_stage_blocks(sp, nullptr);
      HATTN_CUDA_CHECK(cudaDeviceSynchronize());
      ASSERT_EQ(st.count.download()[0], static_cast<std::int32_t>(want_keys.size())) << "entries taken";
      const auto key_of = st.key_of.download();
      const auto index_of = st.index_of.download();
      const auto blocks = st.blocks.download();
      int written = 0;
      for (std::int32_t key : want_keys) {
        const std::int32_t i = index_of[key];
        if (i < 0 || i >= capacity || key_of[i] != key) continue;  // past the capacity: not staged
        ++written;
        const std::byte* pg = layer.store.pool().page(key / f.kvh);
        const std::byte* got = blocks.data() + static_cast<std::size_t>(i) * st.block_bytes;
        ASSERT_EQ(std::memcmp(got, pg + lay.key_offset(key % f.kvh, 0) * e, half), 0) << "K of key " << key;
        ASSERT_EQ(std::memcmp(got + half, pg + lay.value_offset(key % f.kvh, 0) * e, half), 0) << "V of key " << key;
      }
      EXPECT_EQ(written, std::min<int>(capacity, static_cast<int>(want_keys.size())));
      for (bool fold : {false, true}) {
        const Result gpu = run_gpu(f, 3, masks, slots.get(), true, nullptr, nullptr, kTc, fold, st.area);
        expect_close(gpu, ref, tolerance(kTc, dtype));
      }
      if (written < static_cast<int>(want_keys.size())) continue;
      // Every copy overwritten with other values: the decode, which reads them, now differs.
      HATTN_CUDA_CHECK(cudaMemset(st.blocks.get(), 0x3c, blocks.size()));
      const Result spoiled = run_gpu(f, 3, masks, slots.get(), true, nullptr, nullptr, kTc, false, st.area);
      EXPECT_GT(max_error(spoiled, ref), 0.05) << "the decode did not read the staging area";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(DtypeDimPage, CudaSparseDecodeStaging,
                         ::testing::Combine(::testing::Values(DType::kBFloat16, DType::kFloat16),
                                            ::testing::Values(64, 128), ::testing::Values(16, 32, 64)),
                         [](const auto& info) {
                           return std::string(to_string(std::get<0>(info.param))) + "_d" +
                                  std::to_string(std::get<1>(info.param)) + "_p" +
                                  std::to_string(std::get<2>(info.param));
                         });

std::vector<DecodeCase> decode_cases() {
  std::vector<DecodeCase> cases;
  for (DType dtype : {DType::kBFloat16, DType::kFloat16})
    for (int dim : {64, 128, 256})
      for (int ps : {16, 32, 64})
        for (int group : {1, 4, 7, 8})
          for (auto kernel : {cuda::DecodeKernel::kCudaCores, cuda::DecodeKernel::kTensorCores}) {
            if (kernel == cuda::DecodeKernel::kTensorCores && dim > 128) continue;  // not supported there
            cases.emplace_back(dtype, dim, ps, group, kernel);
          }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(
    DtypeDimPageGroupKernel, CudaSparseDecode, ::testing::ValuesIn(decode_cases()), [](const auto& info) {
      return std::string(to_string(std::get<0>(info.param))) + "_d" + std::to_string(std::get<1>(info.param)) +
             "_p" + std::to_string(std::get<2>(info.param)) + "_g" + std::to_string(std::get<3>(info.param)) + "_" +
             cuda::to_string(std::get<4>(info.param));
    });

TEST(CudaSparseDecodeDispatch, PicksTensorCoresWhereTheyRun) {
  cuda::SparseDecodeParams p;
  p.q_heads = 32;
  p.kv_heads = 8;
  p.head_dim = 128;
  EXPECT_EQ(cuda::decode_kernel_for(p), cuda::DecodeKernel::kTensorCores);
  p.q_heads = 56;  // group 7 (the Qwen-like zoo)
  EXPECT_EQ(cuda::decode_kernel_for(p), cuda::DecodeKernel::kTensorCores);
  p.head_dim = 256;
  EXPECT_EQ(cuda::decode_kernel_for(p), cuda::DecodeKernel::kCudaCores);
  p.kernel = cuda::DecodeKernel::kTensorCores;
  EXPECT_THROW(cuda::decode_kernel_for(p), InvalidArgument);
  p.head_dim = 64;
  p.q_heads = 16 * 8;  // group 16
  EXPECT_THROW(cuda::decode_kernel_for(p), InvalidArgument);
  p.kernel = cuda::DecodeKernel::kAuto;
  EXPECT_EQ(cuda::decode_kernel_for(p), cuda::DecodeKernel::kCudaCores);
  p.kernel = cuda::DecodeKernel::kCudaCores;
  p.q_heads = 32;
  EXPECT_EQ(cuda::decode_kernel_for(p), cuda::DecodeKernel::kCudaCores);
}

// The comparison can fail: attending a 30% selection against the dense reference is far off.
TEST(CudaSparseDecodeDispatch, DetectsAWrongSelection) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const ModelShape shape{1, 8, 2, 128, DType::kBFloat16};
  StructuredLayer layer(shape, 16, {16 * 30 + 3}, 21u);
  DecodeFixture f(layer);
  const auto dense = reference_all(f, random_selection(f, 1.0, false, 1u), /*dense=*/true);
  f.select(random_selection(f, 0.3, false, 2u));
  auto slots = f.place_in_hbm(0);
  for (auto kernel : {cuda::DecodeKernel::kCudaCores, cuda::DecodeKernel::kTensorCores})
    EXPECT_GT(max_error(run_gpu(f, 3, false, slots.get(), true, nullptr, nullptr, kernel), dense),
              5 * tolerance(kernel, DType::kBFloat16))
        << cuda::to_string(kernel);
}

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
  for (auto kernel : {cuda::DecodeKernel::kCudaCores, cuda::DecodeKernel::kTensorCores}) {
    SCOPED_TRACE(cuda::to_string(kernel));
    const auto merged = run_gpu(f, 5, false, slots.get(), true, extra_out.get(), extra_lse.get(), kernel);
    expect_close(merged, reference_all(f, all), tolerance(kernel, shape.kv_dtype));
  }
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
  for (auto kernel : {cuda::DecodeKernel::kCudaCores, cuda::DecodeKernel::kTensorCores})
  for (bool fold : {false, true}) {
    SCOPED_TRACE(::testing::Message() << cuda::to_string(kernel) << ", merge folded " << fold);
    const auto gpu = run_gpu(f, 16, false, slots.get(), true, nullptr, nullptr, kernel, fold);
    expect_close(gpu, reference_all(f, sel), tolerance(kernel, shape.kv_dtype));
    for (int r = 4; r < 8; ++r) {
      EXPECT_TRUE(std::isinf(gpu.lse[r]) && gpu.lse[r] < 0);
      for (int d = 0; d < 64; ++d) EXPECT_EQ(gpu.out[r * 64 + d], 0.0f);
    }
  }
}

/// Decode params that pass every host-side check, over dummy host arrays (for argument tests that
/// change one field; nothing is launched while a check fails).
cuda::SparseDecodeParams host_checked_params(float* f32, std::int32_t* i32) {
  cuda::SparseDecodeParams p;
  p.batch = 1;
  p.q_heads = 4;
  p.kv_heads = 1;
  p.head_dim = 128;
  p.page_size = 16;
  p.q = p.partial_out = p.partial_lse = f32;
  p.page_table = p.page_indptr = p.seq_len = p.selected = p.selected_offset = p.selected_count = i32;
  p.host_pages = f32;
  return p;
}

TEST(CudaSparseDecodeMerge, RejectsUnsupportedValues) {
  float o[4] = {};
  std::int32_t i32[2] = {};
  cuda::SparseDecodeParams p = host_checked_params(o, i32);
  p.page_size = 24;
  EXPECT_THROW(cuda::launch_sparse_decode(p, nullptr), InvalidArgument);
  p.page_size = 16;
  p.splits = 0;
  EXPECT_THROW(cuda::launch_sparse_decode(p, nullptr), InvalidArgument);
  // The folded merge needs its arrival counts.
  p.splits = 1;
  p.out = o;
  try {
    cuda::launch_sparse_decode(p, nullptr);
    ADD_FAILURE() << "accepted out without arrivals";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("arrivals"), std::string::npos) << e.what();
  }
  cuda::MergeParams m;
  m.rows = 1;
  m.head_dim = 6;
  EXPECT_THROW(cuda::launch_merge_partials(m, nullptr), InvalidArgument);
}

// Host-side checks of the staging arguments (no GPU needed): each names what is wrong.
TEST(CudaStaging, RejectsIncompleteAreasAndParams) {
  std::int32_t i32[2] = {};
  float f32[4] = {};
  cuda::StageParams sp{.page_table = i32, .page_indptr = i32, .seq_len = i32, .selected = i32,
                       .selected_offset = i32, .selected_count = i32, .host_pages = f32, .batch = 1,
                       .kv_heads = 1, .head_dim = 64, .page_size = 16, .max_count = 1};
  expect_named([&] { cuda::launch_stage_blocks(sp, nullptr); }, "staging.capacity");
  sp.staging.capacity = 4;
  expect_named([&] { cuda::launch_stage_blocks(sp, nullptr); }, "pointers");
  sp.max_count = -1;
  expect_named([&] { cuda::launch_stage_blocks(sp, nullptr); }, "max_count");

  cuda::SparseDecodeParams p = host_checked_params(f32, i32);
  p.staging.capacity = 4;  // and no pointers
  expect_named([&] { cuda::launch_sparse_decode(p, nullptr); }, "staging pointers");
  p.staging.capacity = -1;
  expect_named([&] { cuda::launch_sparse_decode(p, nullptr); }, "staging.capacity");

  cuda::GatherParams g{.host_pages = f32, .hbm_slots = f32, .n = 1, .kv_heads = 1, .page_size = 16, .head_dim = 64};
  g.staging.capacity = 4;
  expect_named([&] { cuda::launch_gather_pages(g, nullptr); }, "staging");
  g.staging.capacity = 0;
  g.page_ids = i32;  // without heads
  expect_named([&] { cuda::launch_gather_pages(g, nullptr); }, "page_ids and heads");
}

using MergeCase = std::tuple<int /*splits*/, int /*head_dim*/, bool /*extra*/>;
class CudaMergePartials : public ::testing::TestWithParam<MergeCase> {};

// Random partials, about a third of them empty (lse = -inf, out = 0), one row empty in every split
// and (with the extra partial) one row whose only partial is the extra one; against
// reference::merge in double.
TEST_P(CudaMergePartials, MatchesReferenceWithEmptyPartials) {
  HATTN_REQUIRE_CUDA_DEVICE();
  const auto [splits, dim, extra] = GetParam();
  const int rows = 37;
  std::mt19937 rng(static_cast<std::uint32_t>(splits * 131 + dim + extra));
  std::uniform_real_distribution<float> u(-1, 1);
  const float ninf = -std::numeric_limits<float>::infinity();
  auto empty = [&](int s, int r) { return r == 0 || (r == 1 && extra) || (rng() % 3 == 0 && s != r % std::max(1, splits)); };
  std::vector<float> po(static_cast<std::size_t>(splits) * rows * dim), pl(static_cast<std::size_t>(splits) * rows);
  std::vector<reference::Partial> parts(splits + (extra ? 1 : 0));
  for (int s = 0; s < splits; ++s) {
    parts[s].out.assign(static_cast<std::size_t>(rows) * dim, 0.0);
    parts[s].lse.assign(rows, -std::numeric_limits<double>::infinity());
    for (int r = 0; r < rows; ++r) {
      const bool e = empty(s, r);
      pl[static_cast<std::size_t>(s) * rows + r] = e ? ninf : 8.0f * u(rng);
      parts[s].lse[r] = pl[static_cast<std::size_t>(s) * rows + r];
      for (int d = 0; d < dim; ++d) {
        const float x = e ? 0.0f : u(rng);
        po[(static_cast<std::size_t>(s) * rows + r) * dim + d] = x;
        parts[s].out[static_cast<std::size_t>(r) * dim + d] = x;
      }
    }
  }
  std::vector<float> eo(static_cast<std::size_t>(rows) * dim), el(rows);
  if (extra) {
    auto& x = parts[splits];
    x.out.assign(eo.size(), 0.0);
    x.lse.assign(rows, -std::numeric_limits<double>::infinity());
    for (int r = 0; r < rows; ++r) {
      const bool e = r == 0 || r % 5 == 3;
      el[r] = e ? ninf : 8.0f * u(rng);
      x.lse[r] = el[r];
      for (int d = 0; d < dim; ++d) {
        eo[static_cast<std::size_t>(r) * dim + d] = e ? 0.0f : u(rng);
        x.out[static_cast<std::size_t>(r) * dim + d] = eo[static_cast<std::size_t>(r) * dim + d];
      }
    }
  }
  reference::Partial ref{std::vector<double>(static_cast<std::size_t>(rows) * dim, 0.0),
                         std::vector<double>(rows, -std::numeric_limits<double>::infinity())};
  if (!parts.empty()) ref = reference::merge(parts);
  DeviceBuffer<float> d_po(po), d_pl(pl), out(static_cast<std::size_t>(rows) * dim), lse(rows);
  MappedBuffer<float> m_eo(eo), m_el(el);
  for (bool with_lse : {true, false}) {
    cuda::MergeParams m;
    m.partial_out = d_po.get();
    m.partial_lse = d_pl.get();
    m.splits = splits;
    m.extra_out = extra ? m_eo.get() : nullptr;
    m.extra_lse = extra ? m_el.get() : nullptr;
    m.rows = rows;
    m.head_dim = dim;
    m.out = out.get();
    m.lse = with_lse ? lse.get() : nullptr;
    cuda::launch_merge_partials(m, nullptr);
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    const Result gpu{out.download(), lse.download()};
    if (with_lse) {
      expect_close(gpu, ref, 1e-5);
    } else {
      for (std::size_t i = 0; i < ref.out.size(); ++i) ASSERT_NEAR(gpu.out[i], ref.out[i], 1e-5) << "out[" << i << "]";
    }
    for (int d = 0; d < dim; ++d) EXPECT_EQ(gpu.out[d], 0.0f) << "row 0 is empty everywhere";
  }
}

std::vector<MergeCase> merge_cases() {
  std::vector<MergeCase> cases;
  // 33 splits is the plan for a Llama-3-8B layer at batch 1; 1100 exceeds the kernel's cached weights.
  for (int splits : {0, 1, 7, 33, 64, 1100})
    for (int dim : {12, 64, 128, 256})
      for (bool extra : {false, true}) cases.emplace_back(splits, dim, extra);
  // More float4 columns than threads.
  cases.emplace_back(5, 1024, true);
  return cases;
}

INSTANTIATE_TEST_SUITE_P(SplitsDimExtra, CudaMergePartials, ::testing::ValuesIn(merge_cases()),
                         [](const auto& info) {
                           return "s" + std::to_string(std::get<0>(info.param)) + "_d" +
                                  std::to_string(std::get<1>(info.param)) + (std::get<2>(info.param) ? "_extra" : "");
                         });

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
