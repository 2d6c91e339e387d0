// CPU sparse decode attention: kernel GB/s over the bytes of the selected K and V, against a DRAM
// read ceiling measured in the same process (a streaming-read reduction, widest vectors available,
// over a buffer far larger than the last-level cache), for 1 thread and all threads.
//
// Shape: one Llama-3-8B layer (8 KV heads, GQA group 4, head dim 128, page size 16), batch 1;
// contexts 32K and 128K tokens; budgets 5% and 100% of the pages (per KV head: the sink page, the
// last pages, and random pages in between); KV in bf16 and fp32. Before every timed iteration the
// caches are flushed by reading a buffer of 4x the LLC with every thread, so the selected KV comes
// from DRAM, as it does in a real decode step (32 layers of KV do not stay in cache).
//
// Besides Google Benchmark's own output (--benchmark_format=json works), --result_json PATH writes
// the figures of issue 4 (docs/results/cpu_kernel.json format); --torch_json PATH reads PyTorch's CPU
// SDPA time on the same shape ("cpu_sdpa_us": {"131072x1": us}) from benchmarks/torch_baselines.py.
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cpu_dram_read.hpp"
#include "hattn/core/thread_pool.hpp"
#include "hattn/kernels/cpu_decode.hpp"
#include "hattn/kv/host_kv_pool.hpp"

namespace {

using namespace hattn;

constexpr int kKvHeads = 8;
constexpr int kGroup = 4;
constexpr int kHeadDim = 128;
constexpr int kPageSize = 16;

struct Options {
  std::size_t dram_bytes = std::size_t{2} << 30;  // read ceiling buffer; also the flush source
  std::optional<CpuIsa> isa;
  std::string result_json;
  std::string torch_json;
  std::string commit;
  bool quick = false;  // 32K only, smaller buffers: for a check on a small machine
};
Options g_opt;

// Per benchmark name: the time of every timed iteration, seconds; figures use the median.
std::map<std::string, std::vector<double>> g_times;
std::map<std::string, double> g_bytes;  // bytes per iteration
std::map<std::string, std::string> g_notes;

double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

ThreadPool& pool_of(int threads) {
  static ThreadPool one(1);
  static ThreadPool all(0);
  return threads == 1 ? one : all;
}

// The buffer of the read ceiling; also read to flush caches before a timed kernel iteration.
struct DramBuffer {
  float* data = nullptr;
  std::size_t floats = 0;
  DramBuffer() {
    floats = g_opt.dram_bytes / sizeof(float) / 1024 * 1024;
    // The same memory the KV pool gets (HostKVPool offers its arena to transparent huge pages), so
    // the ceiling is not lowered by TLB misses the kernel does not pay.
    constexpr std::size_t kHuge = std::size_t{2} << 20;
    const std::size_t bytes = (floats * sizeof(float) + kHuge - 1) / kHuge * kHuge;
    data = static_cast<float*>(std::aligned_alloc(kHuge, bytes));
    if (data == nullptr) throw std::bad_alloc();
    (void)madvise(data, bytes, MADV_HUGEPAGE);  // advice: without THP nothing changes
    // Touch every page with all threads so the buffer is spread like the KV pool.
    ThreadPool& pool = pool_of(0);
    const std::size_t parts = static_cast<std::size_t>(pool.size());
    pool.parallel_for(static_cast<std::int64_t>(parts), [this, parts](std::int64_t t, int) {
      const std::size_t b = floats * t / parts, e = floats * (t + 1) / parts;
      for (std::size_t i = b; i < e; ++i) data[i] = 1.0f / static_cast<float>(1 + (i & 1023));
    });
  }
  ~DramBuffer() { std::free(data); }
};
DramBuffer& dram() {
  static DramBuffer b;
  return b;
}

// Reads `floats` floats of the buffer with every worker of `pool`; returns the sum (kept alive).
double parallel_read(ThreadPool& pool, bench::ReadSum read, const float* data, std::size_t floats) {
  const std::size_t parts = static_cast<std::size_t>(pool.size());
  std::vector<double> sums(parts * 8, 0.0);  // 64 bytes apart: no false sharing
  pool.parallel_for(static_cast<std::int64_t>(parts), [&](std::int64_t t, int) {
    const std::size_t b = floats * t / parts / 1024 * 1024, e = floats * (t + 1) / parts / 1024 * 1024;
    sums[static_cast<std::size_t>(t) * 8] = read(data + b, e - b);
  });
  double s = 0;
  for (std::size_t i = 0; i < parts; ++i) s += sums[i * 8];
  return s;
}

std::size_t llc_bytes() {
  std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index3/size");
  std::string s;
  if (f >> s && !s.empty()) {
    std::size_t v = std::strtoull(s.c_str(), nullptr, 10);
    if (s.back() == 'K') v <<= 10;
    if (s.back() == 'M') v <<= 20;
    if (v > 0) return v;
  }
  return std::size_t{64} << 20;
}

void flush_caches() {
  const char* name = nullptr;
  static const bench::ReadSum read = bench::best_read_sum(&name);
  const std::size_t bytes = std::min(dram().floats * sizeof(float), std::max<std::size_t>(4 * llc_bytes(), 64 << 20));
  benchmark::DoNotOptimize(parallel_read(pool_of(0), read, dram().data, bytes / sizeof(float)));
}

void record(const std::string& name, double seconds) { g_times[name].push_back(seconds); }

// Args: threads (1 or 0 = all).
void BM_DramRead(benchmark::State& state) {
  const int threads = static_cast<int>(state.range(0));
  ThreadPool& pool = pool_of(threads);
  const char* isa = nullptr;
  const bench::ReadSum read = bench::best_read_sum(&isa);
  DramBuffer& buf = dram();
  const std::string name = std::string("dram_read/") + (threads == 1 ? "1" : "all");
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(parallel_read(pool, read, buf.data, buf.floats));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(s);
    record(name, s);
  }
  const double bytes = static_cast<double>(buf.floats) * sizeof(float);
  g_bytes[name] = bytes;
  g_notes[name] = std::string(isa) + " streaming-read reduction over " +
                  std::to_string(static_cast<long long>(bytes / (1 << 20))) + " MiB, " + std::to_string(pool.size()) +
                  " threads";
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.SetLabel(g_notes[name]);
}

