#include "gpu_side.hpp"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <thread>

#include "engine_clock.hpp"
#include "hattn/core/cuda_check.hpp"
#include "hattn/kernels/cuda_decode.hpp"
#include "hattn/kernels/cuda_host_wait.hpp"
#include "hattn/kernels/cuda_score.hpp"
#include "hattn/kernels/cuda_select.hpp"
#include "hattn/kernels/cuda_split.hpp"
#include "hattn/kernels/cuda_two_level.hpp"
#include "hattn/kv/device_kv_cache.hpp"
#include "hattn/kv/page_summary.hpp"
#include <unordered_map>

namespace hattn::detail {
namespace {

template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }
  // Grows only, at plan time; contents are not kept. True where it allocated.
  bool reserve(std::size_t count) {
    if (count <= size_) return false;
    cudaFree(ptr_);
    ptr_ = nullptr;
    size_ = 0;
    HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), std::max<std::size_t>(count, 1) * sizeof(T)));
    size_ = count;
    return true;
  }
  // Grows keeping the contents; waits for the device first, since enqueued kernels may read the old
  // buffer (rare: the group mirror when more groups are live than planned).
  void grow_keeping(std::size_t count) {
    if (count <= size_) return;
    T* bigger = nullptr;
    HATTN_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&bigger), count * sizeof(T)));
    HATTN_CUDA_CHECK(cudaDeviceSynchronize());
    if (size_ > 0) HATTN_CUDA_CHECK(cudaMemcpy(bigger, ptr_, size_ * sizeof(T), cudaMemcpyDeviceToDevice));
    cudaFree(ptr_);
    ptr_ = bigger;
    size_ = count;
  }
  T* get() const noexcept { return ptr_; }
  std::size_t size() const noexcept { return size_; }

 private:
  T* ptr_ = nullptr;
  std::size_t size_ = 0;
};

// Pinned host memory, mapped so kernels read it in place (the CPU partials) or write the host's copy
// directly (the split's CPU lists and the step's block counts).
template <class T>
class PinnedArray {
 public:
  PinnedArray() = default;
  PinnedArray(const PinnedArray&) = delete;
  ~PinnedArray() { cudaFreeHost(host_); }
  void reserve(std::size_t count) {
    if (count <= size_) return;
    cudaFreeHost(host_);
    host_ = nullptr;
    size_ = 0;
    HATTN_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&host_), std::max<std::size_t>(count, 1) * sizeof(T),
                                   cudaHostAllocMapped | cudaHostAllocPortable));
    size_ = count;
  }
  T* host() const noexcept { return host_; }
  std::size_t size() const noexcept { return size_; }

 private:
  T* host_ = nullptr;
  std::size_t size_ = 0;
};

cudaStream_t native(cuda::Stream s) { return reinterpret_cast<cudaStream_t>(s); }

// The fused two-level selection (launch_select_two_level) and the merge folded into the decode
// (SparseDecodeParams::out) passed the GPU tests on the H100 (fac6c79) but were no faster than the
// separate launches (docs/performance.md), so the engine runs them only with HATTN_FUSED_STEP=1
// (scripts/device_tests.sh and scripts/device/session.sh test both); otherwise the separate launches
// and the merge kernel.
bool fused_step() {
  static const bool on = [] {
    const char* env = std::getenv("HATTN_FUSED_STEP");
    return env != nullptr && env[0] == '1';
  }();
  return on;
}

// Runs in flight before run() waits for the oldest one (a host wait only when the GPU lags this far).
constexpr int kRing = 8;

// Slot::phase indices.
constexpr std::size_t kScored = 0, kSelected = 1, kCacheWaited = 2, kDecoded = 3, kGated = 4;

}  // namespace

struct GpuSide::Impl {
  // One run() in flight: its metadata, workspaces, CPU hand-off and pending stats.
  struct Slot {
    // cpu_inputs: q and the CPU's part of the selection reached the host, so the CPU job may start.
    cudaEvent_t begin = nullptr, end = nullptr, cpu_inputs = nullptr;
    cudaEvent_t upload = nullptr;  // before the metadata copy (Config::time_phases only)
    // After score, select (and split), the cache wait, decode and the wait for the CPU's partials.
    // kSelected and kDecoded are always recorded (the schedulers' feedback and the stats need them),
    // the others only with Config::time_phases.
    std::array<cudaEvent_t, 5> phase{};
    PinnedArray<std::int32_t> meta_host;
    DeviceArray<std::int32_t> meta;
    DeviceArray<float> upper, estimate, partial_out, partial_lse;
    // Two-level scoring: the coarse scores, the kept groups, the candidates' page positions.
    DeviceArray<float> coarse_upper, coarse_estimate;
    DeviceArray<std::int32_t> kept, kept_count, position_of;
    DeviceArray<std::int32_t> selected, selected_count;
    DeviceArray<std::int32_t> gpu_selected, gpu_count;  // the split's GPU part
    // The CPU part, written by the split kernel straight into mapped host memory: no copy between
    // the selection and the CPU job's start.
    PinnedArray<std::int32_t> cpu_selected_host, cpu_count_host;
    DeviceArray<std::byte> select_workspace;
    DeviceArray<std::uint32_t> decode_arrivals;  // the merge folded into the decode (no CPU partial)
    PinnedArray<float> q_host, cpu_out, cpu_lse;
    // The CPU job's ticket: the driver writes `ticket` here once the partials are in place, and the
    // merge's stream waits on the GPU for it (launch_wait_host_value).
    PinnedArray<std::uint32_t> cpu_published;
    std::uint32_t ticket = 0;
    PinnedArray<std::int32_t> gpu_counts;  // [2][batch * kv_heads]: GPU blocks, then those cached in HBM
    std::vector<int> cpu_counts;
    std::vector<std::int32_t> selected_offset;  // [batch * kv_heads], host copy for the CPU job
    // The CPU job works on copies: the caller's Plan may be gone before the job runs.
    std::vector<SeqId> rows;
    std::vector<SegmentRule> rules;
    std::vector<double> shares;
    int layer = 0;
    bool has_cpu = false;
    std::mutex mutex;
    std::condition_variable cv;
    bool cpu_done = true;
    std::string cpu_error;
    double cpu_begin_us = 0, cpu_end_us = 0, cpu_kernel_us = 0;
    bool in_flight = false;
    bool enqueued = false;  // every launch of the run() made it; false when one threw midway
    StepStats pending;
  };

