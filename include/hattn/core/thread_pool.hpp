#pragma once
// A persistent pool of worker threads for the CPU kernels: started once, no thread creation per call,
// workers spin briefly before sleeping so ~100 us tasks start with low latency.
#include <cstdint>
#include <functional>
#include <memory>

namespace hattn {

class ThreadPool {
 public:
  /// threads <= 0 means one per hardware thread. The calling thread counts as one worker of
  /// parallel_for, so `threads - 1` threads are started.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  /// Workers, including the calling thread.
  int size() const noexcept;
  /// Runs fn(task, worker) for task in [0, n_tasks) on all workers and the caller, and returns when
  /// every task is done. worker is in [0, size()); the caller is worker 0. Tasks are handed out
  /// dynamically (an atomic counter), so uneven tasks balance. Calls from several threads are
  /// serialised; a call made from inside fn runs its tasks inline on that thread.
  /// An exception thrown by fn is rethrown here once no task is running; tasks not yet started when
  /// it was thrown are skipped. fn is called through a reference: pass a callable small enough for
  /// std::function's inline storage (two pointers) to keep the call free of allocation.
  void parallel_for(std::int64_t n_tasks, const std::function<void(std::int64_t task, int worker)>& fn);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace hattn
