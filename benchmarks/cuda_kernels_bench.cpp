// Bandwidth of the CUDA kernels (score, select, sparse decode from HBM and from host pages, gather)
// against ceilings measured in the same process: a device-to-device copy for HBM and a bulk pinned
// host-to-device copy for PCIe. GPU time from CUDA events (UseManualTime).
//
//   bench_cuda_kernels [google benchmark flags]             microbenchmarks
//   bench_cuda_kernels --figures OUT.json [--torch T.json]  docs/results/cuda_kernels.json figures
//     (T.json from benchmarks/torch_baselines.py; commit from env HATTN_COMMIT)
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "hattn/core/cuda_check.hpp"
#include "hattn/core/dtype.hpp"
#include "hattn/kernels/cuda_decode.hpp"
#include "hattn/kernels/cuda_gather.hpp"
#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"
#include "hattn/kernels/cuda_two_level.hpp"
#include "hattn/kv/page_summary.hpp"

namespace {

using hattn::bfloat16_t;
using hattn::DType;
namespace hc = hattn::cuda;

// Llama-3-8B attention layer.
constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128;

template <class T>
T* device_alloc(std::size_t n) {
  void* p = nullptr;
  HATTN_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
  return static_cast<T*>(p);
}

template <class T>
T* device_copy(const std::vector<T>& host) {
  T* d = device_alloc<T>(host.size());
  HATTN_CUDA_CHECK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

/// Owns device (and pinned host) allocations of one fixture.
struct Arena {
  std::vector<void*> device, host;
  ~Arena() {
    for (void* p : device) cudaFree(p);
    for (void* p : host) cudaFreeHost(p);
  }
  template <class T>
  T* track(T* p) {
    device.push_back(p);
    return p;
  }
};

/// Median GPU time in microseconds of `fn` enqueued on the default stream, after warm-up.
double median_us(const std::function<void()>& fn, int reps) {
  cudaEvent_t a, b;
  HATTN_CUDA_CHECK(cudaEventCreate(&a));
  HATTN_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) fn();
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    HATTN_CUDA_CHECK(cudaEventRecord(a));
    fn();
    HATTN_CUDA_CHECK(cudaEventRecord(b));
    HATTN_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// Median GPU time in microseconds of `fn` as PyTorch's baseline times SDPA
/// (benchmarks/torch_baselines.py, cuda_median_us): every rep's start and stop events are recorded
/// back to back without a host sync between reps, so the GPU runs behind the host and a rep does
/// not include the host's launch latency, as in the engine, where each layer's kernels queue behind
/// the previous ones. median_us syncs after each rep and so counts one launch latency per rep.
double median_us_queued(const std::function<void()>& fn, int reps) {
  for (int i = 0; i < 3; ++i) fn();
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> start(reps), stop(reps);
  for (int i = 0; i < reps; ++i) {
    HATTN_CUDA_CHECK(cudaEventCreate(&start[i]));
    HATTN_CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  for (int i = 0; i < reps; ++i) {
    HATTN_CUDA_CHECK(cudaEventRecord(start[i]));
    fn();
    HATTN_CUDA_CHECK(cudaEventRecord(stop[i]));
  }
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, start[i], stop[i]));
    t.push_back(ms * 1e3);
    cudaEventDestroy(start[i]);
    cudaEventDestroy(stop[i]);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// GPU time in microseconds per launch of `fn(stream)`: `launches` launches captured in one CUDA
/// graph, the median of `reps` graph launches divided by `launches`. For kernels of a few us, whose
/// time the host's launch latency (~5 us here) would otherwise set.
double graph_us_per_launch(const std::function<void(cudaStream_t)>& fn, int launches, int reps) {
  cudaStream_t s;
  HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  fn(s);  // first-call set-up (function attributes) outside the capture
  HATTN_CUDA_CHECK(cudaStreamSynchronize(s));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  HATTN_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < launches; ++i) fn(s);
  HATTN_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
  HATTN_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  cudaEvent_t a, b;
  HATTN_CUDA_CHECK(cudaEventCreate(&a));
  HATTN_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) HATTN_CUDA_CHECK(cudaGraphLaunch(exec, s));
  HATTN_CUDA_CHECK(cudaStreamSynchronize(s));
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    HATTN_CUDA_CHECK(cudaEventRecord(a, s));
    HATTN_CUDA_CHECK(cudaGraphLaunch(exec, s));
    HATTN_CUDA_CHECK(cudaEventRecord(b, s));
    HATTN_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms * 1e3 / launches);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(s);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

/// A decode layer: `batch` requests of `tokens` tokens, 16-token pages, every page selected. The
/// pages live in HBM slots (in_hbm) or in a mapped pinned host arena.
struct DecodeLayer {
  Arena arena;
  hc::SparseDecodeParams decode;
  hc::MergeParams merge;
  std::size_t kv_bytes = 0;
  void* host_pages = nullptr;
  /// The merge folded into the decode (SparseDecodeParams::out, the decode kernels' kMerge variant);
  /// false (the default, as the engine runs without HATTN_FUSED_STEP): the decode, then
  /// launch_merge_partials.
  bool fold_merge = false;
  std::uint32_t* arrivals = nullptr;

