#pragma once
// A small fork-join pool of std::threads for the CPU backend and the reference models
// (docs/threading.md).
//
// Why not OpenMP: diffgrad is header-only, and `#pragma omp` in a header does nothing unless the
// CONSUMER compiles with -fopenmp (and then links libgomp or libomp, whichever its compiler
// brings); a pool of std::threads works with every C++20 compiler and flag set, and ThreadSanitizer
// understands it (libgomp's own synchronisation is invisible to TSan and reports false races).
//
// Design:
//   - a pool of T participants: the calling thread is participant 0, T - 1 workers are the rest;
//   - parallel_for(count, body) splits [0, count) into T contiguous ranges, range p for
//     participant p, and returns when all are done. Callers make their results independent of
//     that split (elementwise work, or fixed chunks whose partials are combined in chunk order),
//     so every T gives the same bits;
//   - dispatch does not allocate: the body is passed as (function pointer, context pointer) to
//     the workers, which sleep on a condition variable between jobs (no spinning: the pool
//     costs nothing while a model runs);
//   - nesting: a call from inside a parallel_for (on a worker or on the calling participant),
//     from inside an OpenMP parallel region (when compiled with OpenMP), or while another thread
//     is using the same pool runs the whole range inline on the calling thread. The result is
//     the same either way; only the speed differs;
//   - fork(): a child process has no workers (only the forking thread survives), so in a child
//     every call runs inline and the destructor detaches instead of joining (POSIX only).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "diffgrad/core/error.hpp"
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define DIFFGRAD_POOL_HAS_GETPID 1
#endif

namespace diffgrad::detail {

/// True on a thread that is currently executing a range of some pool's parallel_for (workers
/// always while they run a job; the calling participant during its own share).
inline bool& inside_parallel_region() {
  thread_local bool inside = false;
  return inside;
}

class ThreadPool {
public:
  /// The most participants a pool takes (also the width of the participation mask).
  static constexpr int kMaxThreads = 64;

  /// A pool of `threads` participants (the caller and threads - 1 workers), 1..kMaxThreads.
  explicit ThreadPool(int threads) : size_(threads), owner_pid_(current_pid()) {
    if (threads < 1 || threads > kMaxThreads)
      throw_argument("ThreadPool", "threads", concat("1..", kMaxThreads), threads);
    workers_.reserve(static_cast<std::size_t>(threads - 1));
    for (int p = 1; p < threads; ++p) workers_.emplace_back([this, p] { worker_loop(p); });
  }
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() {
    if (forked()) { // the workers do not exist in this process: joining would wait forever
      for (std::thread& t : workers_) t.detach();
      return;
    }
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (std::thread& t : workers_) t.join();
  }

  int size() const { return size_; }

  /// Runs body(begin, end) on contiguous sub-ranges covering [0, count) exactly once, one range
  /// per participant (participant p gets [p*count/T, (p+1)*count/T)), and returns when all are
  /// done. The first exception thrown by a range is rethrown here after every range finished.
  /// Runs inline (one call body(0, count)) when T = 1, count <= 1, or when nested (see above).
  template <class Body> void parallel_for(std::int64_t count, Body&& body) {
    if (count <= 0) return;
    if (size_ == 1 || count == 1 || must_run_inline() || forked() || busy_.exchange(true)) {
      run_inline(count, body);
      return;
    }
    using B = std::remove_reference_t<Body>;
    const auto invoke = [](void* ctx, std::int64_t begin, std::int64_t end) {
      (*static_cast<B*>(ctx))(begin, end);
    };
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      job_ = invoke;
      context_ = erase(body);
      count_ = count;
      pending_ = size_ - 1;
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    run_share(0, invoke, erase(body), count);
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      done_.wait(lock, [this] { return pending_ == 0; });
      error = error_;
      error_ = nullptr;
      job_ = nullptr;
    }
    busy_.store(false);
    if (error) std::rethrow_exception(error);
  }

  /// Bit p is set once participant p has executed a non-empty range (since the last reset):
  /// lets tests assert that T threads really ran.
  std::uint64_t participation_mask() const { return participated_.load(); }
  void reset_participation() { participated_.store(0); }
  /// Calls of parallel_for that were dispatched to the workers (not run inline).
  std::int64_t dispatches() const { return dispatches_.load(); }

private:
  using Invoke = void (*)(void*, std::int64_t, std::int64_t);

  /// The body's address as the untyped context of a job (invoke casts it back to B*, which
  /// keeps the body's constness).
  template <class B> static void* erase(B& body) {
    return const_cast<void*>(static_cast<const void*>(std::addressof(body)));
  }

  static long current_pid() {
#if defined(DIFFGRAD_POOL_HAS_GETPID)
    return static_cast<long>(::getpid());
#else
    return 0;
#endif
  }
  /// True in a child process forked after the pool started its workers.
  bool forked() const { return current_pid() != owner_pid_; }

  static bool must_run_inline() {
    if (inside_parallel_region()) return true;
#if defined(_OPENMP)
    if (omp_in_parallel()) return true; // inside the user's own OpenMP team: don't multiply
#endif
    return false;
  }

