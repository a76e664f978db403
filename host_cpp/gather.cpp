// gather_pages / scatter_tokens: page-block copies between a KV cache and staging arrays.
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "buffers.hpp"
#include "common.hpp"
#include "kernels.hpp"
#include "threads.hpp"

namespace hetero_host {

namespace {

constexpr double kCopyBytesPerThread = 512.0 * 1024;  // below this, one thread copies faster
constexpr size_t kCopyBytesPerTask = 256 * 1024;

bool same_dtype(const py::array& a, const py::array& b) {
  return a.dtype().kind() == b.dtype().kind() && a.dtype().itemsize() == b.dtype().itemsize() &&
         elem_of(a) == elem_of(b);
}

py::array gather_pages(py::object cache_obj, py::object ids_obj, int64_t page_size, py::object out_obj) {
  const char* fn = "gather_pages";
  py::array cache = as_array(cache_obj, fn, "cache");
  require_dtype(cache, fn, "cache", {Elem::F32, Elem::F16, Elem::U16});
  require_ndim(cache, fn, "cache", 4, "[batch, heads, seq, head_dim]");
  require_layout(cache, fn, "cache");
  py::array ids = as_array(ids_obj, fn, "page_ids");
  require_dtype(ids, fn, "page_ids", {Elem::I32, Elem::I64});
  require_ndim(ids, fn, "page_ids", 3, "[batch, heads, k]");
  require_layout(ids, fn, "page_ids");
  if (page_size < 1) fail_value("gather_pages: page_size must be >= 1, got " + std::to_string(page_size));
  const py::ssize_t B = cache.shape(0), H = cache.shape(1), S = cache.shape(2), D = cache.shape(3);
  const py::ssize_t K = ids.shape(2);
  if (ids.shape(0) != B || ids.shape(1) != H)
    fail_value("gather_pages: page_ids must have shape (" + std::to_string(B) + ", " + std::to_string(H) +
               ", k) to match cache " + shape_str(cache) + ", got " + shape_str(ids));
  if (K > 0 && page_size > (INT64_MAX / 8) / std::max<py::ssize_t>(1, K * std::max<py::ssize_t>(D, 1)))
    fail_value("gather_pages: page_size too large");
  const int64_t src_pages = S / page_size + (S % page_size != 0);

  // Copy the ids out and check them before anything is written.
  const size_t n_blocks = static_cast<size_t>(B * H * K);
  std::vector<int64_t> id(n_blocks);
  if (elem_of(ids) == Elem::I32) {
    const int32_t* p = static_cast<const int32_t*>(ids.data());
    std::copy(p, p + n_blocks, id.begin());
  } else {
    const int64_t* p = static_cast<const int64_t*>(ids.data());
    std::copy(p, p + n_blocks, id.begin());
  }
  for (size_t j = 0; j < n_blocks; ++j) {
    if (id[j] < -1 || id[j] >= src_pages) {
      const size_t b = j / static_cast<size_t>(H * K), h = j / static_cast<size_t>(K) % static_cast<size_t>(H),
                   i = j % static_cast<size_t>(K);
      fail_index("gather_pages: page_ids[" + std::to_string(b) + ", " + std::to_string(h) + ", " + std::to_string(i) +
                 "] = " + std::to_string(id[j]) + " is out of range: cache has " + std::to_string(src_pages) +
                 " pages of " + std::to_string(page_size) + " tokens (seq " + std::to_string(S) +
                 "); use -1 for padding");
    }
  }

  const std::vector<py::ssize_t> out_shape{B, H, K * page_size, D};
  py::array out;
  if (out_obj.is_none()) {
    out = pooled_array(cache.dtype(), out_shape);
  } else {
    out = as_array(out_obj, fn, "out", true);
    if (!same_dtype(out, cache))
      fail_type("gather_pages: out must have the cache's dtype " + dtype_str(cache) + ", got " + dtype_str(out));
    require_ndim(out, fn, "out", 4, "[batch, heads, k * page_size, head_dim]");
    require_layout(out, fn, "out", true);
    for (int i = 0; i < 4; ++i)
      if (out.shape(i) != out_shape[static_cast<size_t>(i)])
        fail_value("gather_pages: out must have shape (" + std::to_string(B) + ", " + std::to_string(H) + ", " +
                   std::to_string(K * page_size) + ", " + std::to_string(D) + "), got " + shape_str(out));
    if (overlaps(out, cache)) fail_value("gather_pages: out must not overlap cache");
  }

  const size_t esz = static_cast<size_t>(cache.itemsize());
  const size_t row_bytes = static_cast<size_t>(D) * esz;  // one token
  const size_t block_bytes = static_cast<size_t>(page_size) * row_bytes;
  const size_t head_bytes = static_cast<size_t>(S) * row_bytes;
  const char* src = static_cast<const char*>(cache.data());
  char* dst = static_cast<char*>(out.mutable_data());
  const size_t per_head = static_cast<size_t>(K);
  {
    py::gil_scoped_release nogil;
    const double total = 2.0 * static_cast<double>(n_blocks) * static_cast<double>(block_bytes);
    const size_t threads = threads_for(total, kCopyBytesPerThread);
    const size_t per_task = std::max<size_t>(1, kCopyBytesPerTask / std::max<size_t>(block_bytes, 1));
    const size_t blocks_per_task = threads == 1 ? std::max<size_t>(n_blocks, 1) : per_task;
    const size_t tasks = (n_blocks + blocks_per_task - 1) / blocks_per_task;
    parallel_for(
        tasks,
        [&](size_t t) {
          const size_t end = std::min(n_blocks, (t + 1) * blocks_per_task);
          for (size_t j = t * blocks_per_task; j < end; ++j) {
            char* d = dst + j * block_bytes;
            const int64_t p = id[j];
            size_t tokens = 0;
            if (p >= 0) {
              tokens = static_cast<size_t>(std::min<int64_t>(page_size, S - p * page_size));
              const char* s = src + (j / per_head) * head_bytes + static_cast<size_t>(p) * block_bytes;
              std::memcpy(d, s, tokens * row_bytes);
            }
            if (tokens < static_cast<size_t>(page_size))
              std::memset(d + tokens * row_bytes, 0, block_bytes - tokens * row_bytes);
          }
        },
        threads);
  }
  return out;
}

void scatter_tokens(py::object cache_obj, py::object new_obj, py::object start_obj) {
  const char* fn = "scatter_tokens";
  py::array cache = as_array(cache_obj, fn, "cache", true);
  require_dtype(cache, fn, "cache", {Elem::F32, Elem::F16, Elem::U16});
  require_ndim(cache, fn, "cache", 4, "[batch, heads, seq, head_dim]");
  require_layout(cache, fn, "cache", true);
  py::array fresh = as_array(new_obj, fn, "new");
  if (!same_dtype(fresh, cache))
    fail_type("scatter_tokens: new must have the cache's dtype " + dtype_str(cache) + ", got " + dtype_str(fresh));
  require_ndim(fresh, fn, "new", 4, "[batch, heads, n, head_dim]");
  require_layout(fresh, fn, "new");
  const py::ssize_t B = cache.shape(0), H = cache.shape(1), S = cache.shape(2), D = cache.shape(3);
  const py::ssize_t n = fresh.shape(2);
  if (fresh.shape(0) != B || fresh.shape(1) != H || fresh.shape(3) != D)
    fail_value("scatter_tokens: new must have shape (" + std::to_string(B) + ", " + std::to_string(H) + ", n, " +
               std::to_string(D) + ") to match cache " + shape_str(cache) + ", got " + shape_str(fresh));
  std::vector<int64_t> start = int_vector(start_obj, fn, "start", B);
  for (py::ssize_t b = 0; b < B; ++b) {
    const int64_t s = start[static_cast<size_t>(b)];
    if (s < 0 || s > S - n)
      fail_index("scatter_tokens: start[" + std::to_string(b) + "] = " + std::to_string(s) + " with " +
                 std::to_string(n) + " new tokens does not fit a cache of " + std::to_string(S) +
                 " tokens (need 0 <= start <= " + std::to_string(S - n) + ")");
  }
  if (overlaps(fresh, cache)) fail_value("scatter_tokens: new must not overlap cache");

  const size_t esz = static_cast<size_t>(cache.itemsize());
  const size_t row_bytes = static_cast<size_t>(D) * esz;
  const size_t chunk = static_cast<size_t>(n) * row_bytes;
  const size_t head_bytes = static_cast<size_t>(S) * row_bytes;
  char* dst = static_cast<char*>(cache.mutable_data());
  const char* src = static_cast<const char*>(fresh.data());
  const size_t rows = static_cast<size_t>(B * H);
  const size_t heads = static_cast<size_t>(H);
  py::gil_scoped_release nogil;
  const size_t threads = threads_for(2.0 * static_cast<double>(rows * chunk), kCopyBytesPerThread);
  parallel_for(
      rows,
      [&](size_t r) {
        std::memcpy(dst + r * head_bytes + static_cast<size_t>(start[r / heads]) * row_bytes, src + r * chunk, chunk);
      },
      threads);
}

}  // namespace

void register_gather(py::module_& m) {
  m.def("gather_pages", &gather_pages, py::arg("cache"), py::arg("page_ids"), py::arg("page_size"),
        py::arg("out") = py::none(), R"doc(
Copy whole pages of a KV cache into a dense staging array.

cache [B, H, S, D] float32 / float16 / uint16, C-contiguous; page_ids [B, H, K] int32 (or int64),
-1 = padding. Returns out [B, H, K * page_size, D] of the cache's dtype, where block i of row
(b, h) holds tokens page_ids[b, h, i] * page_size ... + page_size of cache[b, h]. Padding blocks
and the part of a partial last page past S are zero-filled. `out` is allocated from
default_pool() when None, else written in place (C-contiguous, exact shape and dtype, not
overlapping cache). Page ids outside [-1, ceil(S / page_size)) raise IndexError before
anything is written.)doc");
  m.def("scatter_tokens", &scatter_tokens, py::arg("cache"), py::arg("new"), py::arg("start"), R"doc(
Append path: cache[b, h, start[b] + i] = new[b, h, i] for every i < n.

cache [B, H, S, D] (written in place), new [B, H, n, D] of the same dtype, start [B] int32 / int64
with 0 <= start[b] <= S - n (IndexError otherwise).)doc");
}

}  // namespace hetero_host