  /// splits <= 0: hc::suggest_decode_splits. q_heads: kQHeads, or group * kKvHeads for other groups.
  DecodeLayer(int tokens, int batch, bool in_hbm, int page_size = 16, int splits = 0, int q_heads = kQHeads,
              hc::DecodeKernel kernel = hc::DecodeKernel::kAuto) {
    const int n = (tokens + page_size - 1) / page_size;
    const std::int64_t pages = static_cast<std::int64_t>(n) * batch;
    const std::size_t block = static_cast<std::size_t>(page_size) * kDim * 2;  // bytes of K (or V) of a head
    kv_bytes = static_cast<std::size_t>(pages) * kKvHeads * 2 * block;
    std::vector<std::int32_t> table(pages), indptr(batch + 1), len(batch, tokens), sel, off, cnt, slot_of;
    for (std::int64_t i = 0; i < pages; ++i) table[i] = static_cast<std::int32_t>(i);
    for (int b = 0; b <= batch; ++b) indptr[b] = b * n;
    for (int b = 0; b < batch; ++b)
      for (int h = 0; h < kKvHeads; ++h) {
        off.push_back(static_cast<std::int32_t>(sel.size()));
        cnt.push_back(n);
        for (int i = 0; i < n; ++i) sel.push_back(i);
      }
    decode.page_table = arena.track(device_copy(table));
    decode.page_indptr = arena.track(device_copy(indptr));
    decode.seq_len = arena.track(device_copy(len));
    decode.selected = arena.track(device_copy(sel));
    decode.selected_offset = arena.track(device_copy(off));
    decode.selected_count = arena.track(device_copy(cnt));
    if (in_hbm) {
      for (std::int64_t i = 0; i < pages * kKvHeads; ++i) slot_of.push_back(static_cast<std::int32_t>(i));
      decode.slot_of = arena.track(device_copy(slot_of));
      void* slots = arena.track(device_alloc<std::byte>(kv_bytes));
      HATTN_CUDA_CHECK(cudaMemset(slots, 0x3c, kv_bytes));  // bf16 0x3c3c ~ 0.0115
      decode.hbm_slots = slots;
    } else {
      HATTN_CUDA_CHECK(cudaHostAlloc(&host_pages, kv_bytes, cudaHostAllocMapped | cudaHostAllocPortable));
      arena.host.push_back(host_pages);
      std::memset(host_pages, 0x3c, kv_bytes);
      decode.host_pages = host_pages;
    }
    std::vector<float> q(static_cast<std::size_t>(batch) * q_heads * kDim);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    for (auto& x : q) x = normal(rng);
    decode.q = arena.track(device_copy(q));
    decode.batch = batch;
    decode.q_heads = q_heads;
    decode.kernel = kernel;
    decode.kv_heads = kKvHeads;
    decode.head_dim = kDim;
    decode.page_size = page_size;
    decode.dtype = DType::kBFloat16;
    decode.scale = 1.0f / std::sqrt(static_cast<float>(kDim));
    decode.splits = splits > 0 ? splits : hc::suggest_decode_splits(batch * kKvHeads, n, page_size);
    const int rows = batch * q_heads;
    decode.partial_out = arena.track(device_alloc<float>(static_cast<std::size_t>(decode.splits) * rows * kDim));
    decode.partial_lse = arena.track(device_alloc<float>(static_cast<std::size_t>(decode.splits) * rows));
    merge.partial_out = decode.partial_out;
    merge.partial_lse = decode.partial_lse;
    merge.splits = decode.splits;
    merge.rows = rows;
    merge.head_dim = kDim;
    merge.out = arena.track(device_alloc<float>(static_cast<std::size_t>(rows) * kDim));
    merge.lse = arena.track(device_alloc<float>(rows));
    const std::size_t ws = hc::decode_workspace_bytes(batch * kKvHeads);
    arrivals = static_cast<std::uint32_t*>(static_cast<void*>(arena.track(device_alloc<std::byte>(ws))));
    HATTN_CUDA_CHECK(cudaMemset(arrivals, 0, ws));  // zeroed once, as the contract asks
  }
  void run(cudaStream_t stream = nullptr) {
    if (fold_merge) {
      hc::SparseDecodeParams d = decode;
      d.out = merge.out;
      d.lse = merge.lse;
      d.arrivals = arrivals;
      hc::launch_sparse_decode(d, stream);
      return;
    }
    hc::launch_sparse_decode(decode, stream);
    hc::launch_merge_partials(merge, stream);
  }
  /// The decode kernel the dispatcher runs, for the figures' "how" text.
  const char* kernel_name() const { return hc::to_string(hc::decode_kernel_for(decode)); }
};

/// Scoring + top-k selection (5% of pages) + sparse decode + merge at `tokens` tokens, batch 1.
struct SparseStep {
  DecodeLayer layer;
  Arena arena;
  hc::ScoreParams score;
  hc::SelectParams select;
  // Two-level scoring (keep_multiple > 0): coarse scores of groups, the group selection, the fine
  // scores of the kept groups' pages (two_level; hc::two_level_stages gives each launch for the
  // breakdown), then the selection over those candidates.
  int pages = 0;  // per KV head
  int keep_groups = 0;
  bool fused = false;  // two-level scoring and selection through launch_select_two_level (as the engine)
  hc::TwoLevelScoreParams two_level;
  hc::SelectParams candidate_select;

