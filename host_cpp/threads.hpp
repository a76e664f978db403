// A small persistent thread pool for the shim's kernels. The calling thread always takes
// part and can finish a job alone, so calls from many Python threads at once (each with the
// GIL released) never deadlock: they share the workers, first come first served.
#pragma once

#include <cstddef>
#include <functional>

namespace hetero_host {

// Threads a kernel may use (the caller included): HETERO_HOST_THREADS if set, else the
// hardware's (at most 256). set_num_threads(0) restores that default.
size_t num_threads();
void set_num_threads(size_t n);

// Runs fn(i) for every i in [0, n) on up to `threads` threads (0 = num_threads()), tasks
// handed out dynamically; returns when all are done. The first exception is rethrown.
void parallel_for(size_t n, const std::function<void(size_t)>& fn, size_t threads = 0);

// Threads worth using for `work` units when one thread should get at least `min_per_thread`.
size_t threads_for(double work, double min_per_thread);

}  // namespace hetero_host
