// Page-sparse attention on the host: relevancy (page_scores) and relevancy fused with
// retrieval (page_topk), the math of hetero/methods/page_sparse_reference.py.
#include <pybind11/numpy.h>

#include <algorithm>
#include <climits>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "common.hpp"
#include "kernels.hpp"
#include "score_kernel.hpp"
#include "threads.hpp"
#include "topk.hpp"

namespace hetero_host {

namespace {

constexpr int64_t kMaxChunkPages = 4096;       // scores a thread holds at once: 16 KB (more only if 4k is more)
constexpr double kSummaryBytesPerThread = 256e3;  // below this one thread is faster
constexpr size_t kMinChunkPages = 256;            // smallest chunk worth a task

struct Inputs {
  const char* fn;
  py::array summary, query;
  std::vector<int64_t> lengths, pages_of;  // per batch: valid tokens, valid pages
  size_t B = 0, H = 0, G = 0, D = 0, P_cap = 0, n_pages = 0, page_size = 0;
  bool half = false;
};

Inputs check_inputs(const char* fn, py::object summary_obj, py::object query_obj, py::object lengths_obj,
                    int64_t n_pages, int64_t page_size) {
  Inputs in;
  in.fn = fn;
  in.summary = as_array(summary_obj, fn, "summary");
  require_dtype(in.summary, fn, "summary", {Elem::F32, Elem::F16});
  require_ndim(in.summary, fn, "summary", 5, "[batch, kv_heads, pages, 2, head_dim] (min, max)");
  require_layout(in.summary, fn, "summary");
  if (in.summary.shape(3) != 2)
    fail_value(std::string(fn) + ": summary must have shape [batch, kv_heads, pages, 2, head_dim] (axis 3 = min, "
               "max), got " + shape_str(in.summary));
  in.query = as_array(query_obj, fn, "query");
  require_dtype(in.query, fn, "query", {Elem::F32});
  require_ndim(in.query, fn, "query", 3, "[batch, q_heads, head_dim]");
  require_layout(in.query, fn, "query");
  in.B = static_cast<size_t>(in.summary.shape(0));
  in.H = static_cast<size_t>(in.summary.shape(1));
  in.P_cap = static_cast<size_t>(in.summary.shape(2));
  in.D = static_cast<size_t>(in.summary.shape(4));
  in.half = elem_of(in.summary) == Elem::F16;
  const size_t Hq = static_cast<size_t>(in.query.shape(1));
  if (static_cast<size_t>(in.query.shape(0)) != in.B || static_cast<size_t>(in.query.shape(2)) != in.D ||
      in.H == 0 || Hq == 0 || Hq % in.H != 0)
    fail_value(std::string(fn) + ": query must have shape (" + std::to_string(in.B) + ", kv_heads * group, " +
               std::to_string(in.D) + ") for summary " + shape_str(in.summary) + ", got " + shape_str(in.query));
  in.G = Hq / in.H;
  if (page_size < 1) fail_value(std::string(fn) + ": page_size must be >= 1, got " + std::to_string(page_size));
  if (n_pages < 0 || static_cast<size_t>(n_pages) > in.P_cap)
    fail_value(std::string(fn) + ": n_pages must be in [0, " + std::to_string(in.P_cap) +
               "] (the summary's page capacity), got " + std::to_string(n_pages));
  if (n_pages > INT32_MAX) fail_value(std::string(fn) + ": n_pages must be < 2**31");
  in.n_pages = static_cast<size_t>(n_pages);
  in.page_size = static_cast<size_t>(page_size);
  in.lengths = int_vector(lengths_obj, fn, "lengths", static_cast<py::ssize_t>(in.B));
  in.pages_of.resize(in.B);
  const int64_t max_tokens = n_pages > INT64_MAX / page_size ? INT64_MAX : n_pages * page_size;
  for (size_t b = 0; b < in.B; ++b) {
    const int64_t len = in.lengths[b];
    if (len < 0 || len > max_tokens)
      fail_value(std::string(fn) + ": lengths[" + std::to_string(b) + "] = " + std::to_string(len) +
                 " is out of range: must be in [0, n_pages * page_size] = [0, " + std::to_string(max_tokens) + "]");
    in.pages_of[b] = len / page_size + (len % page_size != 0);
  }
  return in;
}

// One row (b, h) of the summary and its G query heads, as the kernel wants them.
struct RowView {
  const void* rows;
  const float* q;
};

RowView row_view(const Inputs& in, size_t r) {
  const size_t esz = in.half ? 2 : 4;
  const char* s = static_cast<const char*>(in.summary.data()) + r * in.P_cap * 2 * in.D * esz;
  const float* q = static_cast<const float*>(in.query.data()) + r * in.G * in.D;  // heads h*G .. h*G+G-1
  return {s, q};
}

struct Chunk {
  size_t row;
  int64_t lo, hi;  // pages [lo, hi)
};

// Page ranges [first[r], last[r]) of every row, cut into chunks that balance the threads.
std::vector<Chunk> make_chunks(const std::vector<int64_t>& first, const std::vector<int64_t>& last, size_t threads,
                               size_t min_pages) {
  int64_t total = 0;
  for (size_t r = 0; r < first.size(); ++r) total += std::max<int64_t>(0, last[r] - first[r]);
  const int64_t want = threads > 1 ? static_cast<int64_t>(4 * threads) : 1;
  const int64_t size = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(min_pages), (total + want - 1) / want),
                                         std::max<int64_t>(kMaxChunkPages, static_cast<int64_t>(min_pages)));
  std::vector<Chunk> chunks;
  for (size_t r = 0; r < first.size(); ++r)
    for (int64_t lo = first[r]; lo < last[r]; lo += size) chunks.push_back({r, lo, std::min(last[r], lo + size)});
  return chunks;
}

