// hattn-bench: the end-to-end decode step of one Llama-3-8B-shaped layer (32 query heads, 8 KV heads,
// dim 128, bf16) over host-resident KV, for the Fluxion default and the baselines in the same run:
// GPU-resident dense (our kernel at 100% with the whole layer in the HBM cache), full offload (one
// bulk copy of the layer's KV, then our dense kernel; and PyTorch's from --torch_json), PyTorch SDPA
// (--torch_json), CPU-only dense, the fixed 5% hybrid and the Quest-like GPU-only selection. Each
// system: warm-up steps (HBM cache and predictor settle), then timed steps, one new token per request
// per step. A step runs --layers layers back to back on one stream, as an engine does (the caller's
// launches for layer l + 1 overlap the GPU's work on layer l), and synchronises once; the time per
// layer is the step / layers. With --layers 1 every layer is synchronised on its own and its host
// launches are on the critical path. The median is reported with its floor max(host bytes / host
// bandwidth, HBM bytes / HBM bandwidth), both bandwidths measured here.
// Writes docs/results/e2e.json and docs/results/orchestrator.json (GPU runs only).
#include <array>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hattn/hybrid_attention.hpp"
#include "results_json.hpp"
#include "zoo/head_zoo.hpp"

#if HATTN_WITH_CUDA
#include <cuda_runtime.h>

#include "hattn/core/cuda_check.hpp"
#endif