  const Config& config;
  PagedKVStore& store;
  CpuSide& cpu;
  int sms = 132;
  std::array<Slot, kRing> slots;
  std::vector<StepStats> stats;  // [layers], finalized
  std::vector<int> last_slot;    // [layers] ring index of the newest run of the layer, -1 none
  DeviceArray<std::byte> summaries;
  // Two-level scoring (Config::coarse_keep): fp32 group summaries built on the device from the page
  // summaries, one slot per (sequence, layer, group) of 16 pages, slots reused after release. Each
  // run rebuilds the groups whose pages changed since the layer's last build (built_tokens).
  struct GroupMirror {
    std::vector<std::vector<std::int32_t>> slots;  // [layer][group]
    std::vector<std::int64_t> built_tokens;        // [layer]
  };
  DeviceArray<float> group_summaries;
  std::vector<std::int32_t> free_group_slots;
  std::unordered_map<SeqId, GroupMirror> groups_of;
  PinnedArray<std::byte> stage_keys, stage_values;
  cudaStream_t clock_stream = nullptr;
  // Without a CPU share the split only counts the GPU's cached blocks for the stats: it runs here,
  // beside the cache step, instead of before it on the caller's stream.
  cudaStream_t stats_stream = nullptr;
  cudaEvent_t stats_fork = nullptr, stats_join = nullptr;
  cudaEvent_t anchor = nullptr;
  double anchor_us = 0;
  std::uint64_t runs_since_anchor = 0;
  std::size_t planned_pages = 0;
  int planned_batch = 0;

  // The HBM cache and the request slots it knows sequences by.
  std::unique_ptr<DeviceKVCache> cache;
  cudaStream_t side_stream = nullptr;
  std::unordered_map<SeqId, std::int32_t> request_of;
  std::vector<std::int32_t> free_requests;
  std::uint32_t step = 0;
  std::uint32_t steps_since_resize = 0;
  double hit_rate = 0.0;
  BudgetPolicy budget_policy{};

  // The CPU side's driver thread: runs each hybrid layer's CPU work off the caller's thread.
  std::mutex jobs_mutex;
  std::condition_variable jobs_cv;
  std::deque<Slot*> jobs;
  bool stopping = false;
  std::thread driver;