// HATTN_BENCH_POOL=pinned: the pool as the GPU backend allocates it (registered with CUDA where a
// device is present), to compare the CPU kernel on it with plain aligned memory.
HostMemoryRequest pool_request() {
  const char* v = std::getenv("HATTN_BENCH_POOL");
  return v != nullptr && std::string(v) == "pinned" ? HostMemoryRequest::kAuto : HostMemoryRequest::kAligned;
}

// One layer of KV for a context, filled with values of a realistic range, and per-head page lists.
struct Layer {
  std::unique_ptr<HostKVPool> pool;
  int n_pages = 0;
  Layer(DType dtype, int context) {
    const PageLayout layout{kPageSize, kKvHeads, kHeadDim, dtype};
    n_pages = context / kPageSize;
    pool = std::make_unique<HostKVPool>(layout, static_cast<std::size_t>(n_pages) * (layout.page_bytes() + layout.summary_bytes()),
                                        pool_request());
    const auto ids = pool->allocate(n_pages);
    ThreadPool& tp = pool_of(0);
    tp.parallel_for(n_pages, [&](std::int64_t p, int) {
      std::byte* page = pool->page(ids[static_cast<std::size_t>(p)]);
      std::uint32_t x = static_cast<std::uint32_t>(p) * 2654435761u + 1;
      for (std::size_t i = 0; i < layout.page_elems(); ++i) {
        x = x * 1664525u + 1013904223u;
        store_from_float(page, i, dtype, static_cast<float>(static_cast<std::int32_t>(x >> 8) - (1 << 23)) / (1 << 23));
      }
    });
  }
};

Layer& layer_of(DType dtype, int context) {
  static std::map<std::pair<int, int>, std::unique_ptr<Layer>> layers;
  auto& l = layers[{static_cast<int>(dtype), context}];
  if (!l) l = std::make_unique<Layer>(dtype, context);
  return *l;
}

