// topk / merge_topk over rows of float32 scores.
#include "topk.hpp"

#include <pybind11/numpy.h>

#include <atomic>
#include <climits>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "common.hpp"
#include "kernels.hpp"
#include "threads.hpp"

namespace hetero_host {

__attribute__((noinline)) Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

namespace {

constexpr double kElemsPerThread = 24 * 1024;  // a thread pays off above ~10 us of scanning
constexpr size_t kMinSplit = 32 * 1024;         // smallest part of a row worth its own task

// Records the lowest row (and its column) that held a NaN.
struct NanSeen {
  std::mutex mu;
  std::atomic<bool> seen{false};
  int64_t row = INT64_MAX, col = -1;
  void note(int64_t r, int64_t c) {
    std::lock_guard<std::mutex> lk(mu);
    if (r < row) {
      row = r;
      col = c;
    }
    seen.store(true);
  }
  bool any() const { return seen.load(); }
};


// Top-k of x[0..n) (indices base...) into the thread's stream; false on NaN.
bool stream_topk(TopKStream& s, const float* x, size_t n, size_t k, int64_t base) {
  s.reset(k);
  s.set_floor(TopKStream::floor_of(x, n, k, thread_scratch().floor));
  return s.offer(x, n, base);
}

std::tuple<py::array, py::array> topk(py::object scores_obj, int64_t k) {
  const char* fn = "topk";
  py::array scores = as_array(scores_obj, fn, "scores");
  require_dtype(scores, fn, "scores", {Elem::F32});
  require_ndim(scores, fn, "scores", 2, "[rows, n] (reshape to 2-D; top-k runs over the last axis)");
  require_layout(scores, fn, "scores");
  const py::ssize_t R = scores.shape(0), N = scores.shape(1);
  if (N > INT32_MAX) fail_value("topk: rows longer than 2**31 - 1 are not supported (indices are int32)");
  if (k < 1 || k > N)
    fail_value("topk: k must be in [1, " + std::to_string(N) + "] (the row length), got " + std::to_string(k));
  py::array_t<float> values({R, static_cast<py::ssize_t>(k)});
  py::array_t<int32_t> indices({R, static_cast<py::ssize_t>(k)});
  const float* x = static_cast<const float*>(scores.data());
  float* vout = values.mutable_data();
  int32_t* iout = indices.mutable_data();
  const size_t rows = static_cast<size_t>(R), n = static_cast<size_t>(N), kk = static_cast<size_t>(k);
  NanSeen nan;
  {
    py::gil_scoped_release nogil;
    const size_t threads = threads_for(static_cast<double>(rows) * static_cast<double>(n), kElemsPerThread);
    // Split rows into parts when there are too few rows to keep every thread busy.
    size_t parts = 1;
    if (threads > 1 && rows < 2 * threads && n >= 2 * kMinSplit) {
      parts = std::min((4 * threads + rows - 1) / std::max<size_t>(rows, 1), n / std::max(kMinSplit, 8 * kk));
      parts = std::max<size_t>(parts, 1);
    }
    auto write_row = [&](size_t r, const uint64_t* keys, size_t m) {
      const float* row = x + r * n;
      for (size_t j = 0; j < m; ++j) {
        const int32_t idx = key_index(keys[j]);
        iout[r * kk + j] = idx;
        vout[r * kk + j] = row[idx];
      }
    };
    if (parts == 1) {
      parallel_for(
          rows,
          [&](size_t r) {
            TopKStream& s = thread_scratch().stream;
            if (!stream_topk(s, x + r * n, n, kk, 0)) {
              nan.note(static_cast<int64_t>(r), s.nan_at);
              return;
            }
            const size_t m = s.sorted();
            write_row(r, s.keys(), m);
          },
          threads);
    } else {
      const size_t span = (n + parts - 1) / parts;
      std::vector<uint64_t> partial(rows * parts * kk);
      std::vector<size_t> count(rows * parts, 0);
      parallel_for(
          rows * parts,
          [&](size_t t) {
            const size_t r = t / parts, lo = (t % parts) * span, hi = std::min(n, lo + span);
            if (lo >= hi) return;
            TopKStream& s = thread_scratch().stream;
            if (!stream_topk(s, x + r * n + lo, hi - lo, kk, static_cast<int64_t>(lo))) {
              nan.note(static_cast<int64_t>(r), s.nan_at);
              return;
            }
            const size_t m = s.shrink();
            std::copy(s.keys(), s.keys() + m, partial.begin() + static_cast<std::ptrdiff_t>(t * kk));
            count[t] = m;
          },
          threads);
      if (!nan.any())
        parallel_for(
            rows,
            [&](size_t r) {
              // Pack the parts' keys together, then select.
              uint64_t* base = partial.data() + r * parts * kk;
              size_t m = 0;
              for (size_t p = 0; p < parts; ++p) {
                const size_t c = count[r * parts + p];
                std::copy(base + p * kk, base + p * kk + c, base + m);
                m += c;
              }
              m = best_keys(base, m, kk, thread_scratch().tmp);
              write_row(r, base, m);
            },
            threads);
    }
  }
  if (nan.any())
    fail_value("topk: scores contain NaN (row " + std::to_string(nan.row) + ", column " +
               std::to_string(nan.col) + "); NaN has no rank");
  return std::make_tuple(values, indices);
}

std::tuple<py::array, py::array> merge_topk(py::object values_obj, py::object indices_obj, int64_t k) {
  const char* fn = "merge_topk";
  py::array values = as_array(values_obj, fn, "values");
  require_dtype(values, fn, "values", {Elem::F32});
  require_ndim(values, fn, "values", 3, "[parts, rows, k]");
  require_layout(values, fn, "values");
  py::array indices = as_array(indices_obj, fn, "indices");
  require_dtype(indices, fn, "indices", {Elem::I32});
  require_ndim(indices, fn, "indices", 3, "[parts, rows, k]");
  require_layout(indices, fn, "indices");
  for (int i = 0; i < 3; ++i)
    if (values.shape(i) != indices.shape(i))
      fail_value("merge_topk: values " + shape_str(values) + " and indices " + shape_str(indices) +
                 " must have the same shape");
  const size_t P = static_cast<size_t>(values.shape(0)), R = static_cast<size_t>(values.shape(1)),
               kin = static_cast<size_t>(values.shape(2));
  if (k < 1 || static_cast<size_t>(k) > P * kin)
    fail_value("merge_topk: k must be in [1, " + std::to_string(P * kin) + "] (parts * k of the inputs), got " +
               std::to_string(k));
  const size_t kk = static_cast<size_t>(k);
  py::array_t<float> out_v({static_cast<py::ssize_t>(R), static_cast<py::ssize_t>(kk)});
  py::array_t<int32_t> out_i({static_cast<py::ssize_t>(R), static_cast<py::ssize_t>(kk)});
  const float* v = static_cast<const float*>(values.data());
  const int32_t* ix = static_cast<const int32_t*>(indices.data());
  float* ov = out_v.mutable_data();
  int32_t* oi = out_i.mutable_data();
  NanSeen nan;
  {
    py::gil_scoped_release nogil;
    const size_t threads = threads_for(static_cast<double>(P * R * kin), kElemsPerThread / 4);
    parallel_for(
        R,
        [&](size_t r) {
          std::vector<uint64_t> keys(P * kin);
          for (size_t p = 0; p < P; ++p)
            for (size_t j = 0; j < kin; ++j) {
              const size_t at = (p * R + r) * kin + j;
              if (v[at] != v[at]) {
                nan.note(static_cast<int64_t>(r), static_cast<int64_t>(p * kin + j));
                return;
              }
              keys[p * kin + j] = make_key(v[at], ix[at]);
            }
          best_keys(keys.data(), keys.size(), kk, thread_scratch().tmp);
          for (size_t j = 0; j < kk; ++j) {
            ov[r * kk + j] = key_value(keys[j]);
            oi[r * kk + j] = key_index(keys[j]);
          }
        },
        threads);
  }
  if (nan.any()) fail_value("merge_topk: values contain NaN (row " + std::to_string(nan.row) + ")");
  return std::make_tuple(out_v, out_i);
}

}  // namespace

void register_topk(py::module_& m) {
  m.def("topk", &topk, py::arg("scores"), py::arg("k"), R"doc(
Top-k over the last axis of scores [R, N] float32 (C-contiguous, 2-D: reshape first).

Returns (values float32 [R, k], indices int32 [R, k]) sorted by value descending, equal values
by the lower index first: exactly the first k of sorting each row by (-value, index). -inf is
allowed; NaN raises ValueError. 1 <= k <= N.)doc");
  m.def("merge_topk", &merge_topk, py::arg("values"), py::arg("indices"), py::arg("k"), R"doc(
Merge P partial top-k lists per row: values float32 [P, R, k_in], indices int32 [P, R, k_in]
-> (values [R, k], indices [R, k]), the best k of each row's P * k_in entries ranked like topk
(value descending, then lower index). 1 <= k <= P * k_in; NaN raises ValueError.)doc");
}

}  // namespace hetero_host
