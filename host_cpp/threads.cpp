#include "threads.hpp"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace hetero_host {

namespace {

struct Job {
  const std::function<void(size_t)>* fn = nullptr;
  size_t n = 0;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  int helpers_wanted = 0;  // guarded by the pool's mutex
  std::mutex mu;
  std::condition_variable cv;
  std::exception_ptr error;  // guarded by mu
};

void work_on(Job& job) {
  for (;;) {
    const size_t i = job.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= job.n) return;
    try {
      (*job.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(job.mu);
      if (!job.error) job.error = std::current_exception();
    }
    if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job.n) {
      std::lock_guard<std::mutex> lk(job.mu);
      job.cv.notify_all();
    }
  }
}

size_t env_threads() {
  if (const char* s = std::getenv("HETERO_HOST_THREADS")) {
    const long v = std::strtol(s, nullptr, 10);
    if (v > 0) return static_cast<size_t>(std::min(v, 256L));
  }
  return std::max<size_t>(1, std::thread::hardware_concurrency());
}

// How long an idle worker keeps polling for the next job before it sleeps: a job posted
// within this window starts without a futex wake-up (tens of microseconds on a VM).
std::chrono::microseconds spin_window() {
  if (const char* s = std::getenv("HETERO_HOST_SPIN_US")) return std::chrono::microseconds(std::strtol(s, nullptr, 10));
  return std::chrono::microseconds(20);
}

class Pool {
 public:
  Pool() : threads_(env_threads()), spin_(spin_window()) {}

  size_t threads() const { return threads_.load(std::memory_order_relaxed); }
  void set_threads(size_t n) {
    threads_.store(n ? std::min<size_t>(n, 256) : env_threads(), std::memory_order_relaxed);
  }

  void run(size_t n, const std::function<void(size_t)>& fn, size_t threads) {
    threads = std::min(threads ? threads : this->threads(), n);
    if (threads <= 1) {
      for (size_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lk(mu_);
      spawn_locked(threads - 1);
      job->helpers_wanted = static_cast<int>(threads - 1);
      queue_.push_back(job);
      pending_.fetch_add(1, std::memory_order_release);
    }
    if (threads > 2) cv_.notify_all(); else cv_.notify_one();
    work_on(*job);
    {
      std::lock_guard<std::mutex> lk(mu_);
      auto it = std::find(queue_.begin(), queue_.end(), job);
      if (it != queue_.end()) {
        queue_.erase(it);
        pending_.fetch_sub(1, std::memory_order_relaxed);
      }
    }
    if (job->done.load(std::memory_order_acquire) != n) {
      std::unique_lock<std::mutex> lk(job->mu);
      job->cv.wait(lk, [&] { return job->done.load(std::memory_order_acquire) == n; });
    }
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> lk(job->mu);
      error = job->error;
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  void spawn_locked(size_t workers) {
    while (workers_ < workers) {
      std::thread([this] { worker(); }).detach();  // the pool lives until the process ends
      ++workers_;
    }
  }

  void worker() {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + spin_;
      while (pending_.load(std::memory_order_acquire) == 0 && std::chrono::steady_clock::now() < until) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return !queue_.empty(); });
        job = queue_.front();
        if (--job->helpers_wanted <= 0) {
          queue_.pop_front();
          pending_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      work_on(*job);
    }
  }

  std::atomic<size_t> threads_;
  std::chrono::microseconds spin_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::atomic<size_t> pending_{0};
  size_t workers_ = 0;  // guarded by mu_
};

// Never destroyed: workers may still be parked when the interpreter exits. A forked child
// starts with a fresh pool (the parent's workers do not exist there).
Pool* g_pool = nullptr;
std::once_flag g_once;

void after_fork_in_child() { g_pool = new Pool(); }

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
  });
  return *g_pool;
}

}  // namespace

size_t num_threads() { return pool().threads(); }
void set_num_threads(size_t n) { pool().set_threads(n); }

void parallel_for(size_t n, const std::function<void(size_t)>& fn, size_t threads) { pool().run(n, fn, threads); }

size_t threads_for(double work, double min_per_thread) {
  const double t = work / std::max(min_per_thread, 1.0);
  const size_t cap = num_threads();
  if (t < 2.0) return 1;
  return std::min(cap, static_cast<size_t>(t));
}

}  // namespace hetero_host
