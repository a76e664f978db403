/* Dense retrieval (DenseRetrieval): inner-product scoring of queries against stored
 * document embeddings, exact top-k, and the ranking of the selected ids.
 *
 *   scores_dot1/2/4  scores[b, i] = q_b . e_i for 1, 2 or 4 queries per work-item: each
 *                    work-item walks its chunk of documents DT at a time and keeps DT x QB
 *                    float16 accumulators over the features (a document row and a query row
 *                    are both contiguous float16 loads), reduced once per document at the end.
 *                    Batches below 16: the embeddings stream once per group of QB queries.
 *   scores_outer16/32  the same scores as a register-tiled outer product for batches of 16 and
 *                    more: the queries of a tile are transposed once into local memory so a
 *                    feature's 16 or 32 query values are one or two float16 loads, and every
 *                    embedding element read feeds 16 or 32 FMAs (the GEMM form; on an FPGA a
 *                    systolic array fed by the embedding stream, on an AVX-512 CPU STOK x NV
 *                    vector accumulators in registers).
 *   select_topk      (select_topk.clh) per row the k best scores, ties -> lower id, as ids in
 *                    ascending order
 *   rank_topk        those ids ranked by (score descending, id ascending), with their scores;
 *                    -1 / -INF past the row's last document. One work-item per output slot
 *                    counts the entries that rank before it (k^2 compares per row, tiny for the
 *                    k of retrieval), so no sort runs on the device.
 *
 * Embeddings are float32 [cap, DIM] (row i = document i); queries float32 [B, DIM];
 * scores float32 [B, n]. Compile-time constant (-D): DIM (embedding dimension).
 */

#ifndef DIM
#error "define DIM"
#endif

#include "select_topk.clh"

#define DV (DIM / 16) /* whole float16 vectors per row */
#define DT 4          /* documents per register tile of scores_dot */
#ifndef STOK
#define STOK 6        /* documents per register tile of scores_outer */
#endif

inline float hsum16(const float16 v)
{
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    return (b.x + b.y) + (b.z + b.w);
}

/* Documents [c * chunk, (c + 1) * chunk) against queries [g * QB, (g + 1) * QB):
 * global (n_chunks, ceil(nq / QB)), one work-item per work-group. */
#define SCORES_DOT(NAME, QB)                                                                           \
    __kernel void NAME(const __global float *emb, const __global float *q, const int nq, const int n,  \
                       const int chunk, __global float *scores)                                        \
    {                                                                                                  \
        const int t_begin = get_global_id(0) * chunk, q0 = get_global_id(1) * QB;                      \
        const int t_end = min(t_begin + chunk, n);                                                     \
        const __global float *qr[QB];                                                                  \
        _Pragma("unroll") for (int i = 0; i < QB; ++i)                                                 \
            qr[i] = q + (size_t)min(q0 + i, nq - 1) * DIM;                                             \
        for (int t = t_begin; t < t_end; t += DT) {                                                    \
            const __global float *er[DT];                                                              \
            _Pragma("unroll") for (int j = 0; j < DT; ++j)                                             \
                er[j] = emb + (size_t)min(t + j, t_end - 1) * DIM;                                     \
            float16 acc[DT][QB];                                                                       \
            _Pragma("unroll") for (int j = 0; j < DT; ++j)                                             \
                _Pragma("unroll") for (int i = 0; i < QB; ++i)                                         \
                    acc[j][i] = (float16)(0.0f);                                                       \
            for (int v = 0; v < DV; ++v) {                                                             \
                float16 ev[DT], qv[QB];                                                                \
                _Pragma("unroll") for (int j = 0; j < DT; ++j)                                         \
                    ev[j] = vload16(v, er[j]);                                                         \
                _Pragma("unroll") for (int i = 0; i < QB; ++i)                                         \
                    qv[i] = vload16(v, qr[i]);                                                         \
                _Pragma("unroll") for (int j = 0; j < DT; ++j)                                         \
                    _Pragma("unroll") for (int i = 0; i < QB; ++i)                                     \
                        acc[j][i] = fma(ev[j], qv[i], acc[j][i]);                                      \
            }                                                                                          \
            _Pragma("unroll") for (int j = 0; j < DT; ++j)                                             \
                _Pragma("unroll") for (int i = 0; i < QB; ++i) {                                       \
                    float s = hsum16(acc[j][i]);                                                       \
                    for (int e = DV * 16; e < DIM; ++e)                                                \
                        s = fma(er[j][e], qr[i][e], s);                                                \
                    if (t + j < t_end && q0 + i < nq)                                                  \
                        scores[(size_t)(q0 + i) * n + t + j] = s;                                      \
                }                                                                                      \
        }                                                                                              \
    }

SCORES_DOT(scores_dot1, 1)
SCORES_DOT(scores_dot2, 2)
SCORES_DOT(scores_dot4, 4)

/* Documents [c * chunk, (c + 1) * chunk) against the 16 * NV queries of tile g:
 * global (n_chunks, ceil(nq / (16 * NV))), one work-item per work-group. */
