/* Memory-as-Context (HMT-style memory bank): relevancy and readout.
 *
 * The math is hetero/methods/mac_reference.py. Keys float32 [B, cap, KD] on the device,
 * memory values float32 [B, cap, D]; the query vector is W_q mean(segment), formed by
 * segment_mean + project (project.clh).
 *
 *   segment_mean   m[b, i] = mean over the segment's L embeddings of feature i
 *   mac_scores     scores[b, j] = q[b] . k[b, j] * scale for j < lengths[b], -INF after
 *   mac_readout    out[b, o] = sum_j softmax(scores[b])_j v[b, j, o] over every valid entry,
 *                  or over the ids select_topk chose (width > 0); zeros for an empty row
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

/* global (D, B): entries are every j < lengths[b] (width == 0) or ids[b, 0, :width] >= 0 */
__kernel void mac_readout(const __global float *scores, const __global float *values, const __global int *ids,
                          const __global int *lengths, const int cap, const int n, const int dim, const int width,
                          __global float *out)
{
    const int o = get_global_id(0), b = get_global_id(1);
    if (o >= dim)
        return;
    const int len = min(lengths[b], n);
    const int count = width > 0 ? width : len;
    const __global float *s = scores + (size_t)b * n;
    const __global int *id = ids + (size_t)b * max(width, 1);
    float top = -INFINITY;
    for (int i = 0; i < count; ++i) {
        const int j = width > 0 ? id[i] : i;
        if (j >= 0)
            top = fmax(top, s[j]);
    }
    float total = 0.0f, acc = 0.0f;
    for (int i = 0; i < count; ++i) {
        const int j = width > 0 ? id[i] : i;
        if (j >= 0) {
            const float w = exp(s[j] - top);
            total += w;
            acc = fma(w, values[((size_t)b * cap + j) * dim + o], acc);
        }
    }
    out[(size_t)b * dim + o] = total > 0.0f ? acc / total : 0.0f;
}
