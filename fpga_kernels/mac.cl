/* Memory-as-Context (HMT-style memory bank): relevancy and readout.
 *
 * The math is hetero/methods/mac_reference.py. Keys float32 [B, cap, KD] on the device,
 * memory values float32 [B, cap, D]; the query vector is W_q mean(segment), formed by
 * segment_mean + project (project.clh).
 *
 *   segment_mean   m[b, i] = mean over the segment's L embeddings of feature i
 *   mac_scores     scores[b, j] = q[b] . k[b, j] * scale for j < lengths[b], -INF after
 *   mac_softmax    per row, the softmax weights of the entries read (every valid one, or the
 *                  ids select_topk chose), 0 elsewhere; all 0 for an empty row
 *   mac_readout    out[b, o] = sum_j w[b, j] v[b, j, o], as per-chunk partial sums
 *                  (mac_readout_partial) and their total
 */

#include "project.clh"
#include "select_topk.clh"

/* global (D, B) */
__kernel void segment_mean(const __global float *seg, const int len, const int dim, __global float *out)
{
    const int i = get_global_id(0), b = get_global_id(1);
    if (i >= dim)
        return;
    const __global float *s = seg + (size_t)b * len * dim + i;
    float acc = 0.0f;
    for (int t = 0; t < len; ++t)
        acc += s[(size_t)t * dim];
    out[(size_t)b * dim + i] = acc / (float)len;
}

/* global (n, B) */
__kernel void mac_scores(const __global float *keys, const __global float *q, const __global int *lengths,
                         const int cap, const int n, const int kd, const float scale, __global float *scores)
{
    const int j = get_global_id(0), b = get_global_id(1);
    if (j >= n)
        return;
    float acc = -INFINITY;
    if (j < lengths[b]) {
        const __global float *k = keys + ((size_t)b * cap + j) * kd;
        const __global float *qb = q + (size_t)b * kd;
        acc = 0.0f;
        for (int e = 0; e < kd; ++e)
            acc = fma(qb[e], k[e], acc);
        acc *= scale;
    }
    scores[(size_t)b * n + j] = acc;
}

/* The softmax weights of row b, once: w[b, j] for the entries read (every j < lengths[b],
 * or with width > 0 the ids select_topk chose), 0 elsewhere. One work-item per row. */
__kernel void mac_softmax(const __global float *scores, const __global int *ids, const __global int *lengths,
                          const int n, const int width, __global float *w)
{
    const int b = get_global_id(0);
    const int len = min(lengths[b], n);
    const int count = width > 0 ? width : len;
    const __global float *s = scores + (size_t)b * n;
    const __global int *id = ids + (size_t)b * max(width, 1);
    __global float *wb = w + (size_t)b * n;
    float top = -INFINITY;
    for (int i = 0; i < count; ++i) {
        const int j = width > 0 ? id[i] : i;
        if (j >= 0)
            top = fmax(top, s[j]);
    }
    for (int j = 0; j < n; ++j)
        wb[j] = 0.0f;
    float total = 0.0f;
    for (int i = 0; i < count; ++i) {
        const int j = width > 0 ? id[i] : i;
        if (j >= 0) {
            wb[j] = exp(s[j] - top);
            total += wb[j];
        }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int j = 0; j < n; ++j)
        wb[j] *= inv;
}

/* partial[c, b, :] = sum of w[b, j] v[b, j, :] over the entries j of chunk c (j < lengths[b]):
 * each work-item streams its chunk of entries once, row by row, into a dim-long partial sum
 * that stays in cache (entries with weight 0, unread in top-k mode, are skipped).
 * global (n_chunks, B). */
__kernel void mac_readout_partial(const __global float *w, const __global float *values,
                                  const __global int *lengths, const int cap, const int n, const int dim,
                                  const int chunk, __global float *partial)
{
    const int c = get_global_id(0), b = get_global_id(1);
    __global float *p = partial + ((size_t)c * get_global_size(1) + b) * dim;
    for (int o = 0; o < dim; ++o)
        p[o] = 0.0f;
    const int end = min(min(lengths[b], n), (c + 1) * chunk);
    const __global float *wb = w + (size_t)b * n;
    for (int j = c * chunk; j < end; ++j) {
        const float wj = wb[j];
        if (wj == 0.0f)
            continue;
        const __global float *v = values + ((size_t)b * cap + j) * dim;
        for (int o = 0; o < dim; ++o)
            p[o] = fma(wj, v[o], p[o]);
    }
}

/* out[b, o] = the sum of the chunks' partial sums. global (D, B). */
__kernel void mac_readout(const __global float *partial, const int n_chunks, const int dim, __global float *out)
{
    const int o = get_global_id(0), b = get_global_id(1);
    if (o >= dim)
        return;
    const int batch = get_global_size(1);
    float acc = 0.0f;
    for (int c = 0; c < n_chunks; ++c)
        acc += partial[((size_t)c * batch + b) * dim + o];
    out[(size_t)b * dim + o] = acc;
}
