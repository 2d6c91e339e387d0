#include "hattn/core/thread_pool.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace hattn {
namespace {

// One 64-bit word carries the whole hand-off, so joining a job and publishing the next one can never
// interleave: [generation: 32][closed: 1][active workers: 31]. A worker joins generation g only by a
// CAS from a state of generation g that is not closed; the caller closes the job and waits for the
// active count to reach zero before it returns, so no worker touches a job's fields afterwards.
constexpr std::uint64_t kGenerationOne = std::uint64_t{1} << 32;
constexpr std::uint64_t kClosed = std::uint64_t{1} << 31;
constexpr std::uint64_t kActiveMask = kClosed - 1;

constexpr std::uint64_t generation_of(std::uint64_t s) noexcept { return s >> 32; }

// A decode step issues one CPU call per layer, and the GPU work between two layers takes roughly
// 50-200 us (DESIGN.md, H100 figures), so workers that spin for 1 ms after their last job are awake
// for every call of a step, and sleep between steps when the engine is idle.
constexpr auto kSpinFor = std::chrono::microseconds(1000);

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

struct ThreadPool::Impl {
  explicit Impl(int threads) : size(threads) {
    workers.reserve(static_cast<std::size_t>(size - 1));
    for (int w = 1; w < size; ++w) workers.emplace_back([this, w] { worker_loop(w); });
  }

  ~Impl() {
    stopping.store(true, std::memory_order_seq_cst);
    state.fetch_add(kGenerationOne, std::memory_order_seq_cst);
    state.notify_all();
    for (auto& t : workers) t.join();
  }

  void run_tasks(int worker) {
    const Where saved = where;
    where = {this, worker};
    for (;;) {
      const std::int64_t i = next_task.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_tasks) break;
      try {
        (*fn)(i, worker);
      } catch (...) {
        std::lock_guard lock(error_mutex);
        if (!error) error = std::current_exception();
        next_task.store(n_tasks, std::memory_order_relaxed);  // skip what has not started
      }
    }
    where = saved;
  }

  // Returns the first state whose generation differs from `seen`: spinning for kSpinFor, then asleep.
  std::uint64_t wait_for_job(std::uint64_t seen) {
    auto changed = [&](std::uint64_t s) { return generation_of(s) != seen; };
    const auto spin_until = std::chrono::steady_clock::now() + kSpinFor;
    for (unsigned spins = 0;; ++spins) {
      const std::uint64_t s = state.load(std::memory_order_acquire);
      if (changed(s)) return s;
      cpu_relax();
      if ((spins & 255u) == 255u && std::chrono::steady_clock::now() > spin_until) break;
    }
    // Announce the sleep before the last check; the publisher stores the state and then reads
    // `sleepers` (both seq_cst), so either it sees us and notifies, or we see its new state.
    sleepers.fetch_add(1, std::memory_order_seq_cst);
    std::uint64_t s = state.load(std::memory_order_seq_cst);
    while (!changed(s)) {
      state.wait(s, std::memory_order_seq_cst);
      s = state.load(std::memory_order_seq_cst);
    }
    sleepers.fetch_sub(1, std::memory_order_relaxed);
    return s;
  }

  void worker_loop(int worker) {
    // Generation 0 is never a job, so a worker started late still sees the first job or the stop.
    std::uint64_t seen = 0;
    for (;;) {
      std::uint64_t s = wait_for_job(seen);
      if (stopping.load(std::memory_order_acquire)) return;
      seen = generation_of(s);
      while (generation_of(s) == seen && (s & kClosed) == 0) {
        if (state.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
          run_tasks(worker);
          state.fetch_sub(1, std::memory_order_release);
          break;
        }
      }
    }
  }

  void parallel_for(std::int64_t n, const std::function<void(std::int64_t, int)>& f) {
    if (n <= 0) return;
    if (where.pool == this) {  // called from inside one of our own tasks: no one is left to help
      for (std::int64_t i = 0; i < n; ++i) f(i, where.worker);
      return;
    }
    std::lock_guard call_lock(call_mutex);
    fn = &f;
    n_tasks = n;
    error = nullptr;
    next_task.store(0, std::memory_order_relaxed);
    if (size > 1) {
      const std::uint64_t g = generation_of(state.load(std::memory_order_relaxed)) + 1;
      state.store(g << 32, std::memory_order_seq_cst);  // publishes fn, n_tasks, next_task
      if (sleepers.load(std::memory_order_seq_cst) > 0) state.notify_all();
    }
    run_tasks(0);
    if (size > 1) {
      state.fetch_or(kClosed, std::memory_order_acq_rel);
      // Joined workers are inside tasks that started before ours ran out: a short wait.
      while ((state.load(std::memory_order_acquire) & kActiveMask) != 0) cpu_relax();
    }
    fn = nullptr;
    if (error) {
      std::exception_ptr e = error;
      error = nullptr;
      std::rethrow_exception(e);
    }
  }

  struct Where {
    Impl* pool = nullptr;
    int worker = 0;
  };
  static thread_local Where where;

  const int size;
  std::vector<std::thread> workers;
  std::mutex call_mutex;  // serialises callers
  std::atomic<std::uint64_t> state{0};
  std::atomic<int> sleepers{0};
  std::atomic<bool> stopping{false};
  // The job; written by the caller before it publishes the generation, read by joined workers.
  const std::function<void(std::int64_t, int)>* fn = nullptr;
  std::int64_t n_tasks = 0;
  std::atomic<std::int64_t> next_task{0};
  std::mutex error_mutex;
  std::exception_ptr error;
};

thread_local ThreadPool::Impl::Where ThreadPool::Impl::where;

ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  impl_ = std::make_unique<Impl>(threads);
}

ThreadPool::~ThreadPool() = default;

int ThreadPool::size() const noexcept { return impl_->size; }

void ThreadPool::parallel_for(std::int64_t n_tasks, const std::function<void(std::int64_t, int)>& fn) {
  impl_->parallel_for(n_tasks, fn);
}

}  // namespace hattn
