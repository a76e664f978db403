// Streaming top-k over (value, index) pairs visited in increasing index order.
//
// Keys are packed (value, index) pairs (common.hpp) whose unsigned order is the ranking
// order, so selection is integer nth_element / sort. The stream keeps a threshold: once it
// holds k candidates, a new value enters only if it is strictly greater than the worst kept
// value. Strictly, because a later equal value has a higher index and so ranks below every
// kept one. Candidates collect in a buffer of ~2k and are pruned back to k when it fills, so
// the cost is linear in n whatever the input's order. A caller that knows a lower bound of
// the k-th value (set_floor) skips everything below it from the start.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "common.hpp"

namespace hetero_host {

// Bit j set when x[j] (j < 16) is NaN or above thr (strict) / at least thr (!strict).
template <bool strict>
inline unsigned block_hits(const float* x, float thr) {
#if defined(__SSE2__)
  const __m128 t = _mm_set1_ps(thr);
  unsigned bits = 0;
  for (int q = 0; q < 4; ++q) {
    const __m128 v = _mm_loadu_ps(x + 4 * q);
    const __m128 m = _mm_or_ps(strict ? _mm_cmpgt_ps(v, t) : _mm_cmpge_ps(v, t), _mm_cmpunord_ps(v, v));
    bits |= static_cast<unsigned>(_mm_movemask_ps(m)) << (4 * q);
  }
  return bits;
#else
  unsigned bits = 0;
  for (int j = 0; j < 16; ++j) bits |= static_cast<unsigned>((strict ? x[j] > thr : x[j] >= thr) || x[j] != x[j]) << j;
  return bits;
#endif
}

// The maximum of x[0..16) (NaN may or may not propagate: only used as a hint).
inline float block_max(const float* x) {
#if defined(__SSE2__)
  __m128 m = _mm_max_ps(_mm_max_ps(_mm_loadu_ps(x), _mm_loadu_ps(x + 4)),
                        _mm_max_ps(_mm_loadu_ps(x + 8), _mm_loadu_ps(x + 12)));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
#else
  float m = x[0];
  for (int j = 1; j < 16; ++j) m = x[j] > m ? x[j] : m;
  return m;
#endif
}

// Sorts keys[0..n) descending. Below ~128 keys std::sort; above, an LSD radix sort (8-bit
// digits; a digit equal across all keys costs one histogram, not a pass): a comparison sort
// of random keys mispredicts about every other branch.
inline void sort_desc(uint64_t* keys, size_t n, std::vector<uint64_t>& tmp) {
  if (n < 128) {
    std::sort(keys, keys + n, std::greater<uint64_t>());
    return;
  }
  if (tmp.size() < n) tmp.resize(n);
  uint32_t hist[8][256] = {};
  for (size_t i = 0; i < n; ++i) {
    const uint64_t k = ~keys[i];  // ascending order of ~key = descending order of key
    for (int d = 0; d < 8; ++d) ++hist[d][(k >> (8 * d)) & 0xff];
  }
  uint64_t* src = keys;
  uint64_t* dst = tmp.data();
  for (int d = 0; d < 8; ++d) {
    uint32_t* h = hist[d];
    if (h[((~src[0]) >> (8 * d)) & 0xff] == n) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (size_t i = 0; i < n; ++i) {
      const uint64_t k = src[i];
      dst[h[((~k) >> (8 * d)) & 0xff]++] = k;
    }
    std::swap(src, dst);
  }
  if (src != keys) std::copy(src, src + n, keys);
}

class TopKStream {
 public:
  void reset(size_t k) {
    k_ = k;
    cap_ = 2 * k + 64;
    if (buf_.size() < cap_) buf_.resize(cap_);
    n_ = 0;
    mode_ = Mode::Fill;
    thr_ = 0.0f;
    nan_at = -1;
  }

  // Declares that at least k of the values still to come are >= floor (a lower bound of
  // the k-th value): values below it are skipped from the start. Call right after reset.
  void set_floor(float floor) {
    if (floor == floor) {
      thr_ = floor;
      mode_ = Mode::Floor;
    }
  }