py::array page_scores(py::object summary, py::object query, py::object lengths, int64_t n_pages, int64_t page_size) {
  Inputs in = check_inputs("page_scores", summary, query, lengths, n_pages, page_size);
  const size_t rows = in.B * in.H;
  py::array_t<float> out({static_cast<py::ssize_t>(in.B), static_cast<py::ssize_t>(in.H),
                          static_cast<py::ssize_t>(in.n_pages)});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> first(rows, 0), last(rows);
    double bytes = 0;
    for (size_t r = 0; r < rows; ++r) {
      last[r] = in.pages_of[r / in.H];
      bytes += static_cast<double>(last[r]) * static_cast<double>(2 * in.D * (in.half ? 2 : 4));
      std::fill(o + r * in.n_pages + last[r], o + (r + 1) * in.n_pages, -std::numeric_limits<float>::infinity());
    }
    const size_t threads = threads_for(bytes, kSummaryBytesPerThread);
    const std::vector<Chunk> chunks = make_chunks(first, last, threads, kMinChunkPages);
    const size_t stride = 2 * in.D;
    parallel_for(
        chunks.size(),
        [&](size_t c) {
          const Chunk& ch = chunks[c];
          const RowView v = row_view(in, ch.row);
          const char* base = static_cast<const char*>(v.rows) + static_cast<size_t>(ch.lo) * stride * (in.half ? 2 : 4);
          score_pages(base, in.half, stride, static_cast<size_t>(ch.hi - ch.lo), in.D, v.q, in.G,
                      o + ch.row * in.n_pages + ch.lo);
        },
        threads);
  }
  return out;
}