// Per KV head: budget% of the pages, always the first (sink) page and the last 4 (local window),
// the rest uniformly at random; ascending, as a selector hands them over.
std::vector<std::vector<PageId>> select_pages(int n_pages, int budget_pct) {
  std::vector<std::vector<PageId>> lists(kKvHeads);
  std::mt19937 rng(42);
  for (int h = 0; h < kKvHeads; ++h) {
    const int k = std::max(1, static_cast<int>(std::ceil(n_pages * budget_pct / 100.0)));
    std::vector<PageId>& l = lists[static_cast<std::size_t>(h)];
    if (k >= n_pages) {
      for (int p = 0; p < n_pages; ++p) l.push_back(p);
      continue;
    }
    std::vector<std::uint8_t> taken(static_cast<std::size_t>(n_pages), 0);
    int count = 0;
    auto take = [&](int p) {
      if (!taken[p]) {
        taken[p] = 1;
        ++count;
      }
    };
    take(0);
    for (int p = std::max(0, n_pages - 4); p < n_pages && count < k; ++p) take(p);
    std::uniform_int_distribution<int> any(0, n_pages - 1);
    while (count < k) take(any(rng));
    for (int p = 0; p < n_pages; ++p)
      if (taken[p]) l.push_back(p);
  }
  return lists;
}

std::string kernel_name(DType dtype, int context, int budget, int threads, bool cold = true) {
  return std::string(cold ? "decode/" : "decode_hot/") + std::string(to_string(dtype)) + "/" + std::to_string(context / 1024) + "k/" +
         std::to_string(budget) + "pct/" + (threads == 1 ? "1" : "all");
}

// Args: dtype (0 bf16, 2 fp32), context tokens, budget percent, threads (1 or 0 = all), cold (1: caches
// flushed before each run, as in a decode step; 0: the selection stays in cache between runs, which
// times the arithmetic alone when it fits).
void BM_CpuDecode(benchmark::State& state) {
  const DType dtype = state.range(0) == 0 ? DType::kBFloat16 : DType::kFloat32;
  const int context = static_cast<int>(state.range(1));
  const int budget = static_cast<int>(state.range(2));
  const int threads = static_cast<int>(state.range(3));
  const bool cold = state.range(4) != 0;
  Layer& layer = layer_of(dtype, context);
  ThreadPool& pool = pool_of(threads);
  const auto lists = select_pages(layer.n_pages, budget);

  std::vector<float> q(static_cast<std::size_t>(kKvHeads) * kGroup * kHeadDim);
  std::mt19937 rng(7);
  std::normal_distribution<float> n(0, 1);
  for (float& x : q) x = n(rng);
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(kKvHeads) * kGroup);
  std::vector<float> ref_out(out.size()), ref_lse(lse.size());
  std::vector<CpuDecodeItem> items, ref_items;
  double bytes = 0;
  for (int h = 0; h < kKvHeads; ++h) {
    CpuDecodeItem it;
    it.q = q.data() + static_cast<std::size_t>(h) * kGroup * kHeadDim;
    it.pages = lists[static_cast<std::size_t>(h)].data();
    it.n_pages = static_cast<std::int32_t>(lists[static_cast<std::size_t>(h)].size());
    it.last_page_tokens = kPageSize;
    it.kv_head = h;
    it.out = out.data() + static_cast<std::size_t>(h) * kGroup * kHeadDim;
    it.lse = lse.data() + static_cast<std::size_t>(h) * kGroup;
    items.push_back(it);
    it.out = ref_out.data() + static_cast<std::size_t>(h) * kGroup * kHeadDim;
    it.lse = ref_lse.data() + static_cast<std::size_t>(h) * kGroup;
    ref_items.push_back(it);
    bytes += 2.0 * it.n_pages * kPageSize * kHeadDim * static_cast<double>(dtype_bytes(dtype));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  // Self-check on the device: the measured path against the generic one on the same inputs, so a
  // wrong fast path cannot report a good figure unnoticed. A path that fails is reported and the
  // next one down is measured instead (the AVX-512 paths cannot be tested on the dev machines).
  CpuDecoder(pool_of(0), CpuIsa::kGeneric).run(*layer.pool, kGroup, scale, ref_items);
  std::string failed;
  std::unique_ptr<CpuDecoder> chosen;
  double diff = 0;
  const int first = static_cast<int>(g_opt.isa.value_or(detect_cpu_isa()));
  for (int i = first; i >= 0 && !chosen; --i) {
    const CpuIsa isa = static_cast<CpuIsa>(i);
    if (!cpu_supports(isa)) continue;
    auto d = std::make_unique<CpuDecoder>(pool, isa);
    d->run(*layer.pool, kGroup, scale, items);  // also the warm-up: scratch sized, workers awake
    diff = 0;
    for (std::size_t j = 0; j < out.size(); ++j) diff = std::max(diff, static_cast<double>(std::abs(out[j] - ref_out[j])));
    for (std::size_t j = 0; j < lse.size(); ++j) diff = std::max(diff, static_cast<double>(std::abs(lse[j] - ref_lse[j])));
    if (diff <= 1e-3) chosen = std::move(d);
    else failed += std::string(to_string(isa)) + " path FAILED the self-check (max |difference| " + std::to_string(diff) + "); ";
  }
  if (!failed.empty()) std::fprintf(stderr, "WARNING: %s\n", failed.c_str());
  CpuDecoder& decoder = *chosen;  // the generic path always passes against itself
  const std::string name = kernel_name(dtype, context, budget, threads, cold);
  for (auto _ : state) {
    if (cold) flush_caches();
    const auto t0 = std::chrono::steady_clock::now();
    decoder.run(*layer.pool, kGroup, scale, items);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(out.data());
    state.SetIterationTime(s);
    record(name, s);
  }
  g_bytes[name] = bytes;
  g_notes[name] = failed + std::string(to_string(decoder.isa())) + " path, " + std::to_string(pool.size()) +
                  " threads, max |difference| from the generic path " + std::to_string(diff);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes) * state.iterations());
  state.counters["selected_MB"] = bytes / 1e6;
  state.SetLabel(g_notes[name]);
}

