// parallel_rows: a parallel for over output rows in which the caller never waits for a thread
// that has not started yet.
//
// Why not at::parallel_for (OpenMP): a parallel region ends in a barrier that waits for every
// thread of the team. On a machine whose cores are shared (our 2-core machines run several
// jobs at once) a woken OpenMP worker can wait milliseconds for a core, and the caller waits
// with it: measured at load ~10, a 100 us GEMV took ~16 ms with 2 OpenMP threads.
// Here the rows are cut into chunks claimed from an atomic counter. The caller claims chunks
// too, and when none are left waits only for chunks a helper has already claimed (a helper
// that claimed one is running). A helper that wakes late finds no work left. Correctness never
// depends on the helpers: with one thread, or in a child made by fork() (which inherits no
// threads), the caller simply does every chunk.
#pragma once

#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace lmstack {

using ChunkFn = std::function<void(int64_t)>;

class HelperPool {
 public:
  // fn(c) for every c in [0, n_chunks): on the calling thread and up to `helpers` others.
  static void run(int64_t n_chunks, int helpers, const ChunkFn& fn) {
    helpers = static_cast<int>(std::min<int64_t>(helpers, n_chunks - 1));
    if (helpers <= 0) {
      for (int64_t c = 0; c < n_chunks; ++c) fn(c);
      return;
    }
    instance().dispatch(n_chunks, helpers, fn);
  }

 private:
  struct Job {
    const ChunkFn* fn;  // the caller's; called only for claimed chunks, all done before the caller returns
    int64_t n;
    std::atomic<int64_t> next{0}, done{0};
    void work() {
      for (int64_t c; (c = next.fetch_add(1)) < n;) {
        (*fn)(c);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  static HelperPool& instance() {
    // one pool per process, never destroyed (its threads sleep until exit); a fork()ed child
    // gets a new one, since the parent's threads (and maybe a held mutex) did not come along
    static std::mutex m;
    static HelperPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(m);
    if (pool == nullptr || owner != getpid()) {
      pool = new HelperPool();
      owner = getpid();
    }
    return *pool;
  }

  void dispatch(int64_t n, int helpers, const ChunkFn& fn) {
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_) < helpers) {
        std::thread([this] { loop(); }).detach();
        ++threads_;
      }
      job_ = job;
      ++epoch_;
    }
    cv_.notify_all();
    job->work();
    while (job->done.load(std::memory_order_acquire) < n) std::this_thread::yield();  // claimed chunks only
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return epoch_ != seen; });
        seen = epoch_;
        job = job_;  // shared: a late helper may hold a finished job; it then finds no chunk left
      }
      job->work();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  uint64_t epoch_ = 0;
  int threads_ = 0;
};

// fn(begin, end) over [0, n) in chunks of at least `grain` rows, about 4 chunks a thread
// (so a helper that starts late still takes a share), on at::get_num_threads() threads.
inline void parallel_rows(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  const int threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + 4 * threads - 1) / (4 * threads));
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  HelperPool::run(n_chunks, threads - 1, [&](int64_t c) { fn(c * chunk, std::min(n, (c + 1) * chunk)); });
}

}  // namespace lmstack
