#include "hattn/detail/decode_engine.hpp"

#include <algorithm>
#include <chrono>
#include <string>
#include <thread>

#include "cpu_side.hpp"
#include "engine_clock.hpp"
#if HATTN_WITH_CUDA
#include "gpu_side.hpp"
#endif

namespace hattn::detail {

struct DecodeEngine::Impl {
  Config config;
  Backend backend = Backend::kCpu;
  PagedKVStore store;
  ThreadPool threads;
  CpuSide cpu;
  std::vector<StepStats> stats;  // [layers], CPU backend
  std::vector<float> lse_scratch;
  std::uint64_t generation = 0;
#if HATTN_WITH_CUDA
  std::unique_ptr<GpuSide> gpu;
#endif

  static Backend resolve(const Config& c) {
    std::string why = "built without CUDA";
    bool present = false;
#if HATTN_WITH_CUDA
    present = GpuSide::device_present(why);
#endif
    if (c.backend == Backend::kGpu && !present)
      throw Error(concat("HybridAttention: backend gpu requested but no GPU is usable (", why, ")"));
    if (c.backend == Backend::kCpu) return Backend::kCpu;
    return present ? Backend::kGpu : Backend::kCpu;
  }

  static int worker_count(const Config& c, Backend backend) {
    if (c.cpu_threads > 0 || backend == Backend::kCpu) return c.cpu_threads;
    // Half the hardware threads: on the device (16 cores, 128K x 1, no HBM cache, 2026-11-23) the
    // CPU side's step took 1370-1520 us with 15 workers, 931-938 with 12 and 874-943 with 8; it is
    // bound by DRAM shared with the GPU's zero-copy reads, not by cores.
    return std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / 2);
  }

  explicit Impl(const Config& c)
      : config((c.validate(), c)),
        backend(resolve(c)),
        store(c.shape, c.page_size, c.host_pool_bytes,
              backend == Backend::kCpu ? HostMemoryRequest::kAligned : c.host_memory),
        threads(worker_count(c, backend)),
        cpu(config, store, threads, detect_cpu_isa()),
        stats(static_cast<std::size_t>(c.shape.layers)) {
#if HATTN_WITH_CUDA
    if (backend == Backend::kGpu) gpu = std::make_unique<GpuSide>(config, store, cpu);
#endif
  }
};

DecodeEngine::DecodeEngine(const Config& config) : impl_(std::make_unique<Impl>(config)) {}
DecodeEngine::~DecodeEngine() = default;

const Config& DecodeEngine::config() const noexcept { return impl_->config; }
Backend DecodeEngine::backend() const noexcept { return impl_->backend; }
CpuIsa DecodeEngine::cpu_isa() const noexcept { return impl_->cpu.isa(); }
PagedKVStore& DecodeEngine::store() noexcept { return impl_->store; }
const PagedKVStore& DecodeEngine::store() const noexcept { return impl_->store; }

SeqId DecodeEngine::add_sequence() { return impl_->store.add_sequence(); }

void DecodeEngine::append(SeqId seq, int layer, const TensorView& keys, const TensorView& values,
                          cuda::Stream stream) {
  PagedKVStore& store = impl_->store;
  const std::int64_t before = store.length(seq, layer);  // also checks seq and layer
  TensorView k = keys, v = values;
  if (keys.device == Device::kCuda || values.device == Device::kCuda) {
#if HATTN_WITH_CUDA
    require(impl_->gpu != nullptr, "HybridAttention::append", "keys.device", "cuda", "host for the CPU backend");
    impl_->gpu->stage_from_device(keys, values, stream, k, v);
#else
    throw InvalidArgument("HybridAttention::append: keys/values on a CUDA device but the build has no CUDA");
#endif
  }
  store.append(seq, layer, k, v);
#if HATTN_WITH_CUDA
  if (impl_->gpu) {
    const std::int64_t after = store.length(seq, layer);
    if (after > before) {
      const int ps = impl_->config.page_size;
      const auto pages = store.pages(seq, layer);
      impl_->gpu->upload_summaries(pages.subspan(before / ps, (after - 1) / ps - before / ps + 1), stream);
    }
  }
#else
  (void)before;
  (void)stream;
#endif
}

void DecodeEngine::release(SeqId seq) {
  require(impl_->store.contains(seq), "HybridAttention::release", "sequence id", seq, "a live sequence");
#if HATTN_WITH_CUDA
  if (impl_->gpu) impl_->gpu->release(seq);
#endif
  impl_->store.release(seq);
}

void DecodeEngine::prepare(std::span<const SeqId> rows) {
  constexpr const char* kWhere = "HybridAttention::plan";
  require(!rows.empty(), kWhere, "batch size", rows.size(), ">= 1");
  require(rows.size() <= static_cast<std::size_t>(impl_->config.max_batch), kWhere, "batch size", rows.size(),
          "<= Config::max_batch (", impl_->config.max_batch, ")");
  std::vector<SeqId> sorted(rows.begin(), rows.end());
  std::sort(sorted.begin(), sorted.end());
  for (std::size_t i = 0; i < sorted.size(); ++i) {
    require(impl_->store.contains(sorted[i]), kWhere, "sequence id", sorted[i], "a live sequence");
    require(i == 0 || sorted[i] != sorted[i - 1], kWhere, "sequence id", sorted[i], "listed once");
  }
#if HATTN_WITH_CUDA
  if (impl_->gpu) impl_->gpu->prepare(rows);
#endif
}