  template <class Body> void run_inline(std::int64_t count, Body& body) {
    const bool was_inside = inside_parallel_region();
    inside_parallel_region() = true; // nested calls from body stay inline
    struct Restore {
      bool value;
      ~Restore() { inside_parallel_region() = value; }
    } restore{was_inside};
    body(std::int64_t{0}, count);
  }

  void run_share(int p, Invoke invoke, void* ctx, std::int64_t count) {
    const std::int64_t begin = count * p / size_, end = count * (p + 1) / size_;
    if (begin >= end) return;
    participated_.fetch_or(std::uint64_t{1} << p);
    if (p == 0) dispatches_.fetch_add(1);
    const bool was_inside = inside_parallel_region();
    inside_parallel_region() = true;
    try {
      invoke(ctx, begin, end);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
    inside_parallel_region() = was_inside;
  }

  void worker_loop(int p) {
#if defined(_OPENMP)
    // Eigen's GEMM parallelises itself with OpenMP when the consumer compiles with it: inside
    // a worker that would multiply the thread count (and change the GEMM's blocking).
    omp_set_num_threads(1);
#endif
    std::uint64_t seen = 0;
    for (;;) {
      Invoke invoke = nullptr;
      void* ctx = nullptr;
      std::int64_t count = 0;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        invoke = job_;
        ctx = context_;
        count = count_;
      }
      run_share(p, invoke, ctx, count);
      // Notified under the lock: once pending_ reaches 0 the caller may return and destroy the
      // pool, so this thread must not touch done_ after releasing mutex_.
      const std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  int size_;
  long owner_pid_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  std::uint64_t generation_ = 0;
  Invoke job_ = nullptr;
  void* context_ = nullptr;
  std::int64_t count_ = 0;
  int pending_ = 0;
  std::exception_ptr error_;
  std::atomic<bool> busy_{false};
  std::atomic<std::uint64_t> participated_{0};
  std::atomic<std::int64_t> dispatches_{0};
};

/// The process-wide pool of `threads` participants (created on first use, kept until exit), so
/// every backend and model asking for T threads shares one set of T - 1 workers: constructing
/// or copying a backend never starts threads in a loop. Null for threads == 1 (no pool).
inline std::shared_ptr<ThreadPool> shared_thread_pool(int threads) {
  if (threads < 1 || threads > ThreadPool::kMaxThreads)
    throw_argument("diffgrad thread count", "threads", concat("1..", ThreadPool::kMaxThreads),
                   threads);
  if (threads == 1) return nullptr;
  static std::mutex registry_mutex;
  static std::map<int, std::shared_ptr<ThreadPool>> registry;
  const std::lock_guard<std::mutex> lock(registry_mutex);
  std::shared_ptr<ThreadPool>& pool = registry[threads];
  if (!pool) pool = std::make_shared<ThreadPool>(threads);
  return pool;
}

/// The hardware's thread count (at least 1), capped at ThreadPool::kMaxThreads.
inline int hardware_threads() {
  const unsigned n = std::thread::hardware_concurrency();
  return std::clamp(static_cast<int>(n == 0 ? 1u : n), 1, ThreadPool::kMaxThreads);
}

/// Threads from the environment variable DIFFGRAD_NUM_THREADS: unset or empty -> 1; a number
/// 1..64 -> that number; "0" or "auto" -> the hardware's thread count. Anything else is refused
/// with an error naming the variable (a typo should not silently run on one core).
inline int threads_from_environment() {
  const char* value = std::getenv("DIFFGRAD_NUM_THREADS");
  if (value == nullptr || *value == '\0') return 1;
  const std::string text(value);
  if (text == "auto") return hardware_threads();
  char* end = nullptr;
  const long n = std::strtol(value, &end, 10);
  if (end == value || *end != '\0' || n < 0 || n > ThreadPool::kMaxThreads)
    throw invalid_argument(concat("environment variable DIFFGRAD_NUM_THREADS: expected 1..",
                                  ThreadPool::kMaxThreads,
                                  ", 0 or \"auto\" (all hardware "
                                  "threads), got \"",
                                  text, "\""));
  return n == 0 ? hardware_threads() : static_cast<int>(n);
}

/// What backends and models hold: the pool (null = single-threaded) and its thread count.
/// Copying it copies a shared_ptr (cheap; the pool is shared, never duplicated).
class ThreadHandle {
public:
  ThreadHandle() = default;
  explicit ThreadHandle(int threads) : pool_(shared_thread_pool(threads)) {}
  int threads() const { return pool_ ? pool_->size() : 1; }
  ThreadPool* pool() const { return pool_.get(); }
  const std::shared_ptr<ThreadPool>& shared() const { return pool_; }

  /// body(begin, end) over [0, count): on the pool when there is one, else inline.
  template <class Body> void parallel_for(std::int64_t count, Body&& body) const {
    if (count <= 0) return;
    if (pool_)
      pool_->parallel_for(count, body);
    else
      body(std::int64_t{0}, count);
  }

private:
  std::shared_ptr<ThreadPool> pool_;
};

} // namespace diffgrad::detail