  SparseStep(int tokens, double fraction, int keep_multiple = 0) : layer(tokens, 1, true) {
    const int n = (tokens + 15) / 16;
    pages = n;
    std::vector<bfloat16_t> summaries(static_cast<std::size_t>(n) * kKvHeads * 3 * kDim);
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    for (auto& s : summaries) s = hattn::to_bfloat16(normal(rng));
    score.q = layer.decode.q;
    score.summaries = arena.track(device_copy(summaries));
    score.page_table = layer.decode.page_table;
    score.page_indptr = layer.decode.page_indptr;
    score.seq_len = layer.decode.seq_len;
    score.batch = 1;
    score.q_heads = kQHeads;
    score.kv_heads = kKvHeads;
    score.head_dim = kDim;
    score.page_size = 16;
    score.dtype = DType::kBFloat16;
    score.scale = layer.decode.scale;
    score.upper = arena.track(device_alloc<float>(static_cast<std::size_t>(n) * kKvHeads));
    score.estimate = arena.track(device_alloc<float>(static_cast<std::size_t>(n) * kKvHeads));
    const int k = std::max(1, static_cast<int>(std::lround(fraction * n)));
    select.scores = score.upper;
    select.page_indptr = layer.decode.page_indptr;
    select.batch = 1;
    select.kv_heads = kKvHeads;
    select.budget_pages = arena.track(device_copy(std::vector<std::int32_t>(kKvHeads, k)));
    // Inputs uploaded once, before any launch: read while the kernel before finishes, as the engine does.
    score.inputs_ready = true;
    select.inputs_ready = true;
    select.sink_pages = 1;
    select.local_pages = 4;
    // Selection writes into the decode's selected list and counts (same segment offsets).
    select.selected = const_cast<std::int32_t*>(layer.decode.selected);
    select.selected_count = const_cast<std::int32_t*>(layer.decode.selected_count);
    const std::size_t ws = hc::select_workspace_bytes(n, kKvHeads, 1);
    select.workspace = arena.track(device_alloc<std::byte>(ws));
    HATTN_CUDA_CHECK(cudaMemset(select.workspace, 0, ws));  // zeroed once, as the contract asks
    layer.decode.splits = hc::suggest_decode_splits(kKvHeads, k, 16);
    layer.merge.splits = layer.decode.splits;
    if (keep_multiple > 0) plan_two_level(n, k, keep_multiple);
  }

  // keep_multiple x the page budget in groups are kept per KV head, plus the sink and local groups.
  void plan_two_level(int n, int k, int keep_multiple) {
    const int groups = hattn::summary_groups(n);
    const int sink_groups = hattn::summary_groups(select.sink_pages);
    const int local_groups = hattn::max_groups_spanned(select.local_pages);
    keep_groups = std::min(groups, (keep_multiple * k + hattn::kPagesPerSummaryGroup - 1) / hattn::kPagesPerSummaryGroup +
                                       sink_groups + local_groups);
    std::vector<std::int32_t> group_table(groups);
    for (int g = 0; g < groups; ++g) group_table[g] = g;
    hc::TwoLevelScoreParams& t = two_level;
    t.pages = score;
    t.pages.estimate = nullptr;  // top-k by the bound
    t.group_table = arena.track(device_copy(group_table));
    t.group_indptr = arena.track(device_copy(std::vector<std::int32_t>{0, groups}));
    t.group_summaries = arena.track(device_alloc<float>(static_cast<std::size_t>(groups) * kKvHeads * 3 * kDim));
    t.group_upper = arena.track(device_alloc<float>(static_cast<std::size_t>(groups) * kKvHeads));
    t.group_budget = arena.track(device_copy(std::vector<std::int32_t>(kKvHeads, keep_groups)));
    t.sink_pages = select.sink_pages;
    t.local_pages = select.local_pages;
    t.kept = arena.track(device_alloc<std::int32_t>(static_cast<std::size_t>(groups) * kKvHeads));
    t.kept_count = arena.track(device_alloc<std::int32_t>(kKvHeads));
    t.candidates = keep_groups * hattn::kPagesPerSummaryGroup;
    t.pages.upper = arena.track(device_alloc<float>(static_cast<std::size_t>(t.candidates) * kKvHeads));
    t.position_of = arena.track(device_alloc<std::int32_t>(static_cast<std::size_t>(t.candidates) * kKvHeads));
    const hc::TwoLevelStages stages = hc::two_level_stages(t);
    hc::launch_build_group_summaries(stages.rebuild, nullptr);  // once: appends rebuild only the last group
    t.rebuild_groups = false;
    candidate_select = select;
    candidate_select.scores = t.pages.upper;
    candidate_select.position_of = t.position_of;
    candidate_select.candidates = t.candidates;
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  }

  /// Each selection told its longest segment, as the engine tells it (SelectParams::max_entries), so
  /// the top-k runs take the compact kernel, and (fuse) the two-level step through
  /// launch_select_two_level, as the engine runs it.
  void bound_like_the_engine(bool fuse = true) {
    select.max_entries = pages;
    if (keep_groups == 0) return;
    two_level.max_groups = hattn::summary_groups(select.max_entries);
    candidate_select.max_entries = two_level.candidates;
    fused = fuse;
    layer.fold_merge = fuse;
  }

  void run_score(cudaStream_t stream = nullptr) { hc::launch_score_pages(score, stream); }
  void run_select(cudaStream_t stream = nullptr) { hc::launch_select_pages(select, stream); }
  /// Two-level scoring and selection: coarse scores, group selection, fine scores of the candidates.
  void run_two_level_score(cudaStream_t stream = nullptr) { hc::launch_score_two_level(two_level, stream); }
  /// The sparse step ranks by the Quest bound only, so scoring skips the mean rows.
  void run(cudaStream_t stream = nullptr) {
    if (fused) {
      hc::launch_select_two_level(two_level, candidate_select, stream);
    } else if (keep_groups > 0) {
      run_two_level_score(stream);
      hc::launch_select_pages(candidate_select, stream);
    } else {
      float* estimate = score.estimate;
      score.estimate = nullptr;
      run_score(stream);
      score.estimate = estimate;
      run_select(stream);
    }
    layer.run(stream);
  }
};