  Impl(const Config& c, PagedKVStore& s, CpuSide& cs) : config(c), store(s), cpu(cs) {
    int device = 0;
    HATTN_CUDA_CHECK(cudaGetDevice(&device));
    HATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    require(store.pool().memory_kind() == HostMemoryKind::kPinnedMapped, "HybridAttention", "host pool memory",
            to_string(store.pool().memory_kind()), "pinned-mapped for the GPU backend (GPU kernels read host pages)");
    for (Slot& slot : slots) {
      HATTN_CUDA_CHECK(cudaEventCreate(&slot.begin));
      HATTN_CUDA_CHECK(cudaEventCreate(&slot.end));
      HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&slot.cpu_inputs, cudaEventDisableTiming));
      HATTN_CUDA_CHECK(cudaEventCreate(&slot.upload));
      for (cudaEvent_t& e : slot.phase) HATTN_CUDA_CHECK(cudaEventCreate(&e));
      slot.cpu_published.reserve(1);
      *slot.cpu_published.host() = slot.ticket;
    }
    stats.resize(static_cast<std::size_t>(config.shape.layers));
    last_slot.assign(static_cast<std::size_t>(config.shape.layers), -1);
    summaries.reserve(static_cast<std::size_t>(store.pool().capacity_pages()) * store.layout().summary_bytes());
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&clock_stream, cudaStreamNonBlocking));
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stats_stream, cudaStreamNonBlocking));
    HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&stats_fork, cudaEventDisableTiming));
    HATTN_CUDA_CHECK(cudaEventCreateWithFlags(&stats_join, cudaEventDisableTiming));
    HATTN_CUDA_CHECK(cudaEventCreate(&anchor));
    reanchor();
    open_cache();
    driver = std::thread([this] { drive(); });
  }

  bool decode_reads_staging() const {
    cuda::SparseDecodeParams probe;
    probe.q_heads = config.shape.q_heads;
    probe.kv_heads = config.shape.kv_heads;
    probe.head_dim = config.shape.head_dim;
    return cuda::decode_kernel_for(probe) == cuda::DecodeKernel::kTensorCores;
  }

  void open_cache() {
    const PageLayout& l = store.layout();
    const std::size_t block = 2 * l.head_block_elems() * dtype_bytes(l.dtype);
    const std::size_t blocks = config.hbm_cache_bytes / block;
    // Staged admission takes 1/10 of the cache's HBM for the staging area: at 128K tokens, batch 1
    // and a cache of 19% of the KV, ~1240 blocks against ~650 misses per layer.
    const std::size_t staging = config.admission == Admission::kStaged && decode_reads_staging() ? blocks / 10 : 0;
    const std::size_t slots = blocks - staging;
    if (slots == 0) return;
    DeviceKVCacheConfig cc;
    cc.slots = static_cast<std::int32_t>(std::min<std::size_t>(slots, INT32_MAX));
    cc.staging_blocks = static_cast<std::int32_t>(std::min<std::size_t>(staging, INT32_MAX));
    cc.max_requests = config.max_batch;
    cc.max_batch = std::min(config.max_batch, 128);
    const std::int64_t keys = store.pool().capacity_pages() * config.shape.kv_heads;
    // Entries of one call's selection (batch x KV heads x pages); 2M covers 128K tokens at batch 16.
    cc.max_selected = static_cast<std::int32_t>(std::clamp<std::int64_t>(keys, 1 << 16, 1 << 21));
    cc.layers = config.shape.layers;
    cache = std::make_unique<DeviceKVCache>(store.pool(), cc);
    for (std::int32_t r = cc.max_requests - 1; r >= 0; --r) free_requests.push_back(r);
    HATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&side_stream, cudaStreamNonBlocking));
  }

  // The group mirror's slots of (seq, layer) for its first `groups` groups, allocated as needed.
  const std::vector<std::int32_t>& group_slots(SeqId seq, int layer, int groups) {
    GroupMirror& m = groups_of[seq];
    if (m.slots.empty()) {
      m.slots.resize(static_cast<std::size_t>(config.shape.layers));
      m.built_tokens.assign(static_cast<std::size_t>(config.shape.layers), 0);
    }
    auto& v = m.slots[static_cast<std::size_t>(layer)];
    const std::size_t elems = store.layout().summary_elems();
    while (static_cast<int>(v.size()) < groups) {
      if (free_group_slots.empty()) {
        // Room for the pool's full groups plus a partial one per (sequence, layer) of 16 sequences;
        // grows by half when exceeded (a device-wide wait: not inside a CUDA graph capture).
        const std::size_t have = group_summaries.size() / elems;
        const std::size_t want = have == 0 ? static_cast<std::size_t>(store.pool().capacity_pages()) /
                                                     kPagesPerSummaryGroup + 16 * static_cast<std::size_t>(config.shape.layers)
                                           : have + have / 2;
        group_summaries.grow_keeping(want * elems);
        for (std::size_t i = want; i-- > have;) free_group_slots.push_back(static_cast<std::int32_t>(i));
      }
      v.push_back(free_group_slots.back());
      free_group_slots.pop_back();
    }
    return v;
  }

  void release_groups(SeqId seq) {
    auto it = groups_of.find(seq);
    if (it == groups_of.end()) return;
    for (const auto& layer : it->second.slots) free_group_slots.insert(free_group_slots.end(), layer.begin(), layer.end());
    groups_of.erase(it);
  }

  // A request slot for each new row, with a share of the unbudgeted slots until the first resize.
  // A request joining the batch starts with an equal share of the pool (slots / live requests): the
  // live ones give up budget in proportion to what they hold (never below their pins), and the next
  // resize (refresh_cache_view) moves every budget to its working set. Opening each new request with
  // half of the unbudgeted slots, as before, left the 4th of 4 requests 1/16 of the pool until then,
  // so it read most of its KV across PCIe (the sweep's gpu_dense rows at batch 4 and 16).
  void admit_rows(std::span<const SeqId> rows) {
    if (!cache) return;
    std::vector<SeqId> fresh;
    for (SeqId seq : rows)
      if (!request_of.count(seq) && std::find(fresh.begin(), fresh.end(), seq) == fresh.end()) fresh.push_back(seq);
    if (fresh.empty()) return;
    require(fresh.size() <= free_requests.size(), "HybridAttention::plan",
            "live requests", request_of.size() + fresh.size(), "<= Config::max_batch (", config.max_batch, ")");
    const std::int64_t slots = cache->config().slots;
    const auto live = static_cast<std::int64_t>(request_of.size() + fresh.size());
    const std::int64_t share = slots / live;
    std::vector<std::pair<std::int32_t, RequestCacheStats>> held;
    std::int64_t budgeted = 0;
    for (const auto& [seq, r] : request_of) {
      held.emplace_back(r, cache->request_stats(r));
      budgeted += held.back().second.budget_slots;
    }
    const std::int64_t room = share * static_cast<std::int64_t>(fresh.size()) - (slots - budgeted);
    if (room > 0 && budgeted > 0)
      for (const auto& [r, st] : held) {
        const std::int64_t give = (room * st.budget_slots + budgeted - 1) / budgeted;  // rounded up: room is met
        const auto kept = std::max<std::int64_t>(st.pinned_slots, st.budget_slots - give);
        if (kept < st.budget_slots) cache->set_budget(r, static_cast<std::int32_t>(kept));
      }
    std::int64_t now_budgeted = 0;
    for (const auto& [seq, r] : request_of) now_budgeted += cache->request_stats(r).budget_slots;
    // Where pins kept live requests from giving up their part, the joiners split what is left
    // evenly rather than the first ones taking a full share and the last none.
    std::int64_t joiners_left = static_cast<std::int64_t>(fresh.size());
    for (SeqId seq : fresh) {
      const std::int32_t r = free_requests.back();
      const std::int64_t budget = std::clamp<std::int64_t>((slots - now_budgeted) / joiners_left--, 0, share);
      cache->open_request(r, static_cast<std::int32_t>(budget));
      now_budgeted += budget;
      free_requests.pop_back();
      request_of.emplace(seq, r);
    }
  }

  // Every few steps, budgets follow each request's working set and hit rate (SPIN), and the hit
  // rate the scheduler plans with is refreshed. Both read the cache's counters, which waits for
  // its GPU work, so not every step.
  void refresh_cache_view() {
    if (!cache || ++steps_since_resize < 8) return;
    steps_since_resize = 0;
    const CacheStepStats s = cache->step_stats();
    const double looked_up = static_cast<double>(s.counters.hits + s.counters.misses);
    if (looked_up > 0) hit_rate = static_cast<double>(s.counters.hits) / looked_up;
    cache->resize_budgets(budget_policy);
  }

  ~Impl() {
    {
      std::lock_guard lock(jobs_mutex);
      stopping = true;
    }
    jobs_cv.notify_all();
    driver.join();
    cudaDeviceSynchronize();
    for (Slot& slot : slots) {
      cudaEventDestroy(slot.begin);
      cudaEventDestroy(slot.end);
      cudaEventDestroy(slot.cpu_inputs);
      cudaEventDestroy(slot.upload);
      for (cudaEvent_t e : slot.phase)
        if (e) cudaEventDestroy(e);
    }
    cudaEventDestroy(anchor);
    cudaStreamDestroy(clock_stream);
    cudaEventDestroy(stats_fork);
    cudaEventDestroy(stats_join);
    cudaStreamDestroy(stats_stream);
    cache.reset();
    if (side_stream) cudaStreamDestroy(side_stream);
  }

  // Event times become host times through an anchor event recorded on an idle stream.
  void reanchor() {
    HATTN_CUDA_CHECK(cudaEventRecord(anchor, clock_stream));
    HATTN_CUDA_CHECK(cudaEventSynchronize(anchor));
    anchor_us = engine_clock_us();
    runs_since_anchor = 0;
  }
  double host_time_of(cudaEvent_t e) const {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, anchor, e) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return anchor_us + 1e3 * ms;
  }

  void drive() {
    for (;;) {
      Slot* slot = nullptr;
      {
        std::unique_lock lock(jobs_mutex);
        jobs_cv.wait(lock, [&] { return stopping || !jobs.empty(); });
        if (jobs.empty()) return;
        slot = jobs.front();
        jobs.pop_front();
      }
      std::string error;
      try {
        HATTN_CUDA_CHECK(cudaEventSynchronize(slot->cpu_inputs));
        slot->cpu_begin_us = engine_clock_us();
        LayerWork work{slot->layer, slot->rows, slot->rules, slot->shares};
        cpu.compute_selected(work, slot->q_host.host(), slot->cpu_selected_host.host(), slot->selected_offset.data(),
                             slot->cpu_count_host.host(), slot->cpu_out.host(), slot->cpu_lse.host(),
                             slot->cpu_counts.data());
        slot->cpu_end_us = engine_clock_us();
        slot->cpu_kernel_us = cpu.last_kernel_us();
      } catch (const std::exception& e) {
        error = e.what();
        // An empty partial merges as nothing, so the GPU side still finishes cleanly.
        const std::size_t rows = slot->rows.size() * static_cast<std::size_t>(config.shape.q_heads);
        std::fill(slot->cpu_lse.host(), slot->cpu_lse.host() + rows, -std::numeric_limits<float>::infinity());
        std::fill(slot->cpu_out.host(), slot->cpu_out.host() + rows * config.shape.head_dim, 0.0f);
      }
      // The partials (or the empty ones) are written: the GPU's merge may read them.
      std::atomic_ref<std::uint32_t>(*slot->cpu_published.host()).store(slot->ticket, std::memory_order_release);
      {
        std::lock_guard lock(slot->mutex);
        slot->cpu_error = std::move(error);
        slot->cpu_done = true;
      }
      slot->cv.notify_all();
    }
  }

  void wait_cpu(Slot& slot) {
    std::unique_lock lock(slot.mutex);
    slot.cv.wait(lock, [&] { return slot.cpu_done; });
  }

  bool done(Slot& slot) {
    if (!slot.in_flight) return true;
    const cudaError_t e = cudaEventQuery(slot.end);
    if (e == cudaErrorNotReady) return false;
    HATTN_CUDA_CHECK(e);
    std::lock_guard lock(slot.mutex);
    return slot.cpu_done;
  }

  void finalize(Slot& slot) {
    if (!slot.in_flight) return;
    if (!slot.enqueued) {  // a run() that threw after starting the CPU job: only that job to wait for
      wait_cpu(slot);
      slot.in_flight = false;
      return;
    }
    HATTN_CUDA_CHECK(cudaEventSynchronize(slot.end));
    wait_cpu(slot);
    slot.in_flight = false;
    StepStats& s = slot.pending;
    const int heads = config.shape.kv_heads;
    const PageLayout& layout = store.layout();
    const std::int64_t block = static_cast<std::int64_t>(2 * layout.head_block_elems() * dtype_bytes(layout.dtype));
    const std::size_t segments = static_cast<std::size_t>(s.batch) * heads;
    s.selected_pages.assign(segments, 0);
    for (std::size_t i = 0; i < segments; ++i) {
      const int g = slot.gpu_counts.host()[i];
      const int c = slot.has_cpu ? slot.cpu_counts[i] : 0;
      s.selected_pages[i] = g + c;
      s.gpu_blocks += g;
      s.cpu_blocks += c;
      if (cache) s.hbm_hits += slot.gpu_counts.host()[segments + i];
    }
    float ms = 0;
    HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, slot.begin, slot.end));
    s.gpu_us = 1e3 * ms;
    if (config.time_phases) {
      const std::array<cudaEvent_t, 7> marks{slot.begin,    slot.phase[0], slot.phase[1], slot.phase[2],
                                             slot.phase[3], slot.phase[4], slot.end};
      std::array<double, 6> us{};
      for (std::size_t i = 0; i < us.size(); ++i) {
        HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, marks[i], marks[i + 1]));
        us[i] = 1e3 * ms;
      }
      HATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, slot.upload, slot.begin));
      s.gpu_phases = {1e3 * ms, us[0], us[1], us[2], us[3], us[4], us[5]};
    }
    s.gpu_begin_us = host_time_of(slot.begin);
    s.gpu_end_us = host_time_of(slot.end);
    s.gpu_selected_us = host_time_of(slot.phase[kSelected]);
    s.gpu_decoded_us = host_time_of(slot.phase[kDecoded]);
    if (slot.has_cpu) {
      s.cpu_begin_us = slot.cpu_begin_us;
      s.cpu_end_us = slot.cpu_end_us;
      s.cpu_us = slot.cpu_end_us - slot.cpu_begin_us;
      s.cpu_kernel_us = slot.cpu_kernel_us;
    }
    const std::int64_t zero_copy = s.gpu_blocks - s.hbm_hits;
    s.host_read_bytes = (s.cpu_blocks + zero_copy) * block;
    s.pcie_bytes = zero_copy * block;
    stats[s.layer] = s;
    if (!slot.cpu_error.empty()) throw Error(concat("HybridAttention: CPU side of layer ", s.layer, " failed: ", slot.cpu_error));
  }

  void prepare(std::span<const SeqId> rows) {
    admit_rows(rows);
    refresh_cache_view();
    ++step;
    // One more page per row than now: each layer may append a token between plan() and run().
    std::size_t pages = 0;
    for (SeqId seq : rows)
      for (int l = 0; l < config.shape.layers; ++l) pages = std::max(pages, store.pages(seq, l).size());
    const std::size_t batch = rows.size();
    const std::size_t total = batch * (pages + 1);
    if (cache)
      require(total * config.shape.kv_heads <= static_cast<std::size_t>(cache->config().max_selected),
              "HybridAttention::plan", "batch pages x kv_heads", total * config.shape.kv_heads,
              "<= the HBM cache's selection capacity (", cache->config().max_selected, ")");
    const std::size_t heads = config.shape.kv_heads;
    const std::size_t qrows = batch * config.shape.q_heads;
    const std::size_t dim = config.shape.head_dim;
    // Group entries (two-level scoring): at most one per 16 pages plus a partial one per row.
    const std::size_t group_total = total / kPagesPerSummaryGroup + batch;
    const std::size_t meta = 2 * (batch + 1) + total + 5 * batch * heads + 3 * batch +
                             (batch + 1) + group_total + batch * heads + batch;
    // Candidate entries: each row's kept groups, at most its pages rounded up to whole groups.
    const std::size_t candidates = (total + kPagesPerSummaryGroup * batch) * heads;
    const std::size_t splits = split_count(static_cast<int>(batch));
    if (total > planned_pages || static_cast<int>(batch) > planned_batch) {
      bool zeroed = false;
      for (Slot& slot : slots) {
        finalize(slot);
        slot.meta_host.reserve(meta);
        slot.meta.reserve(meta);
        slot.upper.reserve(candidates);
        slot.estimate.reserve(candidates);
        if (config.coarse_keep > 0) {
          slot.position_of.reserve(candidates);
          slot.coarse_upper.reserve(group_total * heads);
          slot.coarse_estimate.reserve(group_total * heads);
          slot.kept.reserve(group_total * heads);
          slot.kept_count.reserve(batch * heads);
        }
        slot.selected.reserve(total * heads);
        slot.selected_count.reserve(batch * heads);
        slot.gpu_selected.reserve(total * heads);
        slot.gpu_count.reserve(batch * heads);
        slot.cpu_selected_host.reserve(total * heads);
        slot.cpu_count_host.reserve(batch * heads);
        slot.gpu_counts.reserve(2 * batch * heads);
        slot.cpu_counts.resize(batch * heads);
        slot.partial_out.reserve(splits * qrows * dim);
        slot.partial_lse.reserve(splits * qrows);
        slot.q_host.reserve(qrows * dim);
        slot.cpu_out.reserve(qrows * dim);
        slot.cpu_lse.reserve(qrows);
        // Zeroed when allocated: the arrival counts of the fused two-level selection and of the merge
        // folded into the decode start at zero, and every launch leaves them so.
        const std::size_t ws = cuda::select_workspace_bytes(static_cast<std::int64_t>(total), config.shape.kv_heads,
                                                            static_cast<int>(batch));
        if (slot.select_workspace.reserve(ws)) {
          HATTN_CUDA_CHECK(cudaMemset(slot.select_workspace.get(), 0, ws));
          zeroed = true;
        }
        const std::size_t arrivals = cuda::decode_workspace_bytes(static_cast<int>(batch) * config.shape.kv_heads);
        if (slot.decode_arrivals.reserve(arrivals / sizeof(std::uint32_t))) {
          HATTN_CUDA_CHECK(cudaMemset(slot.decode_arrivals.get(), 0, arrivals));
          zeroed = true;
        }
      }
      // The memsets run on the legacy stream, which the engine's non-blocking streams do not wait for.
      if (zeroed) HATTN_CUDA_CHECK(cudaDeviceSynchronize());
      planned_pages = total;
      planned_batch = static_cast<int>(batch);
    }
    if (++runs_since_anchor > 256) {
      bool idle = true;
      for (Slot& slot : slots) idle = idle && done(slot);
      if (idle) reanchor();
    }
  }

  // The CPU side starts once q and its part of the selection are on the host. q is copied on the
  // caller's stream (before kSelected), because the caller may overwrite its buffer with work it
  // enqueues after run(); the split kernel wrote the CPU's part into mapped host memory, so the
  // event after the q copy covers both. (A D2H copy of the lists on a copy stream cost the CPU side
  // a ~100 us later start on the device.)
  void enqueue_cpu_job(Slot& slot, const LayerWork& work, const std::int32_t* sel_offset, cudaStream_t stream) {
    const std::size_t segments = work.rows.size() * static_cast<std::size_t>(config.shape.kv_heads);
    HATTN_CUDA_CHECK(cudaEventRecord(slot.cpu_inputs, stream));
    slot.selected_offset.assign(sel_offset, sel_offset + segments);
    slot.rows.assign(work.rows.begin(), work.rows.end());
    slot.rules.assign(work.rules.begin(), work.rules.end());
    slot.shares.assign(work.cpu_share.begin(), work.cpu_share.end());
    slot.layer = work.layer;
    ++slot.ticket;
    {
      std::lock_guard lock(slot.mutex);
      slot.cpu_done = false;
      slot.cpu_error.clear();
    }
    // From here the driver thread may write the slot's CPU partials: the slot counts as in flight
    // even if a later launch throws, so no run() reuses it before the CPU job is done.
    slot.in_flight = true;
    {
      std::lock_guard lock(jobs_mutex);
      jobs.push_back(&slot);
    }
    jobs_cv.notify_one();
  }

  void mark_phase(Slot& slot, std::size_t i, cudaStream_t stream) const {
    if (config.time_phases || i == kSelected || i == kDecoded) HATTN_CUDA_CHECK(cudaEventRecord(slot.phase[i], stream));
  }

  int split_count(int batch) const {
    // Two chunks per SM across the batch's segments keeps every SM busy on a dense 128K layer.
    const int segments = std::max(1, batch * config.shape.kv_heads);
    return std::clamp((2 * sms + segments - 1) / segments, 1, 64);
  }

  // Two-level scoring: the changed groups' summaries, their coarse scores, the kept groups (top by the
  // same rank as the pages, sink and local groups forced), then the fine scores of their pages only.
  cuda::TwoLevelScoreParams two_level_params(Slot& slot, const cuda::ScoreParams& sp, const std::int32_t* d_group_indptr,
                                             const std::int32_t* d_group_table, const std::int32_t* d_group_budget,
                                             const std::int32_t* d_first_group, int candidates, int max_groups) {
    cuda::TwoLevelScoreParams p;
    p.pages = sp;
    p.group_table = d_group_table;
    p.group_indptr = d_group_indptr;
    p.group_summaries = group_summaries.get();
    p.first_group = d_first_group;
    p.group_upper = slot.coarse_upper.get();
    p.group_estimate = slot.coarse_estimate.get();
    p.group_budget = d_group_budget;
    p.sink_pages = config.sink_pages;
    p.local_pages = config.local_pages;
    p.max_groups = max_groups;  // top-k over at most 16K groups: the compact kernel
    p.kept = slot.kept.get();
    p.kept_count = slot.kept_count.get();
    p.candidates = candidates;
    p.position_of = slot.position_of.get();
    return p;
  }

  void run(const LayerWork& work, const float* q, float* out, cuda::Stream s, std::uint64_t generation,
           double caller_begin_us) {
    const cudaStream_t stream = native(s);
    Slot& slot = slots[generation % kRing];
    finalize(slot);  // waits only when the GPU is kRing runs behind
    slot.enqueued = false;
    const ModelShape& shape = config.shape;
    const int batch = static_cast<int>(work.rows.size());
    const int heads = shape.kv_heads;
    const int ps = config.page_size;
    require(batch <= planned_batch, "HybridAttention::run", "batch", batch, "the size given to plan()");

    // Metadata, packed into one pinned buffer and one copy.
    std::int32_t* m = slot.meta_host.host();
    std::int32_t* indptr = m;
    std::int32_t* seq_len = indptr + batch + 1;
    std::int32_t* table = seq_len + batch;
    indptr[0] = 0;
    std::vector<int> pages(static_cast<std::size_t>(batch));
    for (int b = 0; b < batch; ++b) {
      const auto p = store.pages(work.rows[b], work.layer);
      pages[b] = static_cast<int>(p.size());
      indptr[b + 1] = indptr[b] + pages[b];
      require(static_cast<std::size_t>(indptr[b + 1]) <= planned_pages, "HybridAttention::run", "pages",
              indptr[b + 1], "at most one page per row more than at plan()");
      std::memcpy(table + indptr[b], p.data(), p.size() * sizeof(PageId));
      seq_len[b] = static_cast<std::int32_t>(store.length(work.rows[b], work.layer));
    }
    const int total = indptr[batch];
    std::int32_t* budget = table + total;
    float* cpu_share = reinterpret_cast<float*>(budget + batch * heads);  // int32-sized, one copy with the rest
    std::int32_t* sel_offset = budget + batch * heads + batch;
    std::int32_t* request_row = sel_offset + batch * heads;
    std::int32_t* blended = request_row + batch;
    std::int32_t* group_indptr = blended + batch * heads;
    std::int32_t* group_budget = group_indptr + batch + 1;
    std::int32_t* first_group = group_budget + batch * heads;
    std::int32_t* group_table = first_group + batch;
    const std::int32_t* meta_end = group_indptr;
    for (int b = 0; b < batch; ++b) request_row[b] = cache ? request_of.at(work.rows[b]) : -1;
    float threshold = -1;
    bool has_cpu = false;
    bool any_blended = false;
    bool whole = true;  // every segment keeps every page: nothing to score or rank
    for (int b = 0; b < batch; ++b) {
      const int n = pages[b];
      cpu_share[b] = static_cast<float>(std::clamp(work.cpu_share[b], 0.0, 1.0));
      const int forced = forced_pages(n, config.sink_pages, config.local_pages);
      // A CPU job only where some quota can be non-zero: the split rounds share x the row's selected
      // blocks (at most min(n, cap) pages a head) to blocks, in float as here; an empty job would
      // still hold the merge.
      float most = 0;
      for (int h = 0; h < heads; ++h)
        most += static_cast<float>(std::min(n, work.rules[static_cast<std::size_t>(b) * heads + h].budget_pages));
      has_cpu = has_cpu || std::nearbyint(cpu_share[b] * most) > 0.0f;
      for (int h = 0; h < heads; ++h) {
        const SegmentRule& rule = work.rules[static_cast<std::size_t>(b) * heads + h];
        // The GPU selects over the whole sequence with the whole rule; the CPU share only decides who
        // computes which selected page. Top-k counts the forced pages inside k; the mass rule's cap
        // counts only pages beyond them (the kernels' convention, the same as cpu_select_mass).
        const int g = rule.budget_pages;
        budget[b * heads + h] = rule.mass_threshold > 0 ? std::max(0, g - forced) : g;
        sel_offset[b * heads + h] = indptr[b] * heads + h * n;
        whole = whole && rule.mass_threshold == 0 && g >= n;
        blended[b * heads + h] = rule.rank == PageRank::kBlend;
        any_blended = any_blended || rule.rank == PageRank::kBlend;
        if (threshold < 0) threshold = rule.mass_threshold;
        require(rule.mass_threshold == threshold, "HybridAttention::run", "rules", "mixed top-k and mass rules",
                "one rule kind and threshold per layer on the GPU");
      }
    }
    const int max_pages = pages.empty() ? 0 : *std::max_element(pages.begin(), pages.end());
    // Two-level scoring where some segment keeps fewer groups than it has (kept_summary_groups).
    int max_keep = 0;
    bool two_level = false;
    if (config.coarse_keep > 0 && !whole) {
      for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h) {
          const int keep = kept_summary_groups(pages[b], work.rules[static_cast<std::size_t>(b) * heads + h].budget_pages,
                                               config.coarse_keep, config.sink_pages, config.local_pages);
          group_budget[b * heads + h] = keep;
          max_keep = std::max(max_keep, keep);
          two_level = two_level || keep < summary_groups(pages[b]);
        }
    }
    if (two_level) {
      group_indptr[0] = 0;
      for (int b = 0; b < batch; ++b) {
        const int groups = summary_groups(pages[b]);
        const auto& v = group_slots(work.rows[b], work.layer, groups);
        std::memcpy(group_table + group_indptr[b], v.data(), static_cast<std::size_t>(groups) * sizeof(std::int32_t));
        group_indptr[b + 1] = group_indptr[b] + groups;
        // Rebuild from the group of the last page of the previous build: appends changed it and after.
        // (built_tokens moves on only once the rebuild is enqueued, below.)
        const std::int64_t built = groups_of[work.rows[b]].built_tokens[static_cast<std::size_t>(work.layer)];
        first_group[b] = built == seq_len[b] ? groups
                                             : static_cast<std::int32_t>(std::max<std::int64_t>(built - 1, 0) / ps /
                                                                         kPagesPerSummaryGroup);
      }
      meta_end = group_table + group_indptr[batch];
      // The plan sized the candidate and group buffers for one more page per row than it saw.
      require(static_cast<std::size_t>(batch) * heads * max_keep * kPagesPerSummaryGroup <= slot.position_of.size() &&
                  static_cast<std::size_t>(group_indptr[batch]) * heads <= slot.kept.size(),
              "HybridAttention::run", "pages per row", max_pages,
              "at most one page per row more than at plan()");
    }
    const std::size_t meta_count = static_cast<std::size_t>(meta_end - m);
    if (config.time_phases) HATTN_CUDA_CHECK(cudaEventRecord(slot.upload, stream));
    HATTN_CUDA_CHECK(cudaMemcpyAsync(slot.meta.get(), m, meta_count * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream));
    const std::int32_t* d = slot.meta.get();
    const std::int32_t* d_indptr = d;
    const std::int32_t* d_seq_len = d_indptr + batch + 1;
    const std::int32_t* d_table = d_seq_len + batch;
    const std::int32_t* d_budget = d_table + total;
    const float* d_cpu_share = reinterpret_cast<const float*>(d_budget + batch * heads);
    const std::int32_t* d_sel_offset = d_budget + batch * heads + batch;
    const std::int32_t* d_request_row = d_sel_offset + batch * heads;
    const std::int32_t* d_blended = d_request_row + batch;
    const std::int32_t* d_group_indptr = d_blended + batch * heads;
    const std::int32_t* d_group_budget = d_group_indptr + batch + 1;
    const std::int32_t* d_first_group = d_group_budget + batch * heads;
    const std::int32_t* d_group_table = d_first_group + batch;
    HATTN_CUDA_CHECK(cudaEventRecord(slot.begin, stream));

    const std::size_t qrows = static_cast<std::size_t>(batch) * shape.q_heads;
    slot.has_cpu = has_cpu;
    const float scale = config.logit_scale();
    cuda::ScoreParams sp;
    sp.q = q;
    sp.summaries = summaries.get();
    sp.page_table = d_table;
    sp.page_indptr = d_indptr;
    sp.seq_len = d_seq_len;
    sp.batch = batch;
    sp.q_heads = shape.q_heads;
    sp.kv_heads = heads;
    sp.head_dim = shape.head_dim;
    sp.page_size = ps;
    sp.dtype = shape.kv_dtype;
    sp.scale = scale;
    sp.upper = slot.upper.get();
    // Top-k ranking by the bound alone needs no estimate (and skips the summaries' mean rows).
    sp.estimate = threshold > 0 || any_blended ? slot.estimate.get() : nullptr;
    // Segments that rank by the blend get it in place of their bound, from the same pass.
    sp.blended = any_blended ? d_blended : nullptr;
    sp.blend = kRankBlend;
    sp.inputs_ready = true;  // the metadata copy above heads the chain
    const int candidates = two_level ? max_keep * kPagesPerSummaryGroup : 0;
    // Fused, two-level scoring selects too (launch_select_two_level); its time counts as scoring.
    const bool fused_two_level = two_level && fused_step();
    const cuda::TwoLevelScoreParams tl =
        two_level ? two_level_params(slot, sp, d_group_indptr, d_group_table, d_group_budget, d_first_group, candidates,
                                     summary_groups(max_pages))
                  : cuda::TwoLevelScoreParams{};
    if (two_level && !fused_two_level) cuda::launch_score_two_level(tl, s);
    else if (!two_level && !whole) cuda::launch_score_pages(sp, s);
    if (!fused_two_level) mark_phase(slot, kScored, stream);

    cuda::SelectParams sel;
    sel.scores = slot.upper.get();  // the bound, or the blend where a rule ranks by it
    sel.log_mass = threshold > 0 ? slot.estimate.get() : nullptr;
    sel.page_indptr = d_indptr;
    sel.batch = batch;
    sel.kv_heads = heads;
    sel.budget_pages = d_budget;
    sel.mass_threshold = std::max(0.0f, threshold);
    sel.sink_pages = config.sink_pages;
    sel.local_pages = config.local_pages;
    sel.selected = slot.selected.get();
    sel.selected_count = slot.selected_count.get();
    sel.workspace = slot.select_workspace.get();
    // Top-k over at most 16K entries (a 256K-token row, or the candidates) takes the compact kernel.
    sel.max_entries = two_level ? candidates : max_pages;
    sel.inputs_ready = true;
    if (two_level) {  // the scores are the kept groups' pages, at their candidate offsets
      sel.position_of = slot.position_of.get();
      sel.candidates = candidates;
    }
    if (fused_two_level) {
      cuda::launch_select_two_level(tl, sel, s);
      mark_phase(slot, kScored, stream);
    } else if (whole) {
      cuda::launch_select_all_pages(sel, s);
    } else {
      cuda::launch_select_pages(sel, s);
    }
    // The group summaries are rebuilt (the first launch of two-level scoring) up to these lengths.
    if (two_level)
      for (int b = 0; b < batch; ++b) groups_of[work.rows[b]].built_tokens[static_cast<std::size_t>(work.layer)] = seq_len[b];
    // What the GPU computes: the whole selection, or what the CPU's share leaves it. The split also
    // counts the GPU's cached blocks for the stats.
    const std::int32_t* gpu_selected = slot.selected.get();
    const std::int32_t* gpu_count = slot.selected_count.get();
    std::int32_t* gpu_hits = slot.gpu_counts.host() + static_cast<std::size_t>(batch) * heads;  // mapped
    bool counting_aside = false;  // the count-only split runs on stats_stream
    if (has_cpu || cache) {
      cuda::SplitSelectionParams split;
      split.selected = slot.selected.get();
      split.selected_offset = d_sel_offset;
      split.selected_count = slot.selected_count.get();
      split.page_table = d_table;
      split.page_indptr = d_indptr;
      split.slot_of = cache ? cache->slot_of() : nullptr;
      split.batch = batch;
      split.kv_heads = heads;
      split.gpu_hits = gpu_hits;
      split.gpu_blocks = slot.gpu_counts.host();  // mapped: no copy of the counts after the merge
      if (has_cpu) {
        split.cpu_share = d_cpu_share;
        split.gpu_selected = slot.gpu_selected.get();
        split.gpu_count = slot.gpu_count.get();
        split.cpu_selected = slot.cpu_selected_host.host();  // mapped
        split.cpu_count = slot.cpu_count_host.host();
        split.q = q;
        split.q_copy = slot.q_host.host();  // mapped
        split.q_heads = shape.q_heads;
        split.head_dim = shape.head_dim;
        gpu_selected = slot.gpu_selected.get();
        gpu_count = slot.gpu_count.get();
      }
      if (has_cpu) {
        cuda::launch_split_selection(split, s);
      } else {
        HATTN_CUDA_CHECK(cudaEventRecord(stats_fork, stream));
        HATTN_CUDA_CHECK(cudaStreamWaitEvent(stats_stream, stats_fork, 0));
        cuda::launch_split_selection(split, reinterpret_cast<cuda::Stream>(stats_stream));
        HATTN_CUDA_CHECK(cudaEventRecord(stats_join, stats_stream));
        counting_aside = true;
      }
    }
    mark_phase(slot, kSelected, stream);
    if (has_cpu) enqueue_cpu_job(slot, work, sel_offset, stream);

    // open_cache() gave the cache a staging area only where the tensor-core decode reads it; with the
    // other kernel the copy would cross PCIe beside the decode's own reads, so the decode waits for
    // the admission instead.
    const bool staged = cache && cache->staging().enabled();
    if (cache) {
      CacheStepParams cp;
      cp.page_table = d_table;
      cp.page_indptr = d_indptr;
      // The whole selection: blocks the CPU computes this step are admitted too, for the GPU's next.
      cp.selected = slot.selected.get();
      cp.selected_offset = d_sel_offset;
      cp.selected_count = slot.selected_count.get();
      cp.request_of_row = d_request_row;
      cp.batch = batch;
      cp.kv_heads = heads;
      cp.layer = work.layer;
      cp.step = step;
      cp.selected_capacity = total * heads;
      cp.staged = staged;
      cache->step(cp, s, reinterpret_cast<cuda::Stream>(side_stream));
      // With a CPU share the CPU computes the misses first (the split's order) and the GPU's part is
      // mostly hits: the decode does not wait for the gather, which admits the CPU's misses behind it.
      const bool wait = config.admission == Admission::kBeforeDecode || (config.admission == Admission::kStaged && !staged);
      if (wait && !has_cpu) cache->wait_admission(s);
    }

    mark_phase(slot, kCacheWaited, stream);
    const int splits = split_count(batch);
    cuda::SparseDecodeParams dp;
    dp.q = q;
    dp.page_table = d_table;
    dp.page_indptr = d_indptr;
    dp.seq_len = d_seq_len;
    dp.selected = gpu_selected;
    dp.selected_offset = d_sel_offset;
    dp.selected_count = gpu_count;
    dp.host_pages = store.pool().pages_base();
    if (cache) {
      dp.slot_of = cache->slot_of();
      dp.hbm_slots = cache->hbm_slots();
    }
    dp.batch = batch;
    dp.q_heads = shape.q_heads;
    dp.kv_heads = heads;
    dp.head_dim = shape.head_dim;
    dp.page_size = ps;
    dp.dtype = shape.kv_dtype;
    dp.scale = scale;
    dp.splits = splits;
    dp.partial_out = slot.partial_out.get();
    dp.partial_lse = slot.partial_lse.get();
    const bool merge_in_decode = !has_cpu && fused_step();
    if (merge_in_decode) {
      // Nothing else to merge: the decode's last split of each segment merges it (no merge launch).
      dp.out = out;
      dp.arrivals = slot.decode_arrivals.get();
    }
    if (staged) {
      // The misses of the GPU's part into HBM before the decode, beside the cache's maintenance.
      dp.staging = cache->staging();
      cuda::launch_stage_blocks(cuda::stage_params_for(dp, max_pages), s);
    }
    cuda::launch_sparse_decode(dp, s);
    // The admission's gather starts here, beside the wait for the CPU's partials and the merge. With a
    // CPU share its host reads (the CPU's misses) queue ahead of their reads across PCIe; started after
    // the merge they queued ahead of the next layer's metadata copy instead (H100, 2026-12-07, fixed5:
    // wait + merge 57 -> 16 us, upload 10 -> 34 us, the step no faster; docs/performance.md).
    if (staged) cache->admit_staged(s);
    mark_phase(slot, kDecoded, stream);
    if (has_cpu) cuda::launch_wait_host_value(slot.cpu_published.host(), slot.ticket, s);
    mark_phase(slot, kGated, stream);
    if (!merge_in_decode) {  // the CPU's partials, where it has a share, join the GPU's splits
      cuda::MergeParams mp;
      mp.partial_out = slot.partial_out.get();
      mp.partial_lse = slot.partial_lse.get();
      mp.splits = splits;
      mp.extra_out = has_cpu ? slot.cpu_out.host() : nullptr;
      mp.extra_lse = has_cpu ? slot.cpu_lse.host() : nullptr;
      mp.rows = static_cast<int>(qrows);
      mp.head_dim = shape.head_dim;
      mp.out = out;
      cuda::launch_merge_partials(mp, s);
    }
    if (!has_cpu && !cache)  // the split, which writes the counts to the host, did not run
      HATTN_CUDA_CHECK(cudaMemcpyAsync(slot.gpu_counts.host(), gpu_count,
                                       static_cast<std::size_t>(batch) * heads * sizeof(std::int32_t),
                                       cudaMemcpyDeviceToHost, stream));
    if (counting_aside) HATTN_CUDA_CHECK(cudaStreamWaitEvent(stream, stats_join, 0));
    HATTN_CUDA_CHECK(cudaEventRecord(slot.end, stream));

    StepStats& st = slot.pending;
    st = StepStats{};
    st.layer = work.layer;
    st.batch = batch;
    st.generation = generation;
    st.row_ids.assign(work.rows.begin(), work.rows.end());
    st.pages_per_row = pages;
    for (int n : pages) st.total_blocks += static_cast<std::int64_t>(n) * heads;
    st.rules.assign(work.rules.begin(), work.rules.end());
    st.cpu_share.assign(work.cpu_share.begin(), work.cpu_share.end());
    slot.in_flight = true;
    slot.enqueued = true;
    last_slot[work.layer] = static_cast<int>(generation % kRing);
    st.caller_begin_us = caller_begin_us;
    st.caller_us = engine_clock_us() - caller_begin_us;
  }

  const StepStats* finished(int layer) {
    const int i = last_slot[layer];
    if (i >= 0 && slots[i].in_flight && slots[i].pending.layer == layer) {
      if (!done(slots[i])) return stats[layer].generation ? &stats[layer] : nullptr;
      finalize(slots[i]);
    }
    return stats[layer].generation ? &stats[layer] : nullptr;
  }

  const StepStats& wait(int layer) {
    const int i = last_slot[layer];
    if (i >= 0 && slots[i].in_flight && slots[i].pending.layer == layer) finalize(slots[i]);
    return stats[layer];
  }
};