  // A lower bound of the k-th largest of x[0..n): the k-th largest of the maxima of n/16
  // blocks (k blocks have a maximum >= it). Worth it when n / 16 is well above k; returns
  // NaN when it is not (no floor).
  static float floor_of(const float* x, size_t n, size_t k, std::vector<float>& scratch) {
    const size_t blocks = n / 16;
    if (blocks < 4 * k) return std::numeric_limits<float>::quiet_NaN();
    scratch.resize(blocks);
    for (size_t i = 0; i < blocks; ++i) {
      const float m = block_max(x + 16 * i);
      scratch[i] = m == m ? m : -std::numeric_limits<float>::infinity();  // NaN is caught by offer
    }
    std::nth_element(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(k - 1), scratch.end(),
                     std::greater<float>());
    return scratch[k - 1];
  }

  // Offers x[0..n) with indices base, base + 1, ... (increasing across calls). Returns false
  // at the first NaN (its index in nan_at), leaving the stream unusable.
  bool offer(const float* x, size_t n, int64_t base) {
    size_t i = 0;
    while (mode_ == Mode::Fill && i < n) {
      if (!take(x[i], base + static_cast<int64_t>(i))) return false;
      ++i;
      if (n_ == k_) {
        uint64_t worst = buf_[0];
        for (size_t j = 1; j < n_; ++j) worst = std::min(worst, buf_[j]);
        thr_ = key_value(worst);
        mode_ = Mode::Strict;
      }
    }
    // Whole blocks: only the lanes that pass the threshold are visited. A prune in the middle
    // of a block raises the threshold; the block's remaining hits were computed against the
    // old one and are taken anyway, which is harmless (selection is by key).
    while (mode_ == Mode::Floor && i + 16 <= n) {
      if (!take_hits(x + i, block_hits<false>(x + i, thr_), base + static_cast<int64_t>(i))) return false;
      i += 16;
    }
    for (; i + 16 <= n; i += 16)
      if (!take_hits(x + i, block_hits<true>(x + i, thr_), base + static_cast<int64_t>(i))) return false;
    for (; i < n; ++i)
      if ((mode_ == Mode::Floor ? x[i] >= thr_ : x[i] > thr_) || x[i] != x[i])
        if (!take(x[i], base + static_cast<int64_t>(i))) return false;
    return true;
  }

  // Prunes to the best min(k, size) keys (unordered) and returns how many.
  size_t shrink() {
    if (n_ > k_) prune();
    return n_;
  }
  const uint64_t* keys() const { return buf_.data(); }
  // Shrinks and sorts best first.
  size_t sorted() {
    shrink();
    sort_desc(buf_.data(), n_, tmp_);
    return n_;
  }

  int64_t nan_at = -1;

 private:
  enum class Mode { Fill, Floor, Strict };

  bool take(float v, int64_t idx) {
    if (v != v) {
      nan_at = idx;
      return false;
    }
    buf_[n_++] = make_key(v, static_cast<int32_t>(idx));
    if (n_ == cap_) prune();
    return true;
  }

  bool take_hits(const float* x, unsigned bits, int64_t base) {
    while (bits) {
      const int j = __builtin_ctz(bits);
      bits &= bits - 1;
      if (!take(x[j], base + j)) return false;
    }
    return true;
  }

  void prune() {
    auto kth = buf_.begin() + static_cast<std::ptrdiff_t>(k_ - 1);
    std::nth_element(buf_.begin(), kth, buf_.begin() + static_cast<std::ptrdiff_t>(n_), std::greater<uint64_t>());
    n_ = k_;
    thr_ = key_value(*kth);
    mode_ = Mode::Strict;
  }

  std::vector<uint64_t> buf_, tmp_;
  size_t k_ = 0, cap_ = 0, n_ = 0;
  Mode mode_ = Mode::Fill;
  float thr_ = 0.0f;
};

// Per-thread scratch, reached through an opaque call: in a shared library GCC may recompute
// a thread_local's address (__tls_get_addr) at every use inside a hot loop.
struct Scratch {
  TopKStream stream;
  std::vector<float> floor;   // TopKStream::floor_of
  std::vector<float> scores;  // page_topk: one chunk's scores
  std::vector<float> wide;    // score kernel: float16 rows widened
  std::vector<uint64_t> keys, tmp;
};
Scratch& thread_scratch();

// The best k of `n` keys (reordered in place), sorted best first, in keys[0..min(k, n)).
inline size_t best_keys(uint64_t* keys, size_t n, size_t k, std::vector<uint64_t>& tmp) {
  if (n > k) {
    std::nth_element(keys, keys + k - 1, keys + n, std::greater<uint64_t>());
    n = k;
  }
  sort_desc(keys, n, tmp);
  return n;
}

}  // namespace hetero_host