py::array page_topk(py::object summary, py::object query, py::object lengths, int64_t n_pages, int64_t page_size,
                    int64_t k, int64_t sink_pages, int64_t local_pages) {
  const char* fn = "page_topk";
  Inputs in = check_inputs(fn, summary, query, lengths, n_pages, page_size);
  if (k < 1 || static_cast<size_t>(k) > in.n_pages)
    fail_value("page_topk: k must be in [1, n_pages] = [1, " + std::to_string(in.n_pages) + "], got " +
               std::to_string(k));
  if (sink_pages < 0 || local_pages < 0 || sink_pages > INT32_MAX || local_pages > INT32_MAX)
    fail_value("page_topk: sink_pages and local_pages must be in [0, 2**31), got " + std::to_string(sink_pages) + " and " +
               std::to_string(local_pages));
  for (size_t b = 0; b < in.B; ++b)
    if (in.pages_of[b] > k && sink_pages + local_pages > k)
      fail_value("page_topk: sink_pages + local_pages (" + std::to_string(sink_pages) + " + " +
                 std::to_string(local_pages) + ") exceed k = " + std::to_string(k) + " while sequence " +
                 std::to_string(b) + " has " + std::to_string(in.pages_of[b]) + " pages");
  const size_t rows = in.B * in.H, K = static_cast<size_t>(k);
  const size_t keep = static_cast<size_t>(std::max<int64_t>(0, k - sink_pages - local_pages));  // chosen by score
  py::array_t<int32_t> out(
      {static_cast<py::ssize_t>(in.B), static_cast<py::ssize_t>(in.H), static_cast<py::ssize_t>(K)});
  int32_t* o = out.mutable_data();
  std::atomic<bool> nan_seen{false};
  size_t nan_row = 0;
  int64_t nan_page = 0;
  std::mutex nan_mu;
  {
    py::gil_scoped_release nogil;
    // Scored pages per row: the non-forced pages of sequences with more than k pages.
    std::vector<int64_t> first(rows, 0), last(rows, 0);
    double bytes = 0;
    for (size_t r = 0; r < rows; ++r) {
      const int64_t np = in.pages_of[r / in.H];
      if (np > k && keep > 0) {
        first[r] = sink_pages;
        last[r] = np - local_pages;
        bytes += static_cast<double>(last[r] - first[r]) * static_cast<double>(2 * in.D * (in.half ? 2 : 4));
      }
    }
    const size_t threads = threads_for(bytes, kSummaryBytesPerThread);
    const std::vector<Chunk> chunks = make_chunks(first, last, threads, std::max<size_t>(kMinChunkPages, 4 * keep));
    std::vector<uint64_t> partial(chunks.size() * keep);
    std::vector<size_t> count(chunks.size(), 0);
    std::vector<size_t> row_chunk(rows + 1, 0);  // chunks of row r: [row_chunk[r], row_chunk[r + 1])
    for (const Chunk& ch : chunks) ++row_chunk[ch.row + 1];
    for (size_t r = 0; r < rows; ++r) row_chunk[r + 1] += row_chunk[r];
    const size_t stride = 2 * in.D;
    const size_t esz = in.half ? 2 : 4;

    // Phase 1: each chunk streams its pages' scores through a top-`keep` filter.
    parallel_for(
        chunks.size(),
        [&](size_t c) {
          const Chunk& ch = chunks[c];
          const RowView v = row_view(in, ch.row);
          Scratch& scratch = thread_scratch();
          TopKStream& s = scratch.stream;
          s.reset(keep);
          const size_t n = static_cast<size_t>(ch.hi - ch.lo);
          std::vector<float>& scores = scratch.scores;  // one chunk's scores: the most a thread holds
          if (scores.size() < n) scores.resize(n);
          score_pages(static_cast<const char*>(v.rows) + static_cast<size_t>(ch.lo) * stride * esz, in.half, stride, n,
                      in.D, v.q, in.G, scores.data());
          s.set_floor(TopKStream::floor_of(scores.data(), n, keep, scratch.floor));
          if (!s.offer(scores.data(), n, ch.lo)) {
            std::lock_guard<std::mutex> lk(nan_mu);
            if (!nan_seen.load() || ch.row < nan_row) {
              nan_row = ch.row;
              nan_page = s.nan_at;
            }
            nan_seen.store(true);
            return;
          }
          count[c] = s.shrink();
          std::copy(s.keys(), s.keys() + count[c], partial.begin() + static_cast<std::ptrdiff_t>(c * keep));
        },
        threads);

    // Phase 2: per row, the best `keep` of its chunks' candidates, then the forced pages.
    if (!nan_seen.load())
      parallel_for(
          rows,
          [&](size_t r) {
            int32_t* dst = o + r * K;
            const int64_t np = in.pages_of[r / in.H];
            if (np <= k) {
              for (int64_t p = 0; p < np; ++p) dst[p] = static_cast<int32_t>(p);
              std::fill(dst + np, dst + K, -1);
              return;
            }
            size_t m = 0;
            if (keep > 0) {
              uint64_t* base = partial.data() + row_chunk[r] * keep;
              for (size_t c = row_chunk[r]; c < row_chunk[r + 1]; ++c) {
                std::copy(partial.data() + c * keep, partial.data() + c * keep + count[c], base + m);
                m += count[c];
              }
              if (m > keep) {
                std::nth_element(base, base + keep - 1, base + m, std::greater<uint64_t>());
                m = keep;
              }
              int32_t* mid = dst + sink_pages;
              for (size_t j = 0; j < m; ++j) mid[j] = key_index(base[j]);
              std::sort(mid, mid + m);
            }
            for (int64_t p = 0; p < sink_pages; ++p) dst[p] = static_cast<int32_t>(p);
            for (int64_t j = 0; j < local_pages; ++j)
              dst[sink_pages + static_cast<int64_t>(m) + j] = static_cast<int32_t>(np - local_pages + j);
          },
          threads_for(static_cast<double>(chunks.size() * keep), 64e3));
  }
  if (nan_seen.load())
    fail_value("page_topk: relevancy score is NaN (batch " + std::to_string(nan_row / in.H) + ", kv head " +
               std::to_string(nan_row % in.H) + ", page " + std::to_string(nan_page) +
               "): the summary or query holds NaN or inf * 0");
  return out;
}

}  // namespace

void register_relevancy(py::module_& m) {
  m.def("page_scores", &page_scores, py::arg("summary"), py::arg("query"), py::arg("lengths"), py::arg("n_pages"),
        py::arg("page_size"), R"doc(
Relevancy of every page: scores float32 [B, H, n_pages].

summary [B, H, P_cap, 2, D] float32 or float16 (axis 3: elementwise min, max of the page's keys;
P_cap >= n_pages), query [B, H * G, D] float32, lengths [B] int32 / int64 (0 <= lengths[b] <=
n_pages * page_size). scores[b, h, p] = max over g < G of sum_d max(q[b, h*G + g, d] * min[d],
q * max[d]); -inf for p >= ceil(lengths[b] / page_size).)doc");
  m.def("page_topk", &page_topk, py::arg("summary"), py::arg("query"), py::arg("lengths"), py::arg("n_pages"),
        py::arg("page_size"), py::arg("k"), py::arg("sink_pages"), py::arg("local_pages"), R"doc(
Relevancy fused with retrieval: page_ids int32 [B, H, k], ascending, -1 padded at the end.

Per sequence and KV head with n = ceil(lengths[b] / page_size) pages: all n pages when n <= k;
else the first sink_pages and last local_pages pages, then the best-scoring others (scores as
page_scores; equal scores -> lower page index) until k. Scores are streamed per thread chunk,
never stored for a whole row. 1 <= k <= n_pages; sink_pages + local_pages must not exceed k for
a sequence with more than k pages. NaN scores raise ValueError.)doc");
}

}  // namespace hetero_host