bool GpuSide::device_present(std::string& why) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    why = e == cudaSuccess ? "no CUDA device" : concat("cudaGetDeviceCount: ", cudaGetErrorString(e));
    cudaGetLastError();
    return false;
  }
  return true;
}

GpuSide::GpuSide(const Config& config, PagedKVStore& store, CpuSide& cpu)
    : impl_(std::make_unique<Impl>(config, store, cpu)) {}
GpuSide::~GpuSide() = default;

void GpuSide::stage_from_device(const TensorView& keys, const TensorView& values, cuda::Stream stream,
                                TensorView& host_keys, TensorView& host_values) {
  const PageLayout& l = impl_->store.layout();
  const std::int64_t n = keys.rank > 0 ? keys.shape[0] : -1;
  require_tensor(keys, "HybridAttention::append", "keys", l.dtype, {-1, l.kv_heads, l.head_dim});
  require_tensor(values, "HybridAttention::append", "values", l.dtype, {n, l.kv_heads, l.head_dim});
  require(keys.device == values.device, "HybridAttention::append", "values.device", to_string(values.device),
          "the device of keys");
  const std::size_t bytes = static_cast<std::size_t>(keys.numel()) * dtype_bytes(l.dtype);
  impl_->stage_keys.reserve(bytes);
  impl_->stage_values.reserve(bytes);
  const cudaStream_t st = native(stream);
  HATTN_CUDA_CHECK(cudaMemcpyAsync(impl_->stage_keys.host(), keys.data, bytes, cudaMemcpyDeviceToHost, st));
  HATTN_CUDA_CHECK(cudaMemcpyAsync(impl_->stage_values.host(), values.data, bytes, cudaMemcpyDeviceToHost, st));
  HATTN_CUDA_CHECK(cudaStreamSynchronize(st));
  host_keys = keys;
  host_keys.data = impl_->stage_keys.host();
  host_keys.device = Device::kHost;
  host_values = values;
  host_values.data = impl_->stage_values.host();
  host_values.device = Device::kHost;
}

