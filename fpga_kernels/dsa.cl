/* DeepSeek Sparse Attention's lightning indexer: projection, relevancy and exact top-k.
 *
 * The math is hetero/methods/dsa_reference.py. Index keys are float32 [B, cap, ID] (one per
 * token, shared by all index heads); the query token's index queries and weights are packed
 * [B, IH, ID + 1] (ID query features, then the head's weight). Scores are float32 [B, n].
 *
 *   project        y[r, :] = x[r, :] W^T          (project.clh, shared)
 *   rope           rotary embedding in place, cos/sin given per (row, pair)
 *   index_scores   I[b, s] = sum_j w_j ReLU(q_j . k_s), -INF at and past lengths[b]
 *   select_topk    per row the top k scores (ties -> lower index) as ascending token ids,
 *                  written for each of the KV heads that read them, -1 padded
 *
 * index_scores is a register-tiled outer product: a work-item walks its chunk of tokens 4
 * at a time and, per tile of up to 64 index heads, accumulates 4 x 64 dot products over ID
 * with float16 FMAs (the queries transposed once into local memory so a feature's heads are
 * contiguous loads). On an FPGA the same loop nest is a systolic array fed by the key
 * stream; on an AVX-512 CPU it keeps 16 vector accumulators in registers.
 *
 * select_topk (select_topk.clh, shared with other kernel files) is an exact radix select
 * that streams out the chosen ids in ascending order.
 *
 * Compile-time constants (-D): IH (index heads, a multiple of 16), ID (index head dim).
 */

#if !defined(IH) || !defined(ID)
#error "define IH and ID"
#endif
#if IH % 16 != 0
#error "IH (index heads) must be a multiple of 16"
#endif

#ifndef STOK
#define STOK 6     /* tokens per register tile of index_scores */
#endif
#define QW (ID + 1)

#include "project.clh"

/* x [rows, heads, stride]: features i and i + n_half of each head (i < n_half) rotate by the
 * angle whose cos/sin are cs[row, i, 0/1]. */
__kernel void rope(__global float *x, const __global float *cs, const int heads, const int stride,
                   const int n_half)
{
    const int i = get_global_id(0), h = get_global_id(1), r = get_global_id(2);
    if (i >= n_half)
        return;
    __global float *v = x + ((size_t)r * heads + h) * stride;
    const float c = cs[((size_t)r * n_half + i) * 2], s = cs[((size_t)r * n_half + i) * 2 + 1];
    const float a = v[i], b = v[i + n_half];
    v[i] = a * c - b * s;
    v[i + n_half] = b * c + a * s;
}

/* Index heads per register tile: NV float16 vectors (64 heads when IH allows). */
#if IH % 64 == 0
#define NV 4
#elif IH % 32 == 0
#define NV 2
#else
#define NV 1
#endif
#define HT (16 * NV)

inline float sum16(const float16 v)
{
    const float8 a = v.lo + v.hi;
    const float4 b = a.lo + a.hi;
    return (b.x + b.y) + (b.z + b.w);
}

/* Scores of the tokens [c * chunk, (c + 1) * chunk) of sequence b: global (n_chunks, B),
 * one work-item per work-group. */
__kernel void index_scores(const __global float *keys, /* [B, cap, ID] */
                           const __global float *qw,   /* [B, IH, ID + 1] */
                           const __global int *lengths, const int cap, const int n, const int chunk,
                           __global float *scores)     /* [B, n] */
{
    __local float qt[ID * IH]; /* qt[d * IH + j] = q_j[d] */
    __local float w[IH];
    const int c = get_global_id(0), b = get_global_id(1);
    const __global float *q = qw + (size_t)b * IH * QW;
    for (int j = 0; j < IH; ++j) {
        for (int d = 0; d < ID; ++d)
            qt[d * IH + j] = q[j * QW + d];
        w[j] = q[j * QW + ID];
    }
    const int len = min(lengths[b], n);
    const int t_begin = c * chunk, t_end = min(t_begin + chunk, n);
    const __global float *kb = keys + (size_t)b * cap * ID;
    __global float *out = scores + (size_t)b * n;
    for (int t = t_begin; t < t_end; t += STOK) {
        /* the last tile of a row re-reads its last valid token for the missing ones */
        const int last = max(min(len, t_end) - 1, t);
        const __global float *kr[STOK];
        _Pragma("unroll") for (int i = 0; i < STOK; ++i)
            kr[i] = kb + (size_t)min(t + i, last) * ID;
        float sv[STOK];
        _Pragma("unroll") for (int i = 0; i < STOK; ++i)
            sv[i] = 0.0f;
        if (t < len) {
            for (int jt = 0; jt < IH; jt += HT) {
                float16 acc[STOK][NV];
                _Pragma("unroll") for (int i = 0; i < STOK; ++i)
                    _Pragma("unroll") for (int v = 0; v < NV; ++v)
                        acc[i][v] = (float16)(0.0f);
                for (int d = 0; d < ID; ++d) {
                    float16 qv[NV];
                    _Pragma("unroll") for (int v = 0; v < NV; ++v)
                        qv[v] = vload16(0, qt + d * IH + jt + 16 * v);
                    _Pragma("unroll") for (int i = 0; i < STOK; ++i) {
                        const float16 kv = (float16)(kr[i][d]);
                        _Pragma("unroll") for (int v = 0; v < NV; ++v)
                            acc[i][v] = fma(kv, qv[v], acc[i][v]);
                    }
                }
                _Pragma("unroll") for (int v = 0; v < NV; ++v) {
                    const float16 wv = vload16(0, w + jt + 16 * v);
                    _Pragma("unroll") for (int i = 0; i < STOK; ++i)
                        sv[i] += sum16(fmax(acc[i][v], 0.0f) * wv);
                }
            }
        }
        for (int i = 0; i < STOK && t + i < t_end; ++i)
            out[t + i] = t + i < len ? sv[i] : -INFINITY;
    }
}

#include "select_topk.clh"