/// Gather of every (page, head) block of a host arena into HBM slots.
struct GatherJob {
  Arena arena;
  hc::GatherParams p;
  std::size_t bytes = 0;
  GatherJob(int tokens, int page_size) {
    const int pages = tokens / page_size;
    bytes = static_cast<std::size_t>(pages) * kKvHeads * 2 * page_size * kDim * 2;
    void* host = nullptr;
    HATTN_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    arena.host.push_back(host);
    std::memset(host, 0x3c, bytes);
    std::vector<std::int32_t> ids, heads, slots;
    for (int i = 0; i < pages; ++i)
      for (int h = 0; h < kKvHeads; ++h) {
        ids.push_back(i);
        heads.push_back(h);
        slots.push_back(static_cast<std::int32_t>(slots.size()));
      }
    p.host_pages = host;
    p.hbm_slots = arena.track(device_alloc<std::byte>(bytes));
    p.page_ids = arena.track(device_copy(ids));
    p.heads = arena.track(device_copy(heads));
    p.slots = arena.track(device_copy(slots));
    p.n = static_cast<int>(ids.size());
    p.kv_heads = kKvHeads;
    p.page_size = page_size;
    p.head_dim = kDim;
    p.dtype = DType::kBFloat16;
  }
  void run() { hc::launch_gather_pages(p, nullptr); }
};

/// HBM ceiling: device-to-device copy, counting bytes read plus written (GB/s).
double hbm_copy_gbps() {
  const std::size_t bytes = 1ull << 30;
  Arena a;
  void* src = a.track(device_alloc<std::byte>(bytes));
  void* dst = a.track(device_alloc<std::byte>(bytes));
  const double us = median_us([&] { HATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 20);
  return 2.0 * bytes / us * 1e-3;
}

/// PCIe ceiling: one bulk pinned host-to-device copy (GB/s).
double pcie_h2d_gbps() {
  const std::size_t bytes = 256ull << 20;
  Arena a;
  void* host = nullptr;
  HATTN_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
  a.host.push_back(host);
  std::memset(host, 1, bytes);
  void* dst = a.track(device_alloc<std::byte>(bytes));
  const double us = median_us([&] { HATTN_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice)); }, 20);
  return bytes / us * 1e-3;
}

// ---------------------------------------------------------------- Google Benchmark
double g_hbm_gbps = 0, g_pcie_gbps = 0;

template <class Fn>
void time_loop(benchmark::State& state, Fn&& fn, double bytes, double ceiling_gbps) {
  cudaEvent_t a, b;
  HATTN_CUDA_CHECK(cudaEventCreate(&a));
  HATTN_CUDA_CHECK(cudaEventCreate(&b));
  fn();
  HATTN_CUDA_CHECK(cudaDeviceSynchronize());
  for (auto _ : state) {
    HATTN_CUDA_CHECK(cudaEventRecord(a));
    fn();
    HATTN_CUDA_CHECK(cudaEventRecord(b));
    HATTN_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    state.SetIterationTime(ms * 1e-3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes * state.iterations()));
  if (ceiling_gbps > 0) state.counters["ceiling_GBps"] = ceiling_gbps;
}

void BM_HbmCopyCeiling(benchmark::State& state) {
  const std::size_t bytes = 1ull << 30;
  Arena a;
  void* src = a.track(device_alloc<std::byte>(bytes));
  void* dst = a.track(device_alloc<std::byte>(bytes));
  time_loop(state, [&] { HATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); }, 2.0 * bytes, 0);
}

void BM_PcieH2DCeiling(benchmark::State& state) {
  const std::size_t bytes = 256ull << 20;
  Arena a;
  void* host = nullptr;
  HATTN_CUDA_CHECK(cudaHostAlloc(&host, bytes, cudaHostAllocDefault));
  a.host.push_back(host);
  void* dst = a.track(device_alloc<std::byte>(bytes));
  time_loop(state, [&] { HATTN_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice)); }, bytes, 0);
}

void BM_DenseDecodeHbm(benchmark::State& state) {
  DecodeLayer l(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), true);
  time_loop(state, [&] { l.run(); }, static_cast<double>(l.kv_bytes), g_hbm_gbps);
}

// Decode + merge from HBM per kernel and GQA group (q heads = group x 8 KV heads): which kernel the
// dispatcher should pick where. Args: tokens, batch, group, kernel (0 auto, 1 CUDA cores, 2 tensor).
void BM_DenseDecodeKernel(benchmark::State& state) {
  const int group = static_cast<int>(state.range(2));
  const auto kernel = static_cast<hc::DecodeKernel>(state.range(3));
  DecodeLayer l(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), true, 16, 0, group * kKvHeads,
                kernel);
  state.SetLabel(l.kernel_name());
  time_loop(state, [&] { l.run(); }, static_cast<double>(l.kv_bytes), g_hbm_gbps);
}

// The merge alone, after one decode filled the partials (rows = batch x 32 q heads). 20 launches
// per iteration, reported per launch: one launch alone would time the host's launch latency.
void BM_MergePartials(benchmark::State& state) {
  constexpr int kLaunches = 20;
  DecodeLayer l(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)), true);
  hc::launch_sparse_decode(l.decode, nullptr);
  state.counters["splits"] = l.merge.splits;
  const double bytes = static_cast<double>(l.merge.splits) * l.merge.rows * (kDim + 1) * 4;
  time_loop(
      state, [&] { for (int i = 0; i < kLaunches; ++i) hc::launch_merge_partials(l.merge, nullptr); },
      bytes * kLaunches, g_hbm_gbps);
  state.counters["us_per_merge_queued"] =
      median_us_queued([&] { hc::launch_merge_partials(l.merge, nullptr); }, 200);
  state.counters["us_per_merge_graph"] =
      graph_us_per_launch([&](cudaStream_t s) { hc::launch_merge_partials(l.merge, s); }, 20, 50);
}

