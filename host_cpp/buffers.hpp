// Page-aligned host buffers, kept in a pool and reused across calls.
//
// Lifetime: a HostBuffer owns its block until its destructor runs, and only then does the
// block go back to the pool's free list. Python sees HostBuffer through a shared_ptr holder;
// every buffer-protocol export (numpy.frombuffer, memoryview, torch.frombuffer) and every
// array the shim returns on top of a buffer holds a reference to the Python HostBuffer
// object, so the destructor runs only once no view of the memory is alive. The pool's state
// is shared with its buffers, so buffers may outlive the BufferPool object itself.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace hetero_host {

namespace py = pybind11;

constexpr size_t kAlignment = 4096;

struct PoolState {
  explicit PoolState(size_t max_cached) : max_cached_bytes(max_cached) {}
  ~PoolState();
  PoolState(const PoolState&) = delete;
  PoolState& operator=(const PoolState&) = delete;

  // A block of at least `capacity` bytes (a multiple of kAlignment): reused or fresh.
  void* take(size_t capacity, size_t& got_capacity);
  void give_back(void* ptr, size_t capacity);
  void clear();

  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // capacity -> block
  size_t max_cached_bytes;
  size_t allocated_bytes = 0;  // held from the system: in use + free
  size_t free_bytes = 0;
  size_t in_use_buffers = 0;
  uint64_t hits = 0, misses = 0;
};

class HostBuffer {
 public:
  HostBuffer(std::shared_ptr<PoolState> pool, size_t nbytes);
  ~HostBuffer();
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  void* data() const { return ptr_; }
  size_t nbytes() const { return nbytes_; }
  size_t capacity() const { return capacity_; }

 private:
  std::shared_ptr<PoolState> pool_;
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
  size_t capacity_ = 0;
};

class BufferPool {
 public:
  explicit BufferPool(size_t max_cached_bytes);
  std::shared_ptr<HostBuffer> acquire(size_t nbytes) const;
  py::dict stats() const;
  void clear() const;
  size_t max_cached_bytes() const;
  void set_max_cached_bytes(size_t n) const;

 private:
  std::shared_ptr<PoolState> state_;
};

std::shared_ptr<BufferPool> default_pool();

// A writable numpy array of `shape` and `dtype` over a fresh buffer from the default pool;
// the array keeps the buffer alive (its base is the HostBuffer).
py::array pooled_array(const py::dtype& dtype, const std::vector<py::ssize_t>& shape);

void register_buffers(py::module_& m);

}  // namespace hetero_host