void register_benchmarks() {
  for (int threads : {1, 0})
    benchmark::RegisterBenchmark("BM_DramRead", BM_DramRead)->Arg(threads)->UseManualTime()->Unit(benchmark::kMillisecond);
  const std::vector<int> contexts = g_opt.quick ? std::vector<int>{32768} : std::vector<int>{32768, 131072};
  for (int dtype : {0, 2})
    for (int context : contexts)
      for (int budget : {5, 100})
        for (int threads : {1, 0})
          benchmark::RegisterBenchmark("BM_CpuDecode", BM_CpuDecode)
              ->Args({dtype, context, budget, threads, 1})
              ->ArgNames({"dtype", "context", "budget_pct", "threads", "cold"})
              ->UseManualTime()
              ->Unit(benchmark::kMicrosecond);
  // The arithmetic alone: 1 thread over 1% of 32K tokens (1.3 MB of bf16 K and V), kept in L2.
  for (int dtype : {0, 2})
    benchmark::RegisterBenchmark("BM_CpuDecode", BM_CpuDecode)
        ->Args({dtype, 32768, 1, 1, 0})
        ->ArgNames({"dtype", "context", "budget_pct", "threads", "cold"})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  // A CPU share of a hybrid step (~1.3 MB), cold, every thread: the job's fixed costs show here.
  benchmark::RegisterBenchmark("BM_CpuDecode", BM_CpuDecode)
      ->Args({0, 32768, 1, 0, 1})
      ->ArgNames({"dtype", "context", "budget_pct", "threads", "cold"})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
}

// --- docs/results/cpu_kernel.json -----------------------------------------------------------------

std::string json_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    if (static_cast<unsigned char>(c) < 0x20) continue;
    o += c;
  }
  return o;
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  return "unknown CPU";
}