void BM_DecodeHostPages(benchmark::State& state) {
  DecodeLayer l(static_cast<int>(state.range(0)), 1, false, static_cast<int>(state.range(1)));
  time_loop(state, [&] { l.run(); }, static_cast<double>(l.kv_bytes), g_pcie_gbps);
}

void BM_Gather(benchmark::State& state) {
  GatherJob g(static_cast<int>(state.range(0)), static_cast<int>(state.range(1)));
  time_loop(state, [&] { g.run(); }, static_cast<double>(g.bytes), g_pcie_gbps);
}

// GPU time per launch of the score and select kernels also comes from a graph of 20 launches
// (us_graph): one launch timed alone includes the host's launch latency, ~5 us here.
// Args: tokens, rows (0: the bound's min/max rows, as the sparse step; 1: all three).
void BM_ScorePages(benchmark::State& state) {
  SparseStep s(static_cast<int>(state.range(0)), 0.05);
  const bool all_rows = state.range(1) != 0;
  if (!all_rows) s.score.estimate = nullptr;
  const double bytes = static_cast<double>(state.range(0)) / 16 * kKvHeads * (all_rows ? 3 : 2) * kDim * 2;
  time_loop(state, [&] { s.run_score(); }, bytes, g_hbm_gbps);
  const double us = graph_us_per_launch([&](cudaStream_t st) { s.run_score(st); }, 20, 30);
  state.counters["us_graph"] = us;
  state.counters["GBps_graph"] = bytes / us * 1e-3;
}

// Args: tokens, compact (1: SelectParams::max_entries set, so segments <= 16K entries take the
// compact kernel).
void BM_SelectTopK(benchmark::State& state) {
  SparseStep s(static_cast<int>(state.range(0)), 0.05);
  if (state.range(1) != 0) s.bound_like_the_engine();
  s.run_score();
  time_loop(state, [&] { s.run_select(); }, static_cast<double>(state.range(0)) / 16 * kKvHeads * 4, g_hbm_gbps);
  state.counters["us_graph"] = graph_us_per_launch([&](cudaStream_t st) { s.run_select(st); }, 20, 30);
}

/// The mass rule (rank by the bound, accumulate the estimate) at 0.9, capped at 5% of the pages.
void BM_SelectMass(benchmark::State& state) {
  SparseStep s(static_cast<int>(state.range(0)), 0.05);
  s.run_score();
  s.select.log_mass = s.score.estimate;
  s.select.mass_threshold = 0.9f;
  time_loop(state, [&] { s.run_select(); }, static_cast<double>(state.range(0)) / 16 * kKvHeads * 8, g_hbm_gbps);
  state.counters["us_graph"] = graph_us_per_launch([&](cudaStream_t st) { s.run_select(st); }, 20, 30);
}

void BM_Sparse5Step(benchmark::State& state) {
  SparseStep s(static_cast<int>(state.range(0)), 0.05);
  time_loop(state, [&] { s.run(); }, 0.05 * static_cast<double>(s.layer.kv_bytes), g_hbm_gbps);
  state.counters["us_queued"] = median_us_queued([&] { s.run(); }, 100);
  state.counters["us_graph"] = graph_us_per_launch([&](cudaStream_t st) { s.run(st); }, 20, 30);
  // Each stage alone in a graph, for the breakdown.
  float* estimate = s.score.estimate;
  s.score.estimate = nullptr;
  state.counters["score_us"] = graph_us_per_launch([&](cudaStream_t st) { s.run_score(st); }, 20, 30);
  s.score.estimate = estimate;
  state.counters["select_us"] = graph_us_per_launch([&](cudaStream_t st) { s.run_select(st); }, 20, 30);
  state.counters["decode_merge_us"] = graph_us_per_launch([&](cudaStream_t st) { s.layer.run(st); }, 20, 30);
  s.layer.fold_merge = true;
  state.counters["decode_folded_merge_us"] = graph_us_per_launch([&](cudaStream_t st) { s.layer.run(st); }, 20, 30);
}

/// The sparse 5% step with two-level scoring. Args: tokens, groups kept as a multiple of the page
/// budget, kernels (0: general top-k, staged; 1: both selections bounded, so they take the compact
/// top-k kernel, staged; 2: bounded and fused through launch_select_two_level, as the engine runs it).
/// Stages alone in graphs (the staged launches): coarse score, group selection, fine score of the
/// candidates, candidate selection, decode + merge.
void BM_Sparse5TwoLevel(benchmark::State& state) {
  SparseStep s(static_cast<int>(state.range(0)), 0.05, static_cast<int>(state.range(1)));
  if (state.range(2) != 0) s.bound_like_the_engine(state.range(2) == 2);
  time_loop(state, [&] { s.run(); }, 0.05 * static_cast<double>(s.layer.kv_bytes), g_hbm_gbps);
  state.counters["kept_groups"] = s.keep_groups;
  state.counters["us_queued"] = median_us_queued([&] { s.run(); }, 100);
  state.counters["us_graph"] = graph_us_per_launch([&](cudaStream_t st) { s.run(st); }, 20, 30);
  const hc::TwoLevelStages stage = hc::two_level_stages(s.two_level);
  state.counters["coarse_us"] = graph_us_per_launch([&](cudaStream_t st) { hc::launch_score_pages(stage.coarse, st); }, 20, 30);
  state.counters["group_select_us"] =
      graph_us_per_launch([&](cudaStream_t st) { hc::launch_select_pages(stage.keep, st); }, 20, 30);
  state.counters["fine_us"] = graph_us_per_launch([&](cudaStream_t st) { hc::launch_score_pages(stage.fine, st); }, 20, 30);
  state.counters["select_us"] =
      graph_us_per_launch([&](cudaStream_t st) { hc::launch_select_pages(s.candidate_select, st); }, 20, 30);
  state.counters["decode_merge_us"] = graph_us_per_launch([&](cudaStream_t st) { s.layer.run(st); }, 20, 30);
}

