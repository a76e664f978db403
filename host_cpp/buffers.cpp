#include "buffers.hpp"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <new>
#include <sstream>
#include <vector>

#include "common.hpp"

namespace hetero_host {

namespace {

size_t round_capacity(size_t nbytes) {
  if (nbytes > SIZE_MAX - kAlignment) throw std::bad_alloc();
  const size_t cap = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  return cap ? cap : kAlignment;
}

}  // namespace

PoolState::~PoolState() { clear(); }

void* PoolState::take(size_t capacity, size_t& got_capacity) {
  {
    std::lock_guard<std::mutex> lk(mu);
    // Best fit, but never hand a block more than twice the request (plus a page) to a
    // small request: that memory would sit idle while it is in use.
    auto it = free_blocks.lower_bound(capacity);
    if (it != free_blocks.end() && it->first <= 2 * capacity + kAlignment) {
      void* ptr = it->second;
      got_capacity = it->first;
      free_bytes -= it->first;
      free_blocks.erase(it);
      ++hits;
      ++in_use_buffers;
      return ptr;
    }
    ++misses;
  }
  void* ptr = std::aligned_alloc(kAlignment, capacity);
  if (!ptr) {
    std::lock_guard<std::mutex> lk(mu);
    --misses;
    throw std::bad_alloc();
  }
  std::lock_guard<std::mutex> lk(mu);
  allocated_bytes += capacity;
  ++in_use_buffers;
  got_capacity = capacity;
  return ptr;
}

void PoolState::give_back(void* ptr, size_t capacity) {
  std::vector<void*> release;
  {
    std::lock_guard<std::mutex> lk(mu);
    --in_use_buffers;
    free_blocks.emplace(capacity, ptr);
    free_bytes += capacity;
    // Over the cache limit: drop the largest free blocks first (the cheapest to recreate
    // per byte), which may be this one.
    while (free_bytes > max_cached_bytes && !free_blocks.empty()) {
      auto last = std::prev(free_blocks.end());
      free_bytes -= last->first;
      allocated_bytes -= last->first;
      release.push_back(last->second);
      free_blocks.erase(last);
    }
  }
  for (void* p : release) std::free(p);
}

void PoolState::clear() {
  std::multimap<size_t, void*> blocks;
  {
    std::lock_guard<std::mutex> lk(mu);
    blocks.swap(free_blocks);
    allocated_bytes -= free_bytes;
    free_bytes = 0;
  }
  for (auto& kv : blocks) std::free(kv.second);
}

HostBuffer::HostBuffer(std::shared_ptr<PoolState> pool, size_t nbytes) : pool_(std::move(pool)), nbytes_(nbytes) {
  ptr_ = pool_->take(round_capacity(nbytes), capacity_);
}

HostBuffer::~HostBuffer() {
  if (ptr_) pool_->give_back(ptr_, capacity_);
}

BufferPool::BufferPool(size_t max_cached_bytes) : state_(std::make_shared<PoolState>(max_cached_bytes)) {}

std::shared_ptr<HostBuffer> BufferPool::acquire(size_t nbytes) const {
  return std::make_shared<HostBuffer>(state_, nbytes);
}

py::dict BufferPool::stats() const {
  py::dict d;
  std::lock_guard<std::mutex> lk(state_->mu);
  d["allocated_bytes"] = state_->allocated_bytes;
  d["in_use_bytes"] = state_->allocated_bytes - state_->free_bytes;
  d["in_use_buffers"] = state_->in_use_buffers;
  d["free_bytes"] = state_->free_bytes;
  d["free_buffers"] = state_->free_blocks.size();
  d["hits"] = state_->hits;
  d["misses"] = state_->misses;
  d["max_cached_bytes"] = state_->max_cached_bytes;
  return d;
}

void BufferPool::clear() const { state_->clear(); }

size_t BufferPool::max_cached_bytes() const {
  std::lock_guard<std::mutex> lk(state_->mu);
  return state_->max_cached_bytes;
}

void BufferPool::set_max_cached_bytes(size_t n) const {
  {
    std::lock_guard<std::mutex> lk(state_->mu);
    state_->max_cached_bytes = n;
  }
  if (n == 0) state_->clear();
}

std::shared_ptr<BufferPool> default_pool() {
  // Leaked on purpose: arrays over its buffers may be freed during interpreter shutdown.
  static auto* pool = new std::shared_ptr<BufferPool>(std::make_shared<BufferPool>(size_t(1) << 30));
  return *pool;
}

py::array pooled_array(const py::dtype& dtype, const std::vector<py::ssize_t>& shape) {
  size_t count = 1;
  for (auto s : shape) count *= static_cast<size_t>(s);
  const size_t nbytes = count * static_cast<size_t>(dtype.itemsize());
  std::shared_ptr<HostBuffer> buf = default_pool()->acquire(nbytes);
  void* ptr = buf->data();
  py::object owner = py::cast(std::move(buf));
  return py::array(dtype, shape, {}, ptr, owner);
}

void register_buffers(py::module_& m) {
  py::class_<HostBuffer, std::shared_ptr<HostBuffer>>(m, "HostBuffer", py::buffer_protocol(), R"doc(
A 4 KiB-aligned block of host memory from a BufferPool. Exposes the buffer protocol as a
writable 1-D uint8 buffer of `nbytes` bytes: numpy.frombuffer(buf, dtype), numpy.asarray(buf),
memoryview(buf), torch.frombuffer(buf, dtype=...). Every such view holds a reference to the
buffer; the memory returns to its pool only when the buffer and all its views are gone.)doc")
      .def_buffer([](HostBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.nbytes())}, {py::ssize_t(1)}, false);
      })
      .def_property_readonly("address", [](const HostBuffer& b) { return reinterpret_cast<uintptr_t>(b.data()); },
                             "The buffer's start address (a multiple of 4096).")
      .def_property_readonly("nbytes", &HostBuffer::nbytes, "Bytes requested (the buffer's length).")
      .def_property_readonly("capacity", &HostBuffer::capacity, "Bytes held (a multiple of 4096, >= nbytes).")
      .def("__len__", &HostBuffer::nbytes)
      .def("__repr__", [](const HostBuffer& b) {
        std::ostringstream s;
        s << "HostBuffer(address=0x" << std::hex << reinterpret_cast<uintptr_t>(b.data()) << std::dec
          << ", nbytes=" << b.nbytes() << ")";
        return s.str();
      });

  py::class_<BufferPool, std::shared_ptr<BufferPool>>(m, "BufferPool", R"doc(
A thread-safe pool of 4 KiB-aligned host buffers, reused across calls. A buffer returns to
the pool when neither it nor any view of it is alive; up to `max_cached_bytes` of returned
buffers are kept for reuse (the largest are freed first beyond that).)doc")
      .def(py::init([](int64_t max_cached_bytes) {
             if (max_cached_bytes < 0) fail_value("BufferPool: max_cached_bytes must be >= 0");
             return std::make_shared<BufferPool>(static_cast<size_t>(max_cached_bytes));
           }),
           py::arg("max_cached_bytes") = int64_t(1) << 30)
      .def(
          "acquire",
          [](const BufferPool& p, int64_t nbytes) {
            if (nbytes < 0) fail_value("BufferPool.acquire: nbytes must be >= 0, got " + std::to_string(nbytes));
            return p.acquire(static_cast<size_t>(nbytes));
          },
          py::arg("nbytes"), "A buffer of at least `nbytes` bytes (contents undefined), reused when one is free.")
      .def("stats", &BufferPool::stats,
           "dict: allocated_bytes (held from the system), in_use_bytes, in_use_buffers, free_bytes, "
           "free_buffers, hits, misses, max_cached_bytes.")
      .def("clear", &BufferPool::clear, "Free every cached (not in use) buffer.")
      .def_property(
          "max_cached_bytes", &BufferPool::max_cached_bytes,
          [](const BufferPool& p, int64_t n) {
            if (n < 0) fail_value("BufferPool.max_cached_bytes must be >= 0");
            p.set_max_cached_bytes(static_cast<size_t>(n));
          });

  m.def("default_pool", &default_pool, "The module's pool, used for arrays the shim allocates (gather_pages).");
}

}  // namespace hetero_host