void GpuSide::upload_summaries(std::span<const PageId> pages, cuda::Stream stream) {
  const std::size_t sb = impl_->store.layout().summary_bytes();
  std::size_t i = 0;
  while (i < pages.size()) {
    std::size_t j = i + 1;
    while (j < pages.size() && pages[j] == pages[j - 1] + 1) ++j;  // contiguous ids: one copy
    HATTN_CUDA_CHECK(cudaMemcpyAsync(impl_->summaries.get() + static_cast<std::size_t>(pages[i]) * sb,
                                     impl_->store.pool().summary(pages[i]), (j - i) * sb, cudaMemcpyHostToDevice,
                                     native(stream)));
    i = j;
  }
}

void GpuSide::release(SeqId seq) {
  // Pages may still be read by enqueued work; wait for it before they return to the pool.
  for (auto& slot : impl_->slots) impl_->finalize(slot);
  impl_->release_groups(seq);
  auto it = impl_->request_of.find(seq);
  if (it == impl_->request_of.end()) return;
  impl_->cache->release(it->second);
  impl_->free_requests.push_back(it->second);
  impl_->request_of.erase(it);
}

void GpuSide::prepare(std::span<const SeqId> rows) { impl_->prepare(rows); }
void GpuSide::run(const LayerWork& work, const float* q, float* out, cuda::Stream stream, std::uint64_t generation,
                  double caller_begin_us) {
  impl_->run(work, q, out, stream, generation, caller_begin_us);
}
const StepStats* GpuSide::finished(int layer) { return impl_->finished(layer); }
const StepStats& GpuSide::wait(int layer) { return impl_->wait(layer); }
double GpuSide::hbm_hit_rate() const noexcept { return impl_->hit_rate; }
std::int64_t GpuSide::hbm_slots() const noexcept { return impl_->cache ? impl_->cache->config().slots : 0; }
CacheStepStats GpuSide::cache_step_stats() { return impl_->cache ? impl_->cache->step_stats() : CacheStepStats{}; }

}  // namespace hattn::detail