BENCHMARK(BM_HbmCopyCeiling)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_PcieH2DCeiling)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DenseDecodeHbm)->Args({32768, 1})->Args({131072, 1})->Args({131072, 8})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DenseDecodeKernel)
    ->ArgsProduct({{32768, 131072}, {1}, {1, 4, 7, 8}, {1, 2}})
    ->Args({131072, 8, 4, 1})
    ->Args({131072, 8, 4, 2})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_MergePartials)->Args({32768, 1})->Args({131072, 1})->Args({131072, 8})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_DecodeHostPages)->Args({32768, 16})->Args({32768, 64})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Gather)->Args({32768, 16})->Args({32768, 64})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_ScorePages)->Args({131072, 0})->Args({131072, 1})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SelectTopK)->Args({131072, 0})->Args({131072, 1})->Args({1 << 20, 0})->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_SelectMass)->Arg(131072)->Arg(1 << 20)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Sparse5Step)->Arg(131072)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Sparse5TwoLevel)->ArgsProduct({{131072}, {2, 4}, {0, 1, 2}})->Args({1 << 20, 4, 0})->UseManualTime()->Unit(benchmark::kMicrosecond);

// ---------------------------------------------------------------- figures
/// Reads section[key] from the flat JSON torch_baselines.py writes ({"section": {"key": number}}).
double json_number(const std::string& text, const std::string& section, const std::string& key) {
  const auto s = text.find("\"" + section + "\"");
  if (s == std::string::npos) return NAN;
  const auto end = text.find('}', s);
  const auto k = text.find("\"" + key + "\"", s);
  if (k == std::string::npos || k > end) return NAN;
  const auto colon = text.find(':', k);
  return std::strtod(text.c_str() + colon + 1, nullptr);
}

struct Figure {
  double value;
  std::string unit, how;
};

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