// The number after "cpu_sdpa_us" ... "131072x1": in the torch baselines file, or nullopt with why.
std::optional<double> torch_sdpa_us(std::string& why) {
  if (g_opt.torch_json.empty()) {
    why = "no --torch_json given";
    return std::nullopt;
  }
  std::ifstream f(g_opt.torch_json);
  if (!f) {
    why = "torch baselines file " + g_opt.torch_json + " not found (benchmarks/torch_baselines.py did not run or failed)";
    return std::nullopt;
  }
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string s = ss.str();
  const std::size_t sec = s.find("\"cpu_sdpa_us\"");
  const std::size_t key = sec == std::string::npos ? sec : s.find("\"131072x1\"", sec);
  if (key == std::string::npos) {
    why = "no cpu_sdpa_us[\"131072x1\"] in " + g_opt.torch_json;
    return std::nullopt;
  }
  const std::size_t colon = s.find(':', key);
  char* end = nullptr;
  const double v = std::strtod(s.c_str() + colon + 1, &end);
  if (end == s.c_str() + colon + 1 || !(v > 0)) {
    why = "cpu_sdpa_us[\"131072x1\"] in " + g_opt.torch_json + " is not a positive number";
    return std::nullopt;
  }
  return v;
}

struct Figure {
  std::string name;
  std::optional<double> value;
  std::string unit, how;
};

double gbps(const std::string& name) { return g_bytes[name] / median(g_times[name]) / 1e9; }
bool measured(const std::string& name) { return g_times.count(name) && !g_times[name].empty(); }

std::string fmt(double v, int prec = 3) {
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", prec, v);
  return b;
}

void write_results() {
  std::vector<Figure> figs;
  const std::string dense = kernel_name(DType::kBFloat16, 131072, 100, 0);
  const std::string sparse = kernel_name(DType::kBFloat16, 131072, 5, 0);
  const std::string dram_all = "dram_read/all", dram_one = "dram_read/1";
  const std::string shape = "1 request x 8 KV heads x GQA group 4 x head dim 128, page 16, 131072 tokens";
  auto missing = [](const std::string& n) { return "not measured in this run (" + n + " was filtered out or skipped)"; };

  if (measured(dense) && measured(dram_all))
    figs.push_back({"cpu_bf16_128k_dense_vs_dram", gbps(dense) / gbps(dram_all), "ratio",
                    "bf16 CpuDecoder at 100% budget (" + shape + "; " + g_notes[dense] + "): " + fmt(gbps(dense), 1) +
                        " GB/s of K+V bytes (" + fmt(g_bytes[dense] / 1e6, 0) + " MB, median of " +
                        std::to_string(g_times[dense].size()) + " cold-cache runs) divided by the DRAM read ceiling " +
                        fmt(gbps(dram_all), 1) + " GB/s measured in the same process (" + g_notes[dram_all] + ")"});
  else
    figs.push_back({"cpu_bf16_128k_dense_vs_dram", std::nullopt, "ratio", missing(dense + " or " + dram_all)});

  if (measured(sparse))
    figs.push_back({"cpu_bf16_128k_5pct_ms", median(g_times[sparse]) * 1e3, "ms",
                    "bf16 CpuDecoder at 5% budget (" + shape + "; " + fmt(g_bytes[sparse] / 1e6, 1) +
                        " MB of selected K+V: the sink page, the last 4 pages and random pages per KV head; " +
                        g_notes[sparse] + "): median wall time of run() over " + std::to_string(g_times[sparse].size()) +
                        " runs, caches flushed before each (" + fmt(gbps(sparse), 1) + " GB/s)"});
  else
    figs.push_back({"cpu_bf16_128k_5pct_ms", std::nullopt, "ms", missing(sparse)});

  std::string why;
  const auto torch = torch_sdpa_us(why);
  if (measured(dense) && torch)
    figs.push_back({"cpu_vs_torch_sdpa_128k", median(g_times[dense]) * 1e6 / *torch, "ratio",
                    "CpuDecoder bf16 at 100% budget, " + fmt(median(g_times[dense]) * 1e6, 0) +
                        " us, divided by PyTorch CPU scaled_dot_product_attention on the same shape (batch 1, 32 q "
                        "heads, 8 KV heads, dim 128, bf16, 131072 tokens), " + fmt(*torch, 0) + " us from " +
                        g_opt.torch_json + " (same device run)"});
  else
    figs.push_back({"cpu_vs_torch_sdpa_128k", std::nullopt, "ratio",
                    measured(dense) ? "PyTorch baseline unavailable: " + why : missing(dense)});

  // The ceilings and the other points of the sweep, so the ratios above can be checked.
  if (measured(dram_all))
    figs.push_back({"cpu_dram_read_gbps", gbps(dram_all), "GB/s", "DRAM read ceiling: " + g_notes[dram_all]});
  if (measured(dram_one))
    figs.push_back({"cpu_dram_read_1t_gbps", gbps(dram_one), "GB/s", "DRAM read ceiling: " + g_notes[dram_one]});
  for (const auto& [name, times] : g_times) {
    const bool hot = name.rfind("decode_hot/", 0) == 0;
    if (!hot && name.rfind("decode/", 0) != 0) continue;
    std::string key = hot ? "cpu_hot_" + name.substr(11) : "cpu_" + name.substr(7);
    std::replace(key.begin(), key.end(), '/', '_');
    figs.push_back({key + "_gbps", gbps(name), "GB/s",
                    fmt(g_bytes[name] / 1e6, 1) + " MB selected K+V, median " + fmt(median(times) * 1e6, 1) + " us over " +
                        std::to_string(times.size()) + (hot ? " warm-cache runs; " : " cold-cache runs; ") + g_notes[name]});
  }

  char date[16];
  const std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
  std::string commit = g_opt.commit;
  if (commit.empty()) commit = std::getenv("HATTN_COMMIT") ? std::getenv("HATTN_COMMIT") : "unknown";
  std::ostringstream o;
  o << "{\n  \"device\": \"" << json_escape(cpu_model() + ", " + std::to_string(std::thread::hardware_concurrency()) +
                                            " hardware threads, LLC " + std::to_string(llc_bytes() >> 20) + " MiB")
    << "\",\n  \"date\": \"" << date << "\",\n  \"commit\": \"" << json_escape(commit) << "\",\n  \"figures\": {\n";
  for (std::size_t i = 0; i < figs.size(); ++i) {
    const Figure& f = figs[i];
    o << "    \"" << f.name << "\": {\"value\": ";
    if (f.value && std::isfinite(*f.value)) o << fmt(*f.value, 4);
    else o << "null";
    o << ", \"unit\": \"" << f.unit << "\", \"how\": \"" << json_escape(f.how) << "\"}" << (i + 1 < figs.size() ? "," : "")
      << "\n";
  }
  o << "  }\n}\n";
  std::ofstream out(g_opt.result_json);
  out << o.str();
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", g_opt.result_json.c_str());
    std::exit(1);
  }
  std::fprintf(stderr, "wrote %s\n", g_opt.result_json.c_str());
}