#define SCORES_OUTER(NAME, NV)                                                                         \
    __kernel void NAME(const __global float *emb, const __global float *q, const int nq, const int n,  \
                       const int chunk, __global float *scores)                                        \
    {                                                                                                  \
        __local float qt[DIM * 16 * NV]; /* qt[e * 16NV + i] = query (q0 + i)'s feature e */           \
        const int t_begin = get_global_id(0) * chunk, q0 = get_global_id(1) * (16 * NV);               \
        const int t_end = min(t_begin + chunk, n);                                                     \
        for (int i = 0; i < 16 * NV; ++i) {                                                            \
            const __global float *qi = q + (size_t)min(q0 + i, nq - 1) * DIM;                          \
            for (int e = 0; e < DIM; ++e)                                                              \
                qt[e * 16 * NV + i] = qi[e];                                                           \
        }                                                                                              \
        for (int t = t_begin; t < t_end; t += STOK) {                                                  \
            const __global float *er[STOK];                                                            \
            _Pragma("unroll") for (int j = 0; j < STOK; ++j)                                           \
                er[j] = emb + (size_t)min(t + j, t_end - 1) * DIM;                                     \
            float16 acc[STOK][NV];                                                                     \
            _Pragma("unroll") for (int j = 0; j < STOK; ++j)                                           \
                _Pragma("unroll") for (int v = 0; v < NV; ++v)                                         \
                    acc[j][v] = (float16)(0.0f);                                                       \
            for (int e = 0; e < DIM; ++e) {                                                            \
                float16 qv[NV];                                                                        \
                _Pragma("unroll") for (int v = 0; v < NV; ++v)                                         \
                    qv[v] = vload16(0, qt + e * 16 * NV + 16 * v);                                     \
                _Pragma("unroll") for (int j = 0; j < STOK; ++j) {                                     \
                    const float16 ev = (float16)(er[j][e]);                                            \
                    _Pragma("unroll") for (int v = 0; v < NV; ++v)                                     \
                        acc[j][v] = fma(ev, qv[v], acc[j][v]);                                         \
                }                                                                                      \
            }                                                                                          \
            _Pragma("unroll") for (int j = 0; j < STOK; ++j) {                                         \
                if (t + j >= t_end)                                                                    \
                    break;                                                                             \
                _Pragma("unroll") for (int v = 0; v < NV; ++v) {                                       \
                    float lane[16];                                                                    \
                    vstore16(acc[j][v], 0, lane);                                                      \
                    for (int l = 0; l < 16; ++l)                                                       \
                        if (q0 + 16 * v + l < nq)                                                      \
                            scores[(size_t)(q0 + 16 * v + l) * n + t + j] = lane[l];                   \
                }                                                                                      \
            }                                                                                          \
        }                                                                                              \
    }

SCORES_OUTER(scores_outer16, 1)
SCORES_OUTER(scores_outer32, 2)

/* ids [B, k] and top [B, k]: the `width` ids sel[b, :] (ascending, from select_topk) placed at
 * their rank by (score desc, id asc), their scores beside them; slots >= width get -1 / -INF.
 * global (k, B). */
__kernel void rank_topk(const __global float *scores, /* [B, n] */
                        const __global int *sel,      /* [B, width] */
                        const int n, const int width, const int k,
                        __global int *ids, __global float *top)
{
    const int i = get_global_id(0), b = get_global_id(1);
    if (i >= k)
        return;
    __global int *out_ids = ids + (size_t)b * k;
    __global float *out_top = top + (size_t)b * k;
    if (i >= width) {
        out_ids[i] = -1;
        out_top[i] = -INFINITY;
        return;
    }
    const __global int *row = sel + (size_t)b * width;
    const __global float *s = scores + (size_t)b * n;
    const int id = row[i];
    const float si = id >= 0 ? s[id] : -INFINITY;
    int rank = 0;
    for (int j = 0; j < width; ++j) {
        const int jd = row[j];
        const float sj = jd >= 0 ? s[jd] : -INFINITY;
        rank += (sj > si || (sj == si && j < i)) ? 1 : 0;
    }
    out_ids[rank] = id;
    out_top[rank] = si;
}

/* --- two-stage retrieval: dense re-scoring of a first stage's candidates ------------------ */

/* cand [B, n_cand]: each row sorted ascending in place, -1 (no candidate) last, so that
 * candidate positions order like document ids. One work-item per row (n_cand is small). */
__kernel void sort_candidates(__global int *cand, const int n_cand)
{
    __global int *row = cand + (size_t)get_global_id(0) * n_cand;
    for (int i = 1; i < n_cand; ++i) {
        const int v = row[i];
        const uint key = (uint)v; /* -1 -> UINT_MAX: last */
        int j = i - 1;
        while (j >= 0 && (uint)row[j] > key) {
            row[j + 1] = row[j];
            --j;
        }
        row[j + 1] = v;
    }
}

/* scores [B, n_cand] = q[b] . emb[cand[b, j]], -INF where cand is -1. global (n_cand, B). */
__kernel void rescore(const __global float *emb, const __global float *q, const __global int *cand,
                      const int n_cand, const int dim, __global float *scores)
{
    const int j = get_global_id(0), b = get_global_id(1);
    if (j >= n_cand)
        return;
    const int id = cand[(size_t)b * n_cand + j];
    float acc = -INFINITY;
    if (id >= 0) {
        const __global float *e = emb + (size_t)id * dim;
        const __global float *qb = q + (size_t)b * dim;
        acc = 0.0f;
        for (int i = 0; i < dim; ++i)
            acc = fma(qb[i], e[i], acc);
    }
    scores[(size_t)b * n_cand + j] = acc;
}

/* ids [B, k] = cand[b, pos[b, i]] (pos -1 -> -1), in place of the positions. global (k, B). */
__kernel void candidate_ids(__global int *pos, const __global int *cand, const int n_cand, const int k)
{
    const int i = get_global_id(0), b = get_global_id(1);
    if (i >= k)
        return;
    const int p = pos[(size_t)b * k + i];
    pos[(size_t)b * k + i] = p >= 0 ? cand[(size_t)b * n_cand + p] : -1;
}