int DecodeEngine::pages(SeqId seq, int layer) const {
  return static_cast<int>(impl_->store.pages(seq, layer).size());
}

double DecodeEngine::hbm_hit_rate() const noexcept {
#if HATTN_WITH_CUDA
  if (impl_->gpu) return impl_->gpu->hbm_hit_rate();
#endif
  return 0.0;
}

std::int64_t DecodeEngine::hbm_cache_blocks() const noexcept {
#if HATTN_WITH_CUDA
  if (impl_->gpu) return impl_->gpu->hbm_slots();
#endif
  return 0;
}

CacheStepStats DecodeEngine::cache_step_stats() {
#if HATTN_WITH_CUDA
  if (impl_->gpu) return impl_->gpu->cache_step_stats();
#endif
  return {};
}

void DecodeEngine::run(const LayerWork& work, const TensorView& queries, const TensorView& output,
                       cuda::Stream stream) {
  constexpr const char* kWhere = "HybridAttention::run";
  const double t0 = engine_clock_us();
  const ModelShape& shape = impl_->config.shape;
  const auto batch = static_cast<std::int64_t>(work.rows.size());
  require_tensor(queries, kWhere, "queries", DType::kFloat32, {batch, shape.q_heads, shape.head_dim});
  require_tensor(output, kWhere, "output", DType::kFloat32, {batch, shape.q_heads, shape.head_dim});
  const Device want = impl_->backend == Backend::kGpu ? Device::kCuda : Device::kHost;
  require(queries.device == want, kWhere, "queries.device", to_string(queries.device), to_string(want));
  require(output.device == want, kWhere, "output.device", to_string(output.device), to_string(want));
  const std::uint64_t generation = ++impl_->generation;
#if HATTN_WITH_CUDA
  if (impl_->gpu) {
    impl_->gpu->run(work, static_cast<const float*>(queries.data), static_cast<float*>(output.data), stream,
                    generation, t0);
    return;
  }
#else
  (void)stream;
#endif
  // CPU backend: the CPU side computes every page; its partial is the output.
  StepStats& s = impl_->stats[work.layer];
  const std::size_t segments = static_cast<std::size_t>(batch) * shape.kv_heads;
  s = StepStats{};
  s.layer = work.layer;
  s.batch = static_cast<int>(batch);
  s.generation = generation;
  s.row_ids.assign(work.rows.begin(), work.rows.end());
  s.rules.assign(work.rules.begin(), work.rules.end());
  s.cpu_share.assign(work.cpu_share.begin(), work.cpu_share.end());
  s.selected_pages.assign(segments, 0);
  impl_->lse_scratch.resize(static_cast<std::size_t>(batch) * shape.q_heads);
  s.cpu_begin_us = engine_clock_us();
  impl_->cpu.compute(work, static_cast<const float*>(queries.data), static_cast<float*>(output.data),
                     impl_->lse_scratch.data(), s.selected_pages.data());
  s.cpu_end_us = engine_clock_us();
  s.cpu_us = s.cpu_end_us - s.cpu_begin_us;
  s.cpu_kernel_us = impl_->cpu.last_kernel_us();
  const PageLayout& layout = impl_->store.layout();
  for (std::int64_t b = 0; b < batch; ++b) {
    const int n = pages(work.rows[b], work.layer);
    s.pages_per_row.push_back(n);
    s.total_blocks += static_cast<std::int64_t>(n) * shape.kv_heads;
  }
  for (int c : s.selected_pages) s.cpu_blocks += c;
  s.host_read_bytes = s.cpu_blocks * static_cast<std::int64_t>(2 * layout.head_block_elems() * dtype_bytes(layout.dtype));
  s.caller_begin_us = t0;
  s.caller_us = engine_clock_us() - t0;
}

const StepStats* DecodeEngine::finished_stats(int layer) {
  require(layer >= 0 && layer < impl_->config.shape.layers, "HybridAttention::stats", "layer", layer,
          "a layer of the model");
#if HATTN_WITH_CUDA
  if (impl_->gpu) return impl_->gpu->finished(layer);
#endif
  const StepStats& s = impl_->stats[layer];
  return s.generation ? &s : nullptr;
}

const StepStats& DecodeEngine::wait_stats(int layer) {
  require(layer >= 0 && layer < impl_->config.shape.layers, "HybridAttention::stats", "layer", layer,
          "a layer of the model");
#if HATTN_WITH_CUDA
  if (impl_->gpu) return impl_->gpu->wait(layer);
#endif
  return impl_->stats[layer];
}

}  // namespace hattn::detail
