// The one compute-heavy loop of the shim. It is compiled three times, for AVX-512
// (x86-64-v4), AVX2 + FMA (x86-64-v3) and the portable x86-64 baseline, and the variant is
// picked at load time from the running CPU, so the library is built without -march and
// still runs at the machine's vector width. The loop keeps 16 partial sums per query head
// (one zmm, two ymm or four xmm) reduced in a fixed order, so the variants differ only by
// fused multiply-add rounding.
#include "score_kernel.hpp"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "common.hpp"
#include "topk.hpp"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HETERO_X86 1
#define HETERO_INLINE inline __attribute__((always_inline))
#else
#define HETERO_INLINE inline
#endif

namespace hetero_host {

namespace {

constexpr size_t kLanes = 16;  // partial sums per query head
constexpr size_t kBlock = 16;  // pages per block: a block's rows stay in L1 across head groups
// Pages scored together (sharing q's loads and sign masks), as registers allow: 16 xmm
// registers hold 2 heads x 16 lanes of one page, 16 ymm 4 heads x 2 pages, 32 zmm 4 heads
// x 4 pages.
constexpr int kPagesBaseline = 1, kPagesAvx2 = 2, kPagesAvx512 = 4;

typedef float V4 __attribute__((vector_size(16)));
typedef float V8 __attribute__((vector_size(32)));
typedef float V16 __attribute__((vector_size(64)));
template <int W>
struct VecOf;
template <>
struct VecOf<4> {
  typedef V4 type;
};
template <>
struct VecOf<8> {
  typedef V8 type;
};
template <>
struct VecOf<16> {
  typedef V16 type;
};

// The sum of 16 partial sums (NV = 16 / W vectors), by the same halving tree in every variant:
// s8[l] = lane[l] + lane[l + 8], s4[l] = s8[l] + s8[l + 4], then (s4[0] + s4[2]) + (s4[1] + s4[3]).
template <int W>
HETERO_INLINE float sum_lanes(const typename VecOf<W>::type* acc) {
  V4 s4;
  if constexpr (W == 16) {
    const V16 a = acc[0];
    const V8 s8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  } else if constexpr (W == 8) {
    const V8 s8 = acc[0] + acc[1];
    s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  } else {
    s4 = (acc[0] + acc[2]) + (acc[1] + acc[3]);
  }
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// The four sums sum_lanes(acc[g]) (g < 4) at once, in one V4, by the same tree.
template <int W>
HETERO_INLINE V4 sum_lanes4(const typename VecOf<W>::type (*acc)[kLanes / W]) {
  if constexpr (W == 16) {
    const V16 a0 = acc[0][0], a1 = acc[1][0], a2 = acc[2][0], a3 = acc[3][0];
    // [s8 of a0 | s8 of a1], [s8 of a2 | s8 of a3]
    const V16 x01 = __builtin_shufflevector(a0, a1, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a0, a1, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const V16 x23 = __builtin_shufflevector(a2, a3, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                    __builtin_shufflevector(a2, a3, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    // [s4 of a0 | s4 of a1 | s4 of a2 | s4 of a3]
    const V16 y = __builtin_shufflevector(x01, x23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                  __builtin_shufflevector(x01, x23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    const V16 t = y + __builtin_shufflevector(y, y, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    const V16 u = t + __builtin_shufflevector(t, t, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return __builtin_shufflevector(u, u, 0, 4, 8, 12);
  } else if constexpr (W == 8) {
    const V8 s0 = acc[0][0] + acc[0][1], s1 = acc[1][0] + acc[1][1];
    const V8 s2 = acc[2][0] + acc[2][1], s3 = acc[3][0] + acc[3][1];
    const V8 y01 = __builtin_shufflevector(s0, s1, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(s0, s1, 4, 5, 6, 7, 12, 13, 14, 15);
    const V8 y23 = __builtin_shufflevector(s2, s3, 0, 1, 2, 3, 8, 9, 10, 11) +
                   __builtin_shufflevector(s2, s3, 4, 5, 6, 7, 12, 13, 14, 15);
    const V8 t01 = y01 + __builtin_shufflevector(y01, y01, 2, 3, 0, 1, 6, 7, 4, 5);
    const V8 t23 = y23 + __builtin_shufflevector(y23, y23, 2, 3, 0, 1, 6, 7, 4, 5);
    const V8 u01 = t01 + __builtin_shufflevector(t01, t01, 1, 0, 3, 2, 5, 4, 7, 6);
    const V8 u23 = t23 + __builtin_shufflevector(t23, t23, 1, 0, 3, 2, 5, 4, 7, 6);
    return __builtin_shufflevector(u01, u23, 0, 4, 8, 12);
  } else {
    V4 t[4];
    for (int g = 0; g < 4; ++g) {
      const V4 s4 = (acc[g][0] + acc[g][2]) + (acc[g][1] + acc[g][3]);
      t[g] = s4 + __builtin_shufflevector(s4, s4, 2, 3, 0, 1);  // lanes 0, 1: s4[0] + s4[2], s4[1] + s4[3]
    }
    const V4 a = __builtin_shufflevector(t[0], t[1], 0, 1, 4, 5), b = __builtin_shufflevector(t[2], t[3], 0, 1, 4, 5);
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
  }
}

// Bound of PB consecutive pages for query heads q[0..GB), max-combined into out[0..PB). The
// sign masks of q are shared by the PB pages.
template <int W, int GB, int PB>
HETERO_INLINE void score_group(const float* rows, size_t stride, size_t D, const float* q, float* out, bool first) {
  typedef typename VecOf<W>::type V;
  constexpr size_t NV = kLanes / W;
  const size_t Dv = D / kLanes * kLanes;
  V acc[PB][GB][NV];
  for (int p = 0; p < PB; ++p)
    for (int g = 0; g < GB; ++g)
      for (size_t v = 0; v < NV; ++v) acc[p][g][v] = V{};
  for (size_t d = 0; d < Dv; d += kLanes) {
    for (size_t v = 0; v < NV; ++v) {
      V a[PB], b[PB];
      for (int p = 0; p < PB; ++p) {
        std::memcpy(&a[p], rows + p * stride + d + v * W, sizeof(V));
        std::memcpy(&b[p], rows + p * stride + D + d + v * W, sizeof(V));
      }
      for (int g = 0; g < GB; ++g) {
        V qq;
        std::memcpy(&qq, q + static_cast<size_t>(g) * D + d + v * W, sizeof(V));
        const auto positive = qq >= V{};
        // max(q * mn, q * mx) = q * (q >= 0 ? mx : mn) since mn <= mx.
        for (int p = 0; p < PB; ++p) acc[p][g][v] += qq * (positive ? b[p] : a[p]);
      }
    }
  }
  for (int p = 0; p < PB; ++p) {
    const float* mn = rows + p * stride;
    const float* mx = mn + D;
    float best = 0.0f;
    if constexpr (GB == 4) {
      V4 r = sum_lanes4<W>(acc[p]);
      for (int g = 0; g < 4; ++g) {
        const float* qg = q + static_cast<size_t>(g) * D;
        for (size_t d = Dv; d < D; ++d) r[g] += qg[d] * (qg[d] >= 0.0f ? mx[d] : mn[d]);
      }
      const V4 swapped = __builtin_shufflevector(r, r, 2, 3, 0, 1);
      const V4 m2 = r > swapped ? r : swapped;
      best = m2[0] > m2[1] ? m2[0] : m2[1];
      if (r[0] != r[0] || r[1] != r[1] || r[2] != r[2] || r[3] != r[3])
        best = std::numeric_limits<float>::quiet_NaN();  // NaN sticks
    } else {
      for (int g = 0; g < GB; ++g) {
        float s = sum_lanes<W>(acc[p][g]);
        const float* qg = q + static_cast<size_t>(g) * D;
        for (size_t d = Dv; d < D; ++d) s += qg[d] * (qg[d] >= 0.0f ? mx[d] : mn[d]);
        best = (g == 0 || s > best || s != s) ? s : best;  // NaN sticks
      }
    }
    out[p] = first ? best : ((best > out[p] || best != best) ? best : out[p]);
  }
}

// Bound of pages [0, n) for query heads q[0..GB), max-combined into out.
template <int W, int GB, int PB>
HETERO_INLINE void score_block(const float* rows, size_t stride, size_t n, size_t D, const float* q, float* out,
                               bool first) {
  size_t p = 0;
  for (; p + PB <= n; p += PB) score_group<W, GB, PB>(rows + p * stride, stride, D, q, out + p, first);
  for (; p < n; ++p) score_group<W, GB, 1>(rows + p * stride, stride, D, q, out + p, first);
}

template <int W, int GMAX, int PB>
HETERO_INLINE void score_rows(const float* rows, size_t stride, size_t n, size_t D, const float* q, size_t G,
                              float* out) {
  for (size_t g0 = 0; g0 < G; g0 += GMAX) {
    const float* qg = q + g0 * D;
    const bool first = g0 == 0;
    const size_t gb = std::min<size_t>(GMAX, G - g0);
    if (GMAX >= 4 && gb == 4) score_block<W, 4, PB>(rows, stride, n, D, qg, out, first);
    else if (GMAX >= 3 && gb == 3) score_block<W, 3, PB>(rows, stride, n, D, qg, out, first);
    else if (gb == 2) score_block<W, 2, PB>(rows, stride, n, D, qg, out, first);
    else score_block<W, 1, PB>(rows, stride, n, D, qg, out, first);
  }
}

// Asks for the summary rows of the next block while this one is scored (the hardware
// prefetcher alone leaves ~10% of the read bandwidth unused here).
HETERO_INLINE void prefetch_rows(const void* rows, size_t row_bytes, size_t stride_bytes, size_t n) {
  const char* r = static_cast<const char*>(rows);
  for (size_t p = 0; p < n; ++p)
    for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(r + p * stride_bytes + off);
}

template <int W, int GMAX, int PB>
HETERO_INLINE void score_f32(const float* rows, size_t stride, size_t n_pages, size_t D, const float* q, size_t G,
                             float* scores) {
  for (size_t p0 = 0; p0 < n_pages; p0 += kBlock) {
    if (p0 + kBlock < n_pages)
      prefetch_rows(rows + (p0 + kBlock) * stride, 2 * D * sizeof(float), stride * sizeof(float),
                    std::min(kBlock, n_pages - p0 - kBlock));
    score_rows<W, GMAX, PB>(rows + p0 * stride, stride, std::min(kBlock, n_pages - p0), D, q, G, scores + p0);
  }
}

// Half rows: each block of pages is widened to float32 (it stays in L1), then the float loop.
template <int W, int GMAX, int PB, typename Widen>
HETERO_INLINE void score_f16(const uint16_t* rows, size_t stride, size_t n_pages, size_t D, const float* q, size_t G,
                             float* scores, Widen widen) {
  std::vector<float>& wide = thread_scratch().wide;
  if (wide.size() < kBlock * 2 * D) wide.resize(kBlock * 2 * D);
  float* w = wide.data();
  for (size_t p0 = 0; p0 < n_pages; p0 += kBlock) {
    const size_t n = std::min(kBlock, n_pages - p0);
    if (p0 + kBlock < n_pages)
      prefetch_rows(rows + (p0 + kBlock) * stride, 2 * D * sizeof(uint16_t), stride * sizeof(uint16_t),
                    std::min(kBlock, n_pages - p0 - kBlock));
    for (size_t p = 0; p < n; ++p) widen(rows + (p0 + p) * stride, w + p * 2 * D, 2 * D);
    score_rows<W, GMAX, PB>(w, 2 * D, n, D, q, G, scores + p0);
  }
}

using ScoreFn = void (*)(const void*, bool, size_t, size_t, size_t, const float*, size_t, float*);

void widen_baseline(const uint16_t* src, float* dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
}

void score_baseline(const void* rows, bool half_rows, size_t stride, size_t n, size_t D, const float* q, size_t G,
                    float* out) {
  // 16 xmm registers: two heads at a time.
  if (half_rows)
    score_f16<4, 2, kPagesBaseline>(static_cast<const uint16_t*>(rows), stride, n, D, q, G, out, widen_baseline);
  else
    score_f32<4, 2, kPagesBaseline>(static_cast<const float*>(rows), stride, n, D, q, G, out);
}

#ifdef HETERO_X86
__attribute__((target("arch=x86-64-v3"))) void widen_avx2(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}
__attribute__((target("arch=x86-64-v4"))) void widen_avx512(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i,
                     _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}
__attribute__((target("arch=x86-64-v3"))) void score_avx2(const void* rows, bool half_rows, size_t stride, size_t n,
                                                            size_t D, const float* q, size_t G, float* out) {
  if (half_rows)
    score_f16<8, 4, kPagesAvx2>(static_cast<const uint16_t*>(rows), stride, n, D, q, G, out, widen_avx2);
  else
    score_f32<8, 4, kPagesAvx2>(static_cast<const float*>(rows), stride, n, D, q, G, out);
}
__attribute__((target("arch=x86-64-v4"))) void score_avx512(const void* rows, bool half_rows, size_t stride,
                                                              size_t n, size_t D, const float* q, size_t G,
                                                              float* out) {
  if (half_rows)
    score_f16<16, 4, kPagesAvx512>(static_cast<const uint16_t*>(rows), stride, n, D, q, G, out, widen_avx512);
  else
    score_f32<16, 4, kPagesAvx512>(static_cast<const float*>(rows), stride, n, D, q, G, out);
}
#endif

bool cpu_has(const std::string& isa) {
  if (isa == "baseline") return true;
#ifdef HETERO_X86
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma");
#endif
  return false;
}

ScoreFn fn_for(const std::string& isa) {
#ifdef HETERO_X86
  if (isa == "avx512") return score_avx512;
  if (isa == "avx2") return score_avx2;
#endif
  return score_baseline;
}

struct Choice {
  std::atomic<ScoreFn> fn;
  std::string name;  // written only with the GIL held (set_score_isa) or at load
  Choice() {
    name = "baseline";
    const char* forced = std::getenv("HETERO_HOST_ISA");
    if (forced && cpu_has(forced)) {
      name = forced;
    } else {
      for (const char* isa : {"avx512", "avx2"})
        if (cpu_has(isa)) {
          name = isa;
          break;
        }
    }
    fn.store(fn_for(name));
  }
};

Choice& choice() {
  static Choice c;
  return c;
}

}  // namespace

void score_pages(const void* rows, bool half_rows, size_t stride, size_t n_pages, size_t D, const float* q, size_t G,
                 float* scores) {
  choice().fn.load(std::memory_order_relaxed)(rows, half_rows, stride, n_pages, D, q, G, scores);
}

std::string score_isa() { return choice().name; }

bool set_score_isa(const std::string& isa) {
  if (isa != "baseline" && isa != "avx2" && isa != "avx512") return false;
  if (!cpu_has(isa)) return false;
  choice().name = isa;
  choice().fn.store(fn_for(isa));
  return true;
}

}  // namespace hetero_host