namespace {

using namespace hattn;
using Clock = std::chrono::steady_clock;

struct Options {
  std::vector<std::int64_t> contexts;
  std::vector<int> batches;
  std::vector<std::string> systems;
  int warmup = 10;
  int iters = 30;
  int repeats = 1;  // runs of each system, each a fresh object; the median run's row is reported
  int threads = 0;
  int zoo_layer = 16;
  int layers = 4;  // layers per step, back to back (capped so the pinned KV stays under kMaxStepKvBytes)
  double budget = 0.05;
  double hbm_share = 0.19;  // under the 20% bar with the slack pages for new tokens
  double coarse_keep = 4.0;  // fluxion_2l
  Priority::CostModel cost{};  // fluxion and fluxion_2l's scheduler (--gpu_only_hit_rate, --cpu_gbps, --cpu_fixed_us)
  bool quick = false;
  bool cpu = false;
  bool phases = false;
  Admission admission = Admission::kStaged;
  std::string torch_json;
  std::string json = "docs/results/e2e.json";
  std::string orchestrator_json = "docs/results/orchestrator.json";
  std::string trace;  // --trace: timeline of one step of each system at 128K x 1
  std::string commit;
};

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

double us_since(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

// Host DRAM read bandwidth: every thread sums its slice of a 2 GiB buffer (compiler-vectorised),
// best of 5 passes. Bytes per microsecond.
double measure_host_read_bytes_per_us(int threads) {
  const std::size_t bytes = std::size_t{2} << 30;
  std::vector<std::uint64_t> buf(bytes / 8);
  for (std::size_t i = 0; i < buf.size(); i += 512) buf[i] = i;  // touch every page
  const int t = threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  double best = 0;
  std::atomic<std::uint64_t> sink{0};
  for (int pass = 0; pass < 5; ++pass) {
    const auto t0 = Clock::now();
    std::vector<std::thread> pool;
    for (int w = 0; w < t; ++w)
      pool.emplace_back([&, w] {
        const std::size_t chunk = buf.size() / t;
        const std::uint64_t* p = buf.data() + w * chunk;
        std::uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (std::size_t i = 0; i + 4 <= chunk; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
        sink += s0 + s1 + s2 + s3;
      });
    for (auto& th : pool) th.join();
    best = std::max(best, static_cast<double>(bytes) / us_since(t0));
  }
  return best;
}

// A value from the torch baselines file: section -> {"TOKENSxBATCH": us} (or a plain number).
// Returns a negative value when absent. A small scanner: the file is machine-written, flat.
double torch_value(const std::string& text, const std::string& section, const std::string& key) {
  const auto s = text.find("\"" + section + "\"");
  if (s == std::string::npos) return -1;
  auto colon = text.find(':', s);
  auto p = text.find_first_not_of(" \t\r\n", colon + 1);
  if (p == std::string::npos) return -1;
  if (text[p] != '{') return std::strtod(text.c_str() + p, nullptr);
  const auto end = text.find('}', p);
  const auto k = text.find("\"" + key + "\"", p);
  if (k == std::string::npos || k > end) return -1;
  colon = text.find(':', k);
  return std::strtod(text.c_str() + colon + 1, nullptr);
}

// The pinned host KV of one system's layers is capped (128K x 16 x 4 layers would pin 34 GB).
constexpr double kMaxStepKvBytes = 8.0 * (1 << 30);

struct Row {
  std::string system;
  std::int64_t context = 0;
  int batch = 0;
  int layers = 1;             // layers per step, run back to back
  double step_us = -1;        // median (run() of every layer + one stream sync) / layers
  double plan_us = 0;         // median plan(), once per step for all of the step's layers
  double floor_us = 0;        // max(host bytes / host bw, HBM bytes / HBM bw)
  double host_bytes = 0, hbm_bytes = 0;
  double budget_used = 0;
  double hbm_share = 0;       // HBM cache bytes / the KV bytes of the step's layers
  double overlap = -1;        // share of the step during which both sides computed
  double caller_us = -1;      // median StepStats::caller_us
  double cpu_us = 0, gpu_us = 0;
  std::string phases;         // medians of StepStats::gpu_phases (--phases)
  std::string trace;          // JSON array: the last timed step's layers on one clock (--trace)
  std::string note;
  std::vector<double> step_us_runs;  // step_us of every run (--repeats), ascending
};

// "a us" for one run, else "median of n runs (fresh objects) from lo to hi us".
std::string runs_text(const Row& r) {
  if (r.step_us_runs.size() <= 1) return detail::concat(r.step_us, " us");
  return detail::concat(r.step_us, " us (median of ", r.step_us_runs.size(), " runs, each a fresh object: ",
                        r.step_us_runs.front(), " to ", r.step_us_runs.back(), " us)");
}

struct Bandwidths {
  double host = 0;  // bytes per us
  double hbm = 0;
  double h2d = 0;
};

#if HATTN_WITH_CUDA
// Milliseconds of one cudaMemcpyAsync on `stream`, timed with the events e0 and e1.
float timed_copy_ms(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind, cudaStream_t stream,
                    cudaEvent_t e0, cudaEvent_t e1) {
  float ms = 0;
  HATTN_CUDA_CHECK(cudaEventRecord(e0, stream));
  HATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, stream));
  HATTN_CUDA_CHECK(cudaEventRecord(e1, stream));
  HATTN_CUDA_CHECK(cudaEventSynchronize(e1));
  HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  return ms;
}

// HBM bandwidth from a device-to-device copy of 2 GiB (read + write counted), best of 5; and the
// pinned host-to-device bulk copy rate.
void measure_device_bandwidths(Bandwidths& bw, cudaStream_t stream) {
  const std::size_t bytes = std::size_t{1} << 30;
  void *a = nullptr, *b = nullptr, *h = nullptr;
  HATTN_CUDA_CHECK(cudaMalloc(&a, bytes));
  HATTN_CUDA_CHECK(cudaMalloc(&b, bytes));
  HATTN_CUDA_CHECK(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
  std::memset(h, 1, bytes);
  cudaEvent_t e0, e1;
  HATTN_CUDA_CHECK(cudaEventCreate(&e0));
  HATTN_CUDA_CHECK(cudaEventCreate(&e1));
  for (int pass = 0; pass < 5; ++pass) {
    const float d2d_ms = timed_copy_ms(b, a, bytes, cudaMemcpyDeviceToDevice, stream, e0, e1);
    bw.hbm = std::max(bw.hbm, 2.0 * bytes / (d2d_ms * 1e3));
    const float h2d_ms = timed_copy_ms(a, h, bytes, cudaMemcpyHostToDevice, stream, e0, e1);
    bw.h2d = std::max(bw.h2d, bytes / (h2d_ms * 1e3));
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  cudaFreeHost(h);
}

// Full offload: one bulk copy of the layer's K and V (pinned host -> device), median of 10.
double measure_bulk_copy_us(std::size_t bytes, cudaStream_t stream) {
  void *d = nullptr, *h = nullptr;
  HATTN_CUDA_CHECK(cudaMalloc(&d, bytes));
  HATTN_CUDA_CHECK(cudaHostAlloc(&h, bytes, cudaHostAllocDefault));
  std::memset(h, 1, bytes);
  cudaEvent_t e0, e1;
  HATTN_CUDA_CHECK(cudaEventCreate(&e0));
  HATTN_CUDA_CHECK(cudaEventCreate(&e1));
  std::vector<double> t;
  for (int i = 0; i < 12; ++i) {
    const float ms = timed_copy_ms(d, h, bytes, cudaMemcpyHostToDevice, stream, e0, e1);
    if (i >= 2) t.push_back(ms * 1e3);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(d);
  cudaFreeHost(h);
  return median(t);
}
#endif

// One layer's tokens for every request (the same zoo prompt: timing does not depend on content
// beyond the selection, and one generation keeps set-up short at 128K x 16).
struct Workload {
  std::unique_ptr<zoo::HeadZoo> zoo;
  std::vector<bfloat16_t> keys, values;  // [context + steps][kv_heads][dim]
  std::vector<std::vector<float>> queries;  // [step][q_heads * dim]
};

Workload make_workload(const Options& o, std::int64_t context, int steps) {
  Workload w;
  zoo::ZooConfig zc;
  zc.model = zoo::llama3_8b_shape();
  zc.layers = {o.zoo_layer};
  zc.context_tokens = context;
  w.zoo = std::make_unique<zoo::HeadZoo>(zc, steps);
  const ModelShape& s = w.zoo->shape();
  const std::int64_t n = context + steps;
  w.keys.resize(static_cast<std::size_t>(n) * s.kv_heads * s.head_dim);
  w.values.resize(w.keys.size());
  w.zoo->tokens(0, 0, n, w.keys, w.values);
  for (int st = 0; st < steps; ++st) {
    w.queries.emplace_back(static_cast<std::size_t>(s.q_heads) * s.head_dim);
    w.zoo->query(0, st, w.queries.back());
  }
  return w;
}

// Layers per step for this shape: --layers, fewer where their pinned KV would pass kMaxStepKvBytes.
int step_layers(const Options& o, const ModelShape& s, std::int64_t context, int batch) {
  const double layer_bytes = static_cast<double>(batch) * context * 2.0 * s.kv_heads * s.head_dim * dtype_bytes(s.kv_dtype);
  return std::clamp(static_cast<int>(kMaxStepKvBytes / layer_bytes), 1, std::max(1, o.layers));
}

Config make_config(const Options& o, const ModelShape& model, std::int64_t context, int batch, double budget,
                   double hbm_share, bool gpu) {
  ModelShape s = model;
  s.layers = step_layers(o, model, context, batch);
  const PageLayout layout{16, s.kv_heads, s.head_dim, s.kv_dtype};
  const std::int64_t pages = ((context + o.warmup + o.iters + 15) / 16 + 2) * batch * s.layers;
  Config c;
  c.shape = s;
  c.page_size = 16;
  c.host_pool_bytes = static_cast<std::size_t>(pages) * (layout.page_bytes() + layout.summary_bytes());
  c.hbm_cache_bytes = gpu ? static_cast<std::size_t>(hbm_share * static_cast<double>(pages) * layout.page_bytes()) : 0;
  c.cpu_threads = o.threads;
  c.avg_budget = budget;
  c.backend = gpu ? Backend::kGpu : Backend::kCpu;
  c.max_batch = std::max(batch, 1);
  c.time_phases = o.phases;
  c.admission = o.admission;
  return c;
}

template <class Attn>
Row time_system(Attn& attn, const std::string& name, const Options& o, const Workload& w, std::int64_t context,
                int batch, const Bandwidths& bw, bool gpu) {
  const ModelShape& s = attn.config().shape;
  const std::size_t per_token = static_cast<std::size_t>(s.kv_heads) * s.head_dim;
  const int layers = s.layers;  // every layer holds the zoo layer's tokens
  std::vector<SeqId> rows;
  for (int b = 0; b < batch; ++b) {
    rows.push_back(attn.add_sequence());
    for (int layer = 0; layer < layers; ++layer)
      attn.append(rows.back(), layer, TensorView::contiguous(w.keys.data(), DType::kBFloat16, {context, s.kv_heads, s.head_dim}),
                  TensorView::contiguous(w.values.data(), DType::kBFloat16, {context, s.kv_heads, s.head_dim}));
  }
  const std::size_t qn = static_cast<std::size_t>(batch) * s.q_heads * s.head_dim;
  std::vector<float> q(qn), out(qn);
  float *dq = nullptr, *dout = nullptr;
  cuda::Stream stream = nullptr;
#if HATTN_WITH_CUDA
  cudaStream_t cs = nullptr;
  if (gpu) {
    HATTN_CUDA_CHECK(cudaMalloc(&dq, qn * sizeof(float)));
    HATTN_CUDA_CHECK(cudaMalloc(&dout, qn * sizeof(float)));
    HATTN_CUDA_CHECK(cudaStreamCreate(&cs));
    stream = cs;
  }
#endif
  const std::int64_t B = batch;
  const TensorView qv = gpu ? TensorView::contiguous(dq, DType::kFloat32, {B, s.q_heads, s.head_dim}, Device::kCuda)
                            : TensorView::contiguous(q.data(), DType::kFloat32, {B, s.q_heads, s.head_dim});
  const TensorView ov = gpu ? TensorView::contiguous(dout, DType::kFloat32, {B, s.q_heads, s.head_dim}, Device::kCuda)
                            : TensorView::contiguous(out.data(), DType::kFloat32, {B, s.q_heads, s.head_dim});
  std::string trace;
  std::vector<double> step, plan_t, host_b, hbm_b, used, overlap, caller, cpu_t, gpu_t, cpu_start, cpu_mb, cpu_kernel;
  std::array<std::vector<double>, 7> phase;
  const PageLayout& l = attn.store().layout();
  const double block_bytes = 2.0 * l.head_block_elems() * dtype_bytes(l.dtype);
  const int total = o.warmup + o.iters;
  for (int it = 0; it < total; ++it) {
    const std::int64_t pos = context + it;
    for (SeqId seq : rows)
      for (int layer = 0; layer < layers; ++layer)
        attn.append(seq, layer, TensorView::contiguous(&w.keys[static_cast<std::size_t>(pos) * per_token], DType::kBFloat16, {1, s.kv_heads, s.head_dim}),
                    TensorView::contiguous(&w.values[static_cast<std::size_t>(pos) * per_token], DType::kBFloat16, {1, s.kv_heads, s.head_dim}));
    for (int b = 0; b < batch; ++b)
      std::copy(w.queries[it].begin(), w.queries[it].end(), q.begin() + static_cast<std::ptrdiff_t>(b) * s.q_heads * s.head_dim);
#if HATTN_WITH_CUDA
    if (gpu) {
      HATTN_CUDA_CHECK(cudaMemcpyAsync(dq, q.data(), qn * sizeof(float), cudaMemcpyHostToDevice, cs));
      HATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
    }
#endif
    const auto tp = Clock::now();
    const Plan plan = attn.plan(rows);
    const double p_us = us_since(tp);
    const auto t0 = Clock::now();
    for (int layer = 0; layer < layers; ++layer) attn.run(plan, layer, qv, ov, stream);
#if HATTN_WITH_CUDA
    if (gpu) HATTN_CUDA_CHECK(cudaStreamSynchronize(cs));
#endif
    const double us = us_since(t0) / layers;
    if (it < o.warmup) continue;
    step.push_back(us);
    plan_t.push_back(p_us);
    for (int layer = 0; layer < layers; ++layer) {
      const StepStats& st = attn.stats(layer);
      const double hbm = static_cast<double>(st.hbm_hits) * block_bytes;
      host_b.push_back(static_cast<double>(st.host_read_bytes));
      hbm_b.push_back(hbm);
      used.push_back(st.budget_used());
      caller.push_back(st.caller_us);
      cpu_t.push_back(st.cpu_us);
      gpu_t.push_back(st.gpu_us);
      // The CPU side's wait for its inputs after the GPU's selection, and its bytes: with cpu_us they
      // give the rate the CPU kernel reaches inside a step (against its benchmark's).
      cpu_start.push_back(st.cpu_blocks > 0 && st.gpu_selected_us > 0 ? st.cpu_begin_us - st.gpu_selected_us : 0);
      cpu_mb.push_back(static_cast<double>(st.cpu_blocks) * block_bytes / 1e6);
      cpu_kernel.push_back(st.cpu_kernel_us);
      const auto& ph = st.gpu_phases;
      const std::array<double, 7> ph_us{ph.score_us, ph.select_us, ph.cache_wait_us, ph.decode_us, ph.cpu_wait_us, ph.merge_us,
                                        ph.upload_us};
      for (std::size_t i = 0; i < ph_us.size(); ++i) phase[i].push_back(ph_us[i]);
      // The GPU computes from its first kernel to the end of its decode; after that its merge waits for
      // the CPU partials, which is not work.
      const double gpu_busy_end = st.gpu_decoded_us > 0 ? st.gpu_decoded_us : st.gpu_end_us;
      const bool both = st.cpu_end_us > st.cpu_begin_us && gpu_busy_end > st.gpu_begin_us;
      if (both) {
        const double lo = std::min(st.cpu_begin_us, st.gpu_begin_us), hi = std::max(st.cpu_end_us, st.gpu_end_us);
        const double common = std::max(0.0, std::min(st.cpu_end_us, gpu_busy_end) - std::max(st.cpu_begin_us, st.gpu_begin_us));
        overlap.push_back(hi > lo ? common / (hi - lo) : 0);
      } else {
        overlap.push_back(0);
      }
    }
    if (it == total - 1) {
      // One step's timeline, every time relative to the first layer's entry into run(): what the
      // caller's thread, the GPU (from CUDA events) and the CPU side did, layer by layer.
      const double origin = attn.stats(0).caller_begin_us;
      auto rel = [&](double t) { return eval::json_number(t > 0 ? t - origin : -1); };
      std::ostringstream tr;
      tr << "[";
      for (int layer = 0; layer < layers; ++layer) {
        const StepStats& st = attn.stats(layer);
        tr << (layer ? ",\n      " : "\n      ") << "{\"layer\": " << layer << ", \"caller_begin\": " << rel(st.caller_begin_us)
           << ", \"caller_end\": " << rel(st.caller_begin_us + st.caller_us) << ", \"gpu_begin\": " << rel(st.gpu_begin_us)
           << ", \"gpu_selected\": " << rel(st.gpu_selected_us) << ", \"gpu_decoded\": " << rel(st.gpu_decoded_us)
           << ", \"gpu_end\": " << rel(st.gpu_end_us) << ", \"cpu_begin\": " << rel(st.cpu_begin_us)
           << ", \"cpu_end\": " << rel(st.cpu_end_us) << ", \"cpu_blocks\": " << st.cpu_blocks
           << ", \"gpu_blocks\": " << st.gpu_blocks << "}";
      }
      tr << "\n    ]";
      trace = tr.str();
    }
    if ((it - o.warmup) % 10 == 9)
      std::fprintf(stderr, "\r[bench]   %s: step %d/%d, median so far %.1f us   ", name.c_str(), it - o.warmup + 1,
                   o.iters, median(step));
  }
  std::fprintf(stderr, "\n");
#if HATTN_WITH_CUDA
  if (gpu) {
    cudaFree(dq);
    cudaFree(dout);
    cudaStreamDestroy(cs);
  }
#endif
  for (SeqId seq : rows) attn.release(seq);
  Row r;
  r.system = name;
  r.context = context;
  r.batch = batch;
  r.layers = layers;
  r.step_us = median(step);
  r.plan_us = median(plan_t);
  r.host_bytes = median(host_b);
  r.hbm_bytes = median(hbm_b);
  r.floor_us = std::max(bw.host > 0 ? r.host_bytes / bw.host : 0.0, bw.hbm > 0 ? r.hbm_bytes / bw.hbm : 0.0);
  r.budget_used = median(used);
  const double kv_bytes = static_cast<double>(layers) * batch * static_cast<double>(context) * 2.0 * s.kv_heads * s.head_dim *
                          dtype_bytes(s.kv_dtype);
  r.hbm_share = static_cast<double>(attn.config().hbm_cache_bytes) / kv_bytes;
  r.overlap = median(overlap);
  r.caller_us = median(caller);
  r.trace = trace;
  r.cpu_us = median(cpu_t);
  r.gpu_us = median(gpu_t);
  if (o.phases)
    r.phases = detail::concat("upload ", median(phase[6]), " us, score ", median(phase[0]), " us, select ", median(phase[1]), " us, cache wait ",
                              median(phase[2]), " us, decode ", median(phase[3]), " us, CPU wait ", median(phase[4]),
                              " us, merge ", median(phase[5]), " us (GPU side ", r.gpu_us, " us, step ", r.step_us,
                              " us, caller ", r.caller_us, " us); CPU side: starts ", median(cpu_start),
                              " us after the selection, ", median(cpu_mb), " MB in ", r.cpu_us, " us (",
                              r.cpu_us > 0 ? median(cpu_mb) / r.cpu_us * 1e3 : 0.0, " GB/s; kernel ", median(cpu_kernel), " us)");
  return r;
}

Row run_system(const std::string& name, const Options& o, const Workload& w, std::int64_t context, int batch,
               const Bandwidths& bw, bool gpu) {
  const ModelShape& s = w.zoo->shape();
  auto cfg = [&](double budget, double share) { return make_config(o, s, context, batch, budget, share, gpu); };
  // The dense GPU baseline holds the whole layer (plus slack for the new tokens) in HBM.
  if (name == "fluxion") {
    FluxionAttention a(cfg(o.budget, o.hbm_share), {}, {}, Priority(o.cost));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "fluxion_2l") {  // the default with two-level scoring (Config::coarse_keep)
    Config c = cfg(o.budget, o.hbm_share);
    c.coarse_keep = o.coarse_keep;
    FluxionAttention a(c, {}, {}, Priority(o.cost));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "fluxion_gpu") {  // ablation: the Fluxion selection, everything on the GPU
    HybridAttention<OnlineHeadProfile, OutputAware, GpuOnly> a(cfg(o.budget, o.hbm_share));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "fixed5") {
    Fixed5HybridAttention a(cfg(o.budget, o.hbm_share), {}, FixedBudget(0.05));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "quest_gpu") {
    QuestGpuAttention a(cfg(o.budget, o.hbm_share), {}, FixedBudget(0.05));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "gpu_dense") {
    // The whole KV in the cache: 1.05 of it in slots beside the staging area's 1/10 (Config::admission).
    DenseGpuAttention a(cfg(1.0, 1.05 / 0.9), {}, FixedBudget(1.0));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  if (name == "cpu_dense") {
    DenseCpuAttention a(cfg(1.0, 0.0), {}, FixedBudget(1.0));
    return time_system(a, name, o, w, context, batch, bw, gpu);
  }
  throw InvalidArgument(detail::concat("hattn-bench: --systems has unknown system '", name,
                                       "' (fluxion, fluxion_2l, fluxion_gpu, fixed5, quest_gpu, gpu_dense, cpu_dense)"));
}

std::string key_of(std::int64_t context, int batch) { return detail::concat(context, "x", batch); }

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"hattn-bench: end-to-end decode step of one layer against the baselines"};
  app.add_option("--contexts", o.contexts, "tokens per request (default 32768 131072; --quick 32768)");
  app.add_option("--batches", o.batches, "requests per step (default 1 4 16; --quick 1 4)");
  app.add_option("--systems", o.systems, "fluxion fixed5 quest_gpu gpu_dense cpu_dense (default: these), fluxion_gpu (ablation), fluxion_2l "
                 "(two-level scoring)");
  app.add_option("--coarse_keep", o.coarse_keep, "fluxion_2l: groups kept as a multiple of the page budget (>= 1)");
  app.add_option("--warmup", o.warmup, "untimed steps first (HBM cache and predictor settle)");
  app.add_option("--iters", o.iters, "timed steps (median reported)");
  app.add_option("--repeats", o.repeats, "runs of each system, each a fresh object (the median run is reported)")
      ->check(CLI::Range(1, 100));
  app.add_option("--threads", o.threads, "CPU threads of the objects (0 = all)");
  app.add_option("--layers", o.layers, "layers per step, run back to back (fewer where their KV would pin over 8 GiB; 1 = sync per layer)");
  app.add_option("--zoo_layer", o.zoo_layer, "model layer of the Llama-3-8B zoo the layer's heads come from");
  app.add_option("--budget", o.budget, "average budget of the Fluxion default");
  app.add_option("--gpu_only_hit_rate", o.cost.gpu_only_hit_rate,
                 "fluxion's scheduler leaves every block to the GPU from this HBM hit rate on (Priority::CostModel; > 1: never)");
  app.add_option("--cpu_gbps", o.cost.cpu_bytes_per_us, "fluxion's scheduler: the CPU kernel's rate it plans with (GB/s)")
      ->transform([](const std::string& v) { return std::to_string(std::stod(v) * 1e3); });
  app.add_option("--cpu_fixed_us", o.cost.cpu_fixed_us, "fluxion's scheduler: the CPU side's fixed cost per layer (us)");
  app.add_option("--hbm_share", o.hbm_share, "HBM cache of the sparse systems as a share of the KV bytes of the step's layers");
  app.add_option("--torch_json", o.torch_json, "baselines from benchmarks/torch_baselines.py (gpu_sdpa_us, full_offload_us)");
  app.add_flag("--quick", o.quick, "32K only, batch 1 and 4, fewer steps");
  app.add_flag("--phases", o.phases, "time the GPU phases of every run() with CUDA events and print their medians");
  std::map<std::string, Admission> admissions;  // the names to_string(Admission) gives
  for (Admission a : {Admission::kStaged, Admission::kBeforeDecode, Admission::kBesideDecode}) admissions[to_string(a)] = a;
  app.add_option("--admission", o.admission, "how the HBM cache admits misses (Config::admission)")
      ->transform(CLI::CheckedTransformer(admissions));
  app.add_flag("--cpu", o.cpu, "CPU backend (no GPU figures; a smoke run)");
  app.add_option("--json", o.json, "e2e results file (GPU runs; '' = none)");
  app.add_option("--orchestrator_json", o.orchestrator_json, "orchestrator results file (GPU runs; '' = none)");
  app.add_option("--trace", o.trace, "timeline of the last timed step of each system at 128K x 1 (JSON; '' = none)");
  app.add_option("--commit", o.commit, "commit to record (default: env HATTN_COMMIT)");
  CLI11_PARSE(app, argc, argv);
  if (o.contexts.empty()) o.contexts = o.quick ? std::vector<std::int64_t>{32768} : std::vector<std::int64_t>{32768, 131072};
  if (o.batches.empty()) o.batches = o.quick ? std::vector<int>{1, 4} : std::vector<int>{1, 4, 16};
  if (o.quick) o.warmup = std::min(o.warmup, 5), o.iters = std::min(o.iters, 10);
  bool gpu = !o.cpu && HATTN_WITH_CUDA;
#if HATTN_WITH_CUDA
  int devices = 0;
  if (gpu && (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)) {
    std::fprintf(stderr, "[bench] no CUDA device: CPU backend only, no GPU figures\n");
    gpu = false;
  }
#endif
  if (o.systems.empty())
    o.systems = gpu ? std::vector<std::string>{"gpu_dense", "fluxion", "fixed5", "quest_gpu", "cpu_dense"}
                    : std::vector<std::string>{"fluxion", "fixed5", "cpu_dense"};

  try {
    Bandwidths bw;
    bw.host = measure_host_read_bytes_per_us(o.threads);
    std::string device = eval::cpu_model_name();
#if HATTN_WITH_CUDA
    cudaStream_t bw_stream = nullptr;
    if (gpu) {
      HATTN_CUDA_CHECK(cudaStreamCreate(&bw_stream));
      measure_device_bandwidths(bw, bw_stream);
      cudaDeviceProp prop{};
      HATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
      device = std::string(prop.name) + " + " + device;
    }
#endif
    std::fprintf(stderr, "[bench] %s: host read %.1f GB/s, HBM %.0f GB/s, H2D bulk %.1f GB/s\n", device.c_str(),
                 bw.host / 1e3, bw.hbm / 1e3, bw.h2d / 1e3);
    std::string torch;
    if (!o.torch_json.empty()) {
      std::ifstream f(o.torch_json);
      if (!f) throw Error(detail::concat("hattn-bench: cannot read --torch_json ", o.torch_json));
      torch.assign(std::istreambuf_iterator<char>(f), {});
    }

    std::vector<Row> rows;
    for (std::int64_t context : o.contexts) {
      const auto t0 = Clock::now();
      const Workload w = make_workload(o, context, o.warmup + o.iters);
      std::fprintf(stderr, "[bench] context %lld: zoo layer %d generated in %.1f s\n", static_cast<long long>(context),
                   o.zoo_layer, us_since(t0) / 1e6);
      const ModelShape& s = w.zoo->shape();
      for (int batch : o.batches) {
        std::map<std::string, double> at;
        for (const std::string& sys : o.systems) {
          std::fprintf(stderr, "[bench] %lldx%d %s ...\n", static_cast<long long>(context), batch, sys.c_str());
          // A baseline whose feedback settles differently from run to run (HybridGen's share) gives a
          // different median each time: every run is a fresh object, and the median run is reported.
          std::vector<Row> runs;
          for (int k = 0; k < o.repeats; ++k) runs.push_back(run_system(sys, o, w, context, batch, bw, gpu));
          std::sort(runs.begin(), runs.end(), [](const Row& a, const Row& b) { return a.step_us < b.step_us; });
          Row r = runs[runs.size() / 2];
          for (const Row& run : runs) r.step_us_runs.push_back(run.step_us);
          if (runs.size() > 1) std::fprintf(stderr, "[bench] %s: %s\n", sys.c_str(), runs_text(r).c_str());
          rows.push_back(std::move(r));
          at[sys] = rows.back().step_us;
        }
        const double kv_bytes = static_cast<double>(batch) * context * 2.0 * s.kv_heads * s.head_dim * dtype_bytes(s.kv_dtype);
#if HATTN_WITH_CUDA
        if (gpu && at.count("gpu_dense")) {
          Row r;
          r.system = "full_offload";
          r.context = context;
          r.batch = batch;
          const double copy = measure_bulk_copy_us(static_cast<std::size_t>(kv_bytes), bw_stream);
          r.step_us = copy + at["gpu_dense"];
          r.host_bytes = kv_bytes;
          r.floor_us = kv_bytes / bw.h2d;
          r.budget_used = 1;
          r.note = detail::concat("one bulk cudaMemcpyAsync of the layer's K and V (", copy, " us) + our dense kernel");
          rows.push_back(r);
        }
#endif
        for (const char* section : {"gpu_sdpa_us", "full_offload_us"}) {
          const double v = torch.empty() ? -1 : torch_value(torch, section, key_of(context, batch));
          if (v <= 0) continue;
          Row r;
          r.system = std::string("torch_") + (section[0] == 'g' ? "sdpa" : "full_offload");
          r.context = context;
          r.batch = batch;
          r.step_us = v;
          r.budget_used = 1;
          r.note = "from --torch_json (benchmarks/torch_baselines.py, same device)";
          rows.push_back(r);
        }
      }
    }

    std::ostringstream table;
    table << "| context x batch | system | layers | us per layer | tokens/s (32 layers) | floor us | budget used | "
             "HBM share | overlap | caller us |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for (const Row& r : rows) {
      const double tps = r.step_us > 0 ? r.batch * 1e6 / (r.step_us * 32) : 0;
      char line[512];
      std::snprintf(line, sizeof line, "| %s | %s | %d | %.1f | %.0f | %.1f | %.4f | %.3f | %.2f | %.1f |\n",
                    key_of(r.context, r.batch).c_str(), r.system.c_str(), r.layers, r.step_us, tps, r.floor_us, r.budget_used,
                    r.hbm_share, r.overlap, r.caller_us);
      table << line;
    }
    std::cout << table.str();
    for (const Row& r : rows)
      if (!r.phases.empty())
        std::cout << "phases " << key_of(r.context, r.batch) << " " << r.system << ": " << r.phases << "\n";

    if (!gpu) {
      std::fprintf(stderr, "[bench] CPU backend: no GPU figures written\n");
      return 0;
    }
    auto find = [&](const std::string& sys, std::int64_t ctx, int b) -> const Row* {
      for (const Row& r : rows)
        if (r.system == sys && r.context == ctx && r.batch == b) return &r;
      return nullptr;
    };
    const Row* flux = find("fluxion", 131072, 1);
    const Row* fixed = find("fixed5", 131072, 1);
    const Row* dense = find("gpu_dense", 131072, 1);
    const Row* offload_torch = find("torch_full_offload", 131072, 1);
    const Row* offload_ours = find("full_offload", 131072, 1);
    const Row* offload = offload_torch ? offload_torch : offload_ours;
    const Row* sdpa = find("torch_sdpa", 131072, 1);
    const std::string setting = detail::concat(
        "one Llama-3-8B-shaped layer (32 q heads, 8 KV heads, dim 128, bf16) from zoo layer ", o.zoo_layer,
        ", 128K tokens, batch 1, page 16; median of ", o.iters, " steps after ", o.warmup, " warm-up steps; a step runs ",
        flux ? flux->layers : o.layers,
        " such layers back to back on one stream and synchronises once, time per layer = step / layers; host read ", static_cast<int>(bw.host / 1e3), " GB/s, HBM ",
        static_cast<int>(bw.hbm / 1e3), " GB/s measured in the same process");
    std::vector<eval::Figure> figures;
    if (flux && fixed)
      figures.push_back({"speedup_vs_fixed5_128k_b1", fixed->step_us / flux->step_us, "x",
                         detail::concat("FixedBudget(0.05)+HybridGenFeedback step ", runs_text(*fixed), " / Fluxion default step ",
                                        runs_text(*flux), " (avg_budget ", o.budget, ", HBM cache ", o.hbm_share,
                                        " of the KV); ", setting)});
    if (flux && offload)
      figures.push_back({"speedup_vs_full_offload_128k_b1", offload->step_us / flux->step_us, "x",
                         detail::concat(offload == offload_torch ? "PyTorch full offload (copy + SDPA) " : "full offload (bulk copy + our dense kernel) ",
                                        offload->step_us, " us / Fluxion step ", flux->step_us, " us; ", setting)});
    // The bar is against the fastest GPU-resident dense attention measured in the same run: PyTorch's
    // SDPA when the baselines file is given, else our own kernel over the whole layer in HBM.
    const Row* best_dense = sdpa && (!dense || sdpa->step_us < dense->step_us) ? sdpa : dense;
    if (flux && best_dense)
      figures.push_back({"time_vs_gpu_dense_128k_b1", flux->step_us / best_dense->step_us, "ratio",
                         detail::concat("Fluxion step ", flux->step_us, " us / the fastest GPU-resident dense attention (",
                                        best_dense == sdpa ? "PyTorch SDPA" : "our pipeline at 100% budget, whole layer in HBM",
                                        ") ", best_dense->step_us, " us; our pipeline at 100%: ",
                                        dense ? detail::concat(dense->step_us, " us") : std::string("not run"),
                                        sdpa ? detail::concat("; PyTorch SDPA ", sdpa->step_us, " us") : std::string(),
                                        "; ", setting)});
    if (flux)
      figures.push_back({"hbm_share_of_kv_128k_b1", flux->hbm_share, "share",
                         detail::concat("Fluxion's HBM page cache bytes / the K+V bytes of the step's layers at 128K batch 1 ",
                                        "(summaries not counted); ", setting)});
    std::ostringstream raw;
    raw << "[";
    for (std::size_t i = 0; i < rows.size(); ++i) {
      const Row& r = rows[i];
      raw << (i ? ",\n    " : "\n    ") << "{\"system\": " << eval::json_string(r.system) << ", \"context\": " << r.context
          << ", \"batch\": " << r.batch << ", \"layers\": " << r.layers << ", \"step_us\": " << eval::json_number(r.step_us)
          << ", \"tokens_per_s_32_layers\": " << eval::json_number(r.step_us > 0 ? r.batch * 1e6 / (r.step_us * 32) : 0)
          << ", \"plan_us\": " << eval::json_number(r.plan_us) << ", \"floor_us\": " << eval::json_number(r.floor_us)
          << ", \"host_bytes\": " << eval::json_number(r.host_bytes) << ", \"hbm_bytes\": " << eval::json_number(r.hbm_bytes)
          << ", \"budget_used\": " << eval::json_number(r.budget_used) << ", \"hbm_share\": " << eval::json_number(r.hbm_share)
          << ", \"overlap\": " << eval::json_number(r.overlap) << ", \"caller_us\": " << eval::json_number(r.caller_us)
          << ", \"cpu_us\": " << eval::json_number(r.cpu_us) << ", \"gpu_us\": " << eval::json_number(r.gpu_us)
          << ", \"note\": " << eval::json_string(r.note);
      if (r.step_us_runs.size() > 1) {
        raw << ", \"step_us_runs\": [";
        for (std::size_t k = 0; k < r.step_us_runs.size(); ++k) raw << (k ? ", " : "") << eval::json_number(r.step_us_runs[k]);
        raw << "]";
      }
      raw << "}";
    }
    raw << "\n  ]";
    const std::string bws = detail::concat("{\"host_read_gb_s\": ", eval::json_number(bw.host / 1e3), ", \"hbm_gb_s\": ",
                                           eval::json_number(bw.hbm / 1e3), ", \"h2d_bulk_gb_s\": ", eval::json_number(bw.h2d / 1e3), "}");
    const std::string commit = eval::commit_or_env(o.commit);
    if (!o.json.empty())
      eval::write_results(o.json, device, commit, figures, {{"bandwidths", bws}, {"rows", raw.str()}});
    if (!o.orchestrator_json.empty() && flux) {
      std::vector<eval::Figure> orch = {
          {"overlap_fraction_128k_b1", flux->overlap, "share of the step",
           detail::concat("Fluxion default: median over steps of (time both the CPU side and the GPU side computed) / ",
                          "(first begin to last end), from StepStats cpu_begin_us/cpu_end_us and gpu_begin_us/gpu_decoded_us/gpu_end_us ",
                          "(one host clock; GPU times from CUDA events; the GPU counts as computing from its first ",
                          "kernel to the end of its decode, not while its merge waits for the CPU); CPU side median ", flux->cpu_us, " us, GPU side ",
                          flux->gpu_us, " us; ", setting)},
          {"caller_thread_blocked_us", flux->caller_us, "us",
           detail::concat("Fluxion default: median StepStats::caller_us, time the calling thread spent inside run() ",
                          "(the step took ", flux->step_us, " us per layer); ", setting)}};
      eval::write_results(o.orchestrator_json, device, commit, orch, {{"rows", raw.str()}});
    }
    if (!o.trace.empty()) {
      std::ostringstream steps;
      steps << "{";
      bool first = true;
      for (const Row& r : rows) {
        if (r.context != 131072 || r.batch != 1 || r.trace.empty()) continue;
        steps << (first ? "\n    " : ",\n    ") << eval::json_string(r.system) << ": " << r.trace;
        first = false;
      }
      steps << "\n  }";
      const std::vector<eval::Figure> none;
      eval::write_results(o.trace, device, commit, none,
                          {{"what", eval::json_string(detail::concat(
                                        "the last timed step of each system at 128K x 1: per layer, when the caller's thread ",
                                        "entered and left run(), the GPU side's first kernel, end of selection, end of decode ",
                                        "and end of merge (CUDA events mapped onto the host clock), and the CPU side's begin ",
                                        "and end; microseconds from the first layer's entry into run(), -1 where a side had ",
                                        "no work; ", setting))},
                           {"steps", steps.str()}});
    }
#if HATTN_WITH_CUDA
    if (bw_stream) cudaStreamDestroy(bw_stream);
#endif
  } catch (const std::exception& e) {
    std::cerr << "hattn-bench: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