int write_figures(const std::string& out_path, const std::string& torch_path) {
  std::string torch;
  if (!torch_path.empty()) {
    std::ifstream in(torch_path);
    std::stringstream ss;
    ss << in.rdbuf();
    torch = ss.str();
  }
  cudaDeviceProp prop{};
  HATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double hbm = hbm_copy_gbps(), pcie = pcie_h2d_gbps();
  std::printf("ceilings: HBM copy %.0f GB/s, pinned H2D %.1f GB/s\n", hbm, pcie);
  std::map<std::string, Figure> figs;

  struct DenseCase {
    const char* name;
    int tokens, batch;
  };
  for (const DenseCase c : {DenseCase{"gpu_dense_32k_b1_vs_torch", 32768, 1},
                            DenseCase{"gpu_dense_128k_b1_vs_torch", 131072, 1},
                            DenseCase{"gpu_dense_128k_b8_vs_torch", 131072, 8}}) {
    DecodeLayer l(c.tokens, c.batch, true);
    const double us = median_us_queued([&] { l.run(); }, 50);
    const double synced_us = median_us([&] { l.run(); }, 50);
    const double gbps = l.kv_bytes / us * 1e-3;
    const std::string key = std::to_string(c.tokens) + "x" + std::to_string(c.batch);
    const double torch_us = json_number(torch, "gpu_sdpa_us", key);
    // The merge alone and the other kernel, for the notes (not figures).
    const double merge_us =
        graph_us_per_launch([&](cudaStream_t s) { hc::launch_merge_partials(l.merge, s); }, 20, 30);
    DecodeLayer alt(c.tokens, c.batch, true, 16, l.decode.splits, kQHeads, hc::DecodeKernel::kCudaCores);
    const double alt_us = median_us_queued([&] { alt.run(); }, 20);
    std::printf("%s: %.1f us, %.0f GB/s (%.2f of HBM copy), torch %.1f us, ratio %.3f, splits %d, kernel %s; "
                "synced after each rep %.1f us; merge alone (graph of 20) %.1f us; cuda_cores kernel %.1f us\n",
                c.name, us, gbps, gbps / hbm, torch_us, us / torch_us, l.decode.splits, l.kernel_name(), synced_us,
                merge_us, alt_us);
    std::ostringstream how;
    how << "sparse decode (" << l.kernel_name() << " kernel, " << l.decode.splits
        << " splits per KV head) + merge with every page selected from HBM slots, " << c.tokens << " tokens x batch "
        << c.batch << ", 32 q / 8 kv heads, dim 128, bf16, 16-token pages: " << us << " us (" << gbps
        << " GB/s, HBM copy ceiling " << hbm << " GB/s) / PyTorch best SDPA " << torch_us
        << " us (benchmarks/torch_baselines.py, same run); median of 50 reps timed as torch_baselines.py times "
           "SDPA (events back to back, no host sync between reps); "
        << synced_us << " us with a host sync after each rep";
    figs[c.name] = {std::isnan(torch_us) ? NAN : us / torch_us, "ratio", how.str()};
    if (c.batch == 1 && c.tokens == 131072) {
      // Sensitivity to the split count, printed for tuning notes only.
      const int planned = l.decode.splits;
      for (int sp : {planned / 2, planned * 2, planned * 4}) {
        DecodeLayer t(c.tokens, c.batch, true, 16, std::max(sp, 1));
        std::printf("  splits %d: %.1f us\n", t.decode.splits, median_us_queued([&] { t.run(); }, 30));
      }
    }
  }
  {
    // One-level (every page's summary read) and two-level (groups kept: 4x the page budget) steps.
    SparseStep one(131072, 0.05), two(131072, 0.05, 4);
    one.bound_like_the_engine();
    two.bound_like_the_engine();
    struct Times {
      double synced, queued, graph;
    };
    auto time = [](SparseStep& s) {
      return Times{median_us([&] { s.run(); }, 100), median_us_queued([&] { s.run(); }, 100),
                   graph_us_per_launch([&](cudaStream_t st) { s.run(st); }, 20, 30)};
    };
    // The figure is the fused step: a bound that sent it to the staged launches would mislabel it.
    if (!hc::select_two_level_fuses(two.two_level, two.candidate_select)) {
      std::fprintf(stderr, "gpu_sparse5_128k_b1_us: the two-level step does not fuse\n");
      std::exit(1);
    }
    const Times t1 = time(one), t2 = time(two);
    two.bound_like_the_engine(false);  // staged: group and page selection, merge as launches of their own
    const Times t3 = time(two);
    two.bound_like_the_engine(true);
    std::printf("sparse 5%% one-level: %.1f us synced, %.1f queued, %.1f in a graph; two-level (%d of 512 groups "
                "kept): %.1f synced, %.1f queued, %.1f in a graph\n",
                t1.synced, t1.queued, t1.graph, two.keep_groups, t2.synced, t2.queued, t2.graph);
    std::ostringstream how;
    how << "two-level scoring (coarse Quest bound of 512 groups of 16 pages from fp32 group summaries, top "
        << two.keep_groups << " groups per KV head incl. sink and local groups, fine bound of their pages) + top-k "
        << "selection (5% of 8192 pages per KV head, 1 sink, 4 local; both selections told their longest segment, "
        << "as the engine does, so the compact top-k kernel runs; fused: after the coarse scores one kernel keeps "
        << "the groups, scores their pages and selects, launch_select_two_level, as the engine runs it with "
        << "HATTN_FUSED_STEP=1) + sparse decode from HBM with the merge folded in, 128K tokens "
        << "batch 1, Llama-3-8B layer, bf16; median of 100 steps each captured in a CUDA graph of 20 steps (as "
        << "engines replay decode): " << t2.graph << " us; launched one by one with events around: " << t2.synced
        << " us synced, " << t2.queued << " us queued. One-level scoring (every page's summary): " << t1.graph
        << " us in a graph, " << t1.synced << " us synced. The same two-level step staged (group selection, "
        << "page selection and merge as launches of their own): " << t3.graph << " us in a graph";
    figs["gpu_sparse5_128k_b1_us"] = {t2.graph, "us", how.str()};
  }
  {
    DecodeLayer l(32768, 1, false);
    const double us = median_us([&] { l.run(); }, 20);
    const double gbps = l.kv_bytes / us * 1e-3;
    std::printf("host-page decode: %.1f us, %.1f GB/s (%.2f of H2D), kernel %s\n", us, gbps, gbps / pcie,
                l.kernel_name());
    std::ostringstream how;
    how << "sparse decode (" << l.kernel_name() << " kernel) reading every 16-token page from mapped pinned host memory (zero-copy), 32K tokens, "
           "batch 1, Llama-3-8B layer: "
        << gbps << " GB/s / bulk pinned cudaMemcpyAsync H2D " << pcie << " GB/s in the same process";
    figs["gpu_hostpage_decode_vs_pcie"] = {gbps / pcie, "ratio", how.str()};
  }
  {
    GatherJob g(32768, 16);
    const double us = median_us([&] { g.run(); }, 20);
    const double gbps = g.bytes / us * 1e-3;
    std::printf("gather: %.1f us, %.1f GB/s (%.2f of H2D)\n", us, gbps, gbps / pcie);
    std::ostringstream how;
    how << "gather kernel copying 16384 (page, head) blocks of 16-token pages (8 KB each, K+V) from mapped "
           "pinned host memory into HBM slots: "
        << gbps << " GB/s / bulk pinned cudaMemcpyAsync H2D " << pcie << " GB/s in the same process";
    figs["gpu_gather_vs_pcie"] = {gbps / pcie, "ratio", how.str()};
  }

  const char* commit = std::getenv("HATTN_COMMIT");
  char date[16];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  std::ofstream out(out_path);
  out << "{\n  \"device\": \"" << json_escape(prop.name) << "\",\n  \"date\": \"" << date << "\",\n  \"commit\": \""
      << json_escape(commit ? commit : "unknown") << "\",\n  \"ceilings\": {\"hbm_copy_GBps\": " << hbm
      << ", \"pinned_h2d_GBps\": " << pcie << "},\n  \"figures\": {\n";
  std::size_t i = 0;
  for (const auto& [name, f] : figs) {
    out << "    \"" << name << "\": {\"value\": ";
    if (std::isnan(f.value)) out << "null"; else out << f.value;
    out << ", \"unit\": \"" << f.unit << "\", \"how\": \"" << json_escape(f.how) << "\"}"
        << (++i < figs.size() ? ",\n" : "\n");
  }
  out << "  }\n}\n";
  std::printf("wrote %s\n", out_path.c_str());
  return out ? 0 : 1;
}