bool parse_isa(const std::string& s, CpuIsa& isa) {
  for (CpuIsa i : {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16})
    if (s == to_string(i)) {
      isa = i;
      return true;
    }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  // Our flags first; the rest go to Google Benchmark.
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      const std::string f = std::string(flag) + "=";
      return a.rfind(f, 0) == 0 ? argv[i] + f.size() : nullptr;
    };
    if (const char* v = value("--result_json")) g_opt.result_json = v;
    else if (const char* v = value("--torch_json")) g_opt.torch_json = v;
    else if (const char* v = value("--commit")) g_opt.commit = v;
    else if (const char* v = value("--dram_mib")) g_opt.dram_bytes = std::strtoull(v, nullptr, 10) << 20;
    else if (const char* v = value("--isa")) {
      CpuIsa isa;
      if (!parse_isa(v, isa) || !cpu_supports(isa)) {
        std::fprintf(stderr, "--isa=%s: not a path this CPU runs (generic, avx2, avx512, avx512bf16)\n", v);
        return 2;
      }
      g_opt.isa = isa;
    } else if (a == "--quick") g_opt.quick = true;
    else rest.push_back(argv[i]);
  }
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;
  std::fprintf(stderr, "cpu path %s (detected %s), %d threads, DRAM buffer %zu MiB\n",
               to_string(g_opt.isa.value_or(detect_cpu_isa())), to_string(detect_cpu_isa()), pool_of(0).size(),
               g_opt.dram_bytes >> 20);
  register_benchmarks();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  if (!g_opt.result_json.empty()) write_results();
  return 0;
}