/// Where the fused two-level step's time goes (--timeline): chains of its launches in graphs, and the
/// fused kernel's phase marks (%globaltimer, hc::TwoLevelMark) over steps each launched after the
/// previous one finished, relative to its first block. Printed, not a figure.
int print_timeline() {
  SparseStep two(131072, 0.05, 4);
  two.bound_like_the_engine(true);
  const hc::TwoLevelStages stage = hc::two_level_stages(two.two_level);
  const double coarse = graph_us_per_launch([&](cudaStream_t st) { hc::launch_score_pages(stage.coarse, st); }, 20, 30);
  const double scored = graph_us_per_launch(
      [&](cudaStream_t st) { hc::launch_select_two_level(two.two_level, two.candidate_select, st); }, 20, 30);
  const double whole = graph_us_per_launch([&](cudaStream_t st) { two.run(st); }, 20, 30);
  std::printf("chains in graphs of 20 (us per step): coarse %.1f; coarse + fused select %.1f; + decode %.1f "
              "(splits %d)\n", coarse, scored, whole, two.layer.decode.splits);
  {
    // The staged launches as growing chains: each one's cost in the chain, not alone.
    SparseStep staged(131072, 0.05, 4);
    staged.bound_like_the_engine(false);
    const hc::TwoLevelStages st = hc::two_level_stages(staged.two_level);
    auto chain = [&](int stages, cudaStream_t s) {
      hc::launch_score_pages(st.coarse, s);
      if (stages > 1) hc::launch_select_pages(st.keep, s);
      if (stages > 2) hc::launch_score_pages(st.fine, s);
      if (stages > 3) hc::launch_select_pages(staged.candidate_select, s);
      if (stages > 4) hc::launch_sparse_decode(staged.layer.decode, s);
      if (stages > 5) hc::launch_merge_partials(staged.layer.merge, s);
    };
    std::printf("staged chains in graphs of 20 (us per step):");
    const char* names[] = {"coarse", "+keep", "+fine", "+select", "+decode", "+merge"};
    for (int n = 1; n <= 6; ++n)
      std::printf(" %s %.1f;", names[n - 1], graph_us_per_launch([&](cudaStream_t s) { chain(n, s); }, 20, 30));
    std::printf("\n");
  }
  for (int splits : {two.layer.decode.splits / 2, two.layer.decode.splits * 2}) {
    SparseStep t(131072, 0.05, 4);
    t.bound_like_the_engine(true);
    t.layer.decode.splits = t.layer.merge.splits = std::max(splits, 1);
    std::printf("  decode splits %d: %.1f us\n", t.layer.decode.splits,
                graph_us_per_launch([&](cudaStream_t st) { t.run(st); }, 20, 30));
  }
  for (const char* blocks : {"4", "8", "16"}) {
    setenv("HATTN_FUSED_BLOCKS", blocks, 1);
    std::printf("  fused blocks per segment %s: %.1f us\n", blocks,
                graph_us_per_launch([&](cudaStream_t st) { two.run(st); }, 20, 30));
  }
  unsetenv("HATTN_FUSED_BLOCKS");
  // Marks of the fused kernel only: in the tensor-core decode they cost registers and a spill in the
  // staged, merge-folded instance (ptxas), which no profiling hook is worth in that kernel.
  constexpr int kMarks = hc::kTwoLevelMarks;
  Arena arena;
  unsigned long long* marks = arena.track(device_alloc<unsigned long long>(kMarks));
  std::vector<unsigned long long> init(kMarks, 0), got(kMarks);
  init[hc::kTwoLevelEarliestStart] = ~0ull;
  two.two_level.phase_ns = marks;
  const char* names[kMarks] = {"fused: first block", "fused: coarse waited", "fused: groups kept",
                               "fused: scored",      "fused: select loaded", "fused: selected"};
  std::vector<std::vector<double>> rel(kMarks);
  for (int rep = 0; rep < 33; ++rep) {
    HATTN_CUDA_CHECK(cudaMemcpy(marks, init.data(), kMarks * sizeof(unsigned long long), cudaMemcpyHostToDevice));
    two.run();
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    HATTN_CUDA_CHECK(cudaMemcpy(got.data(), marks, kMarks * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
    if (rep < 3) continue;
    for (int i = 0; i < kMarks; ++i)
      rel[i].push_back((static_cast<double>(got[i]) - static_cast<double>(got[0])) * 1e-3);
  }
  std::printf("phase marks, us after the fused kernel's first block (median of 30 steps, each after a sync):\n");
  for (int i = 0; i < kMarks; ++i) {
    std::sort(rel[i].begin(), rel[i].end());
    std::printf("  %-22s %7.2f\n", names[i], rel[i][rel[i].size() / 2]);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string figures, torch;
  bool timeline = false;
  std::vector<char*> rest{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--figures" && i + 1 < argc) figures = argv[++i];
    else if (a == "--torch" && i + 1 < argc) torch = argv[++i];
    else if (a == "--timeline") timeline = true;
    else rest.push_back(argv[i]);
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::fprintf(stderr, "bench_cuda_kernels: no CUDA device\n");
    return 1;
  }
  try {
    if (timeline) return print_timeline();
    if (!figures.empty()) return write_figures(figures, torch);
    g_hbm_gbps = hbm_copy_gbps();
    g_pcie_gbps = pcie_h2d_gbps();
    int n = static_cast<int>(rest.size());
    benchmark::Initialize(&n, rest.data());
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_kernels: %s\n", e.what());
    return 1;
  }
  return 0;
}
