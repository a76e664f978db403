/* SeerAttention-R style block gating, OpenCL C 1.2.
 *
 * Math: hetero/methods/seer_reference.py (the single reference).
 * Launchers: hetero/methods/_seer_cl.py. Apply (block-sparse attention) is page-sparse's
 * kernel (page_sparse.cl built with PAGE_SIZE = BLOCK_SIZE).
 *
 *   pool_project          prepare: per block touched by new tokens, [max | mean] pooling
 *                         (merged with the running stats of the partial last block) and
 *                         the projection w_k @ pooled -> gate keys
 *   store_gate_keys       the new gate keys into the capacity-padded gate-key memory
 *   gate_relevancy        per (sequence, KV head) row: q_gate = w_q @ mean of the group's
 *                         query heads, then softmax over the row's blocks of
 *                         q_gate . k_gate / sqrt(GATE_DIM)
 *   gate_select           retrieval: sink + local blocks forced, then the best others
 *                         (ties -> lower index) among those with prob >= thr, up to k;
 *                         streamed out as a compacted ascending id list, -1 padded.
 *                         thr = -INFINITY is top-k (exactly min(k, blocks) ids).
 *   gate_relevancy_select both fused: probabilities never reach global memory
 *
 * FPGA-minded like page_sparse.cl: inner loops over HEAD_DIM / GATE_DIM / BLOCK_SIZE /
 * K_MAX have compile-time trip counts (data-dependent limits are `if` guards); the only
 * data-dependent loops run over blocks and the query group; no atomics, no device
 * allocation. A row is one work-item ("task" style). Both relevancy kernels score a block
 * with the same inline function (explicit fma, fixed reduction order), so the fused and
 * unfused selections agree bit for bit.
 *
 * Compile-time defines (all required):
 *   HEAD_DIM      head dimension (any >= 1; multiples of 16 take the widest vectors)
 *   GATE_DIM      gate dimension (any >= 1)
 *   BLOCK_SIZE    tokens per block
 *   K_MAX         largest number of blocks a retrieval selects (the budget)
 *   STORAGE_HALF  0: keys / gate keys stored as float; 1: as half (vload_half / vstore_half,
 *                 core OpenCL 1.2). Running stats, weights, queries, probabilities: float.
 *                 Arithmetic is always fp32.
 */

#if !defined(HEAD_DIM) || !defined(GATE_DIM) || !defined(BLOCK_SIZE) || !defined(K_MAX) || !defined(STORAGE_HALF)
#error "define HEAD_DIM, GATE_DIM, BLOCK_SIZE, K_MAX and STORAGE_HALF"
#endif
#if HEAD_DIM < 1 || GATE_DIM < 1 || BLOCK_SIZE < 1 || K_MAX < 1
#error "HEAD_DIM, GATE_DIM, BLOCK_SIZE and K_MAX must be positive"
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

/* ---- vector widths: the widest float vector dividing HEAD_DIM (VW) and GATE_DIM (GW) ---- */
#if HEAD_DIM % 16 == 0
#define VW 16
#elif HEAD_DIM % 8 == 0
#define VW 8
#elif HEAD_DIM % 4 == 0
#define VW 4
#elif HEAD_DIM % 2 == 0
#define VW 2
#else
#define VW 1
#endif
#define NV (HEAD_DIM / VW)

#if GATE_DIM % 16 == 0
#define GW 16
#elif GATE_DIM % 8 == 0
#define GW 8
#elif GATE_DIM % 4 == 0
#define GW 4
#elif GATE_DIM % 2 == 0
#define GW 2
#else
#define GW 1
#endif
#define NG (GATE_DIM / GW)

/* Horizontal sums in a fixed pairwise order (halves first). */
inline float hsum1(float v) { return v; }
inline float hsum2(float2 v) { return v.x + v.y; }
inline float hsum4(float4 v) { return hsum2(v.lo + v.hi); }
inline float hsum8(float8 v) { return hsum4(v.lo + v.hi); }
inline float hsum16(float16 v) { return hsum8(v.lo + v.hi); }

#if VW == 1
typedef float vecf;
#define LOADF(i, p) ((p)[i])
#else
typedef CAT(float, VW) vecf;
#define LOADF(i, p) CAT(vload, VW)((i), (p))
#endif
#define hsumv CAT(hsum, VW)

#if GW == 1
typedef float vecg;
#define LOADGF(i, p) ((p)[i])
#else
typedef CAT(float, GW) vecg;
#define LOADGF(i, p) CAT(vload, GW)((i), (p))
#endif
#define hsumg CAT(hsum, GW)

/* ---- storage type: the only place that knows whether T is float or half ---------------- */
#if STORAGE_HALF
typedef half store_t; /* pointer-only use of half is legal without cl_khr_fp16 */
typedef ushort bits_t;
#if VW == 1
#define LOADK(i, p) vload_half((i), (p))
#else
#define LOADK(i, p) CAT(vload_half, VW)((i), (p))
#endif
#if GW == 1
#define LOADG(i, p) vload_half((i), (p))
#else
#define LOADG(i, p) CAT(vload_half, GW)((i), (p))
#endif
#define STORE_ELEM(v, i, p) vstore_half((v), (i), (p))
#else
typedef float store_t;
typedef uint bits_t;
#define LOADK(i, p) LOADF(i, p)
#define LOADG(i, p) LOADGF(i, p)
#define STORE_ELEM(v, i, p) ((p)[i] = (v))
#endif

inline int blocks_of(const int length) { return (length + BLOCK_SIZE - 1) / BLOCK_SIZE; }

/* ======================================================================================
 * Prepare: pooling + projection, and the gate-key store
 * ====================================================================================*/

/* delta[b,h,j] = w_k @ [max | mean] of absolute block start[b]/BLOCK_SIZE + j, over the
 * block's tokens so far: the earlier ones (running stats tail_in[b,h] = (max, sum), only
 * for j == 0 when start[b] is inside a block) and the new ones keys_new[b,h,0:count[b]]
 * that fall in the block. Sums run in token order, so appending token by token gives the
 * same bits as pooling at once. Blocks without any token get zeros (never stored).
 * tail_out[b,h] receives the running stats of the sequence's new partial last block
 * ((-inf, 0) when the new length is a multiple of BLOCK_SIZE).
 * Global size (n_local, heads, batch). */
__kernel void pool_project(const __global store_t *keys_new, /* [B,H,n_new,D] */
                           const __global float *tail_in,    /* [B,H,2,D] (max, sum) */
                           const __global float *w_k,        /* [GATE_DIM, 2*D] */
                           const __global int *start,        /* [B] */
                           const __global int *count,        /* [B] */
                           const int heads, const int n_new, const int n_local,
                           __global store_t *delta,          /* [B,H,n_local,GATE_DIM] */
                           __global float *tail_out)         /* [B,H,2,D] */
{
    const int j = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (j >= n_local)
        return;
    const int cnt = min(count[b], n_new);
    const int st = start[b];
    const int off = st % BLOCK_SIZE;
    const int n0 = j * BLOCK_SIZE - off; /* new-token index of the block's first slot */
    const size_t row = (size_t)(b * heads + h);
    const __global store_t *src = keys_new + row * n_new * HEAD_DIM;
    const __global float *tin = tail_in + row * 2 * HEAD_DIM;

    vecf mx[NV], sm[NV];
    int total = (j == 0 && cnt > 0) ? off : 0; /* earlier tokens of the block */
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        mx[v] = total > 0 ? LOADF(v, tin) : (vecf)(-INFINITY);
        sm[v] = total > 0 ? LOADF(NV + v, tin) : (vecf)(0.0f);
    }
    for (int t = 0; t < BLOCK_SIZE; ++t) { /* fixed trip, guarded */
        const int n = n0 + t;
        if (n >= 0 && n < cnt) {
            const __global store_t *x = src + (size_t)n * HEAD_DIM;
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                const vecf k = LOADK(v, x);
                mx[v] = fmax(mx[v], k);
                sm[v] = sm[v] + k;
            }
            ++total;
        }
    }

    /* running stats of the new partial last block, written by that block's work-item */
    const int end = st + cnt;
    const int j_last = cnt > 0 ? (end - 1) / BLOCK_SIZE - st / BLOCK_SIZE : 0;
    if (j == j_last) {
        __global float *tout = tail_out + row * 2 * HEAD_DIM;
        for (int e = 0; e < 2 * HEAD_DIM; ++e) {
            if (cnt == 0)
                tout[e] = tin[e];
            else if (end % BLOCK_SIZE == 0)
                tout[e] = e < HEAD_DIM ? -INFINITY : 0.0f;
        }
        if (cnt > 0 && end % BLOCK_SIZE != 0) {
#pragma unroll
            for (int v = 0; v < NV; ++v) {
#if VW == 1
                tout[v] = mx[v];
                tout[HEAD_DIM + v] = sm[v];
#else
                CAT(vstore, VW)(mx[v], v, tout);
                CAT(vstore, VW)(sm[v], NV + v, tout);
#endif
            }
        }
    }

    /* pooled = [max | mean]; zeros for a block without tokens */
    const float denom = (float)max(total, 1);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        mx[v] = total > 0 ? mx[v] : (vecf)(0.0f);
        sm[v] = sm[v] / (vecf)(denom);
    }
    __global store_t *dst = delta + (row * n_local + j) * GATE_DIM;
    for (int g = 0; g < GATE_DIM; ++g) {
        const __global float *w = w_k + (size_t)g * 2 * HEAD_DIM;
        vecf acc = (vecf)(0.0f);
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            acc = fma(LOADF(v, w), mx[v], acc);
            acc = fma(LOADF(NV + v, w), sm[v], acc);
        }
        STORE_ELEM(hsumv(acc), g, dst);
    }
}

/* gate_keys[b,h,start[b]/BLOCK_SIZE + j] = delta[b,h,j] for the blocks the new tokens
 * touch (j < ceil((start[b] % BLOCK_SIZE + count[b]) / BLOCK_SIZE)); bit copy. Blocks at
 * or past p_cap are skipped. Global size (n_local, heads, batch). */
__kernel void store_gate_keys(__global store_t *gate_keys,     /* [B,H,p_cap,GATE_DIM] */
                              const __global store_t *delta,   /* [B,H,n_local,GATE_DIM] */
                              const __global int *start,       /* [B] */
                              const __global int *count,       /* [B] */
                              const int heads, const int p_cap, const int n_local)
{
    const int j = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    const int cnt = count[b];
    if (j >= n_local || cnt <= 0)
        return;
    const int st = start[b];
    if (j >= (st % BLOCK_SIZE + cnt + BLOCK_SIZE - 1) / BLOCK_SIZE)
        return;
    const int p = st / BLOCK_SIZE + j;
    if (p >= p_cap)
        return;
    const size_t row = (size_t)(b * heads + h);
    const __global bits_t *from = (const __global bits_t *)(delta + (row * n_local + j) * GATE_DIM);
    __global bits_t *to = (__global bits_t *)(gate_keys + (row * p_cap + p) * GATE_DIM);
    for (int i = 0; i < GATE_DIM; ++i)
        to[i] = from[i];
}

/* ======================================================================================
 * Relevancy: gate probabilities
 * ====================================================================================*/

/* q_gate = scale * (w_q @ mean_g query[g]) into qg[GATE_DIM] (private). */
inline void gate_query(const __global float *q, /* the row's `group` query heads [group, D] */
                       const int group, const __global float *w_q, const float scale, float *qg)
{
    vecf qm[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v)
        qm[v] = (vecf)(0.0f);
    for (int g = 0; g < group; ++g)
#pragma unroll
        for (int v = 0; v < NV; ++v)
            qm[v] = qm[v] + LOADF(v, q + (size_t)g * HEAD_DIM);
#pragma unroll
    for (int v = 0; v < NV; ++v)
        qm[v] = qm[v] / (vecf)((float)group);
    for (int i = 0; i < GATE_DIM; ++i) {
        vecf acc = (vecf)(0.0f);
#pragma unroll
        for (int v = 0; v < NV; ++v)
            acc = fma(LOADF(v, w_q + (size_t)i * HEAD_DIM), qm[v], acc);
        qg[i] = hsumv(acc) * scale;
    }
}

/* The scaled gate logit of one block: q_gate . k_gate (explicit fma, fixed order). */
inline float block_logit(const __global store_t *gk, const float *qg)
{
    vecg acc = (vecg)(0.0f);
#pragma unroll
    for (int v = 0; v < NG; ++v)
        acc = fma(LOADG(v, gk), LOADGF(v, qg), acc);
    return hsumg(acc);
}

/* Online softmax statistics of a row's first nb blocks: the max logit m and
 * s = sum exp(logit - m). */
inline void softmax_stats(const __global store_t *row, const float *qg, const int nb, float *m_out,
                          float *s_out)
{
    float m = -INFINITY, s = 0.0f;
    for (int p = 0; p < nb; ++p) {
        const float l = block_logit(row + (size_t)p * GATE_DIM, qg);
        if (l > m) {
            s = s * exp(m - l) + 1.0f; /* exp(-inf) = 0 on the first block */
            m = l;
        } else {
            s += exp(l - m);
        }
    }
    *m_out = m;
    *s_out = s;
}

inline float block_prob(const __global store_t *row, const float *qg, const int p, const float m, const float s)
{
    return exp(block_logit(row + (size_t)p * GATE_DIM, qg) - m) / s;
}

/* probs[b,h,p] for p < n_blocks: the gate probability, -INFINITY past the row's blocks.
 * Global size (heads, batch). */
__kernel void gate_relevancy(const __global store_t *gate_keys, /* [B,H,p_cap,GATE_DIM] */
                             const __global float *w_q,         /* [GATE_DIM, D] */
                             const __global float *query,       /* [B,H*group,D] */
                             const __global int *lengths,       /* [B] */
                             const int heads, const int p_cap, const int n_blocks, const int group,
                             const float scale,
                             __global float *probs)             /* [B,H,n_blocks] */
{
    const int h = get_global_id(0), b = get_global_id(1);
    const size_t r = (size_t)(b * heads + h);
    const int nb = min(blocks_of(lengths[b]), n_blocks);
    float qg[GATE_DIM];
    gate_query(query + r * group * HEAD_DIM, group, w_q, scale, qg);
    const __global store_t *row = gate_keys + r * p_cap * GATE_DIM;
    float m, s;
    softmax_stats(row, qg, nb, &m, &s);
    __global float *out = probs + r * n_blocks;
    for (int p = 0; p < n_blocks; ++p)
        out[p] = p < nb ? block_prob(row, qg, p, m, s) : -INFINITY;
}

/* ======================================================================================
 * Retrieval: streaming selection, compacted output
 * ====================================================================================*/

/* The best candidates so far, best first: a sorted insertion buffer of K_MAX slots (in
 * hardware a shift register with K_MAX comparators). Candidates arrive in ascending block
 * order, so one that only ties a kept one ranks after it (ties -> lower index). */
typedef struct {
    float s[K_MAX];
    int i[K_MAX];
    int n; /* slots in use */
} Sel;

inline void sel_offer(Sel *t, const int need, const float s, const int id)
{
    if (need <= 0 || (t->n >= need && !(s > t->s[need - 1])))
        return;
    int pos = 0; /* slots that beat the newcomer */
    for (int j = 0; j < K_MAX; ++j)
        if (j < t->n && t->s[j] >= s)
            ++pos;
    const int last = min(t->n, need - 1); /* the slot filled by the shift (the worst drops when full) */
    for (int j = K_MAX - 1; j > 0; --j) {
        if (j <= last && j > pos) {
            t->s[j] = t->s[j - 1];
            t->i[j] = t->i[j - 1];
        }
    }
    t->s[pos] = s;
    t->i[pos] = id;
    t->n = min(t->n + 1, need);
}

/* Forced blocks of a row with nb blocks: [0, *sink_hi) and [*local_lo, nb); the others
 * [*sink_hi, *local_lo) compete for *need slots. */
inline void row_plan(const int nb, const int k, const int sink, const int local_, int *sink_hi, int *local_lo,
                     int *need)
{
    const int sh = min(sink, nb);
    const int ll = max(sh, nb - local_);
    *sink_hi = sh;
    *local_lo = ll;
    *need = min(k - sh - (nb - ll), K_MAX);
}

/* Streams the row's ids out in ascending order: sink blocks, the selected others (placed
 * by rank counting: rank = kept ids below), local blocks, then -1 up to width. */
inline void write_ids(__global int *out, const int width, const int sink_hi, const int local_lo, const int nb,
                      const Sel *t)
{
    for (int i = 0; i < K_MAX; ++i)
        if (i < sink_hi)
            out[i] = i;
    for (int a = 0; a < K_MAX; ++a) {
        if (a < t->n) {
            const int id = t->i[a];
            int rank = 0;
            for (int c = 0; c < K_MAX; ++c)
                if (c < t->n && t->i[c] < id)
                    ++rank;
            out[sink_hi + rank] = id;
        }
    }
    const int o = sink_hi + t->n;
    for (int i = 0; i < K_MAX; ++i)
        if (local_lo + i < nb)
            out[o + i] = local_lo + i;
    const int used = o + max(nb - local_lo, 0);
    for (int i = 0; i < K_MAX; ++i)
        if (used + i < width)
            out[used + i] = -1;
}

/* block_ids[b,h,:k]: forced sink / local blocks plus, among the others with
 * probs >= thr, the best (ties -> lower index) up to k in all; ascending, -1 padded.
 * thr = -INFINITY selects exactly min(k, blocks) (top-k). Caller: sink + local <= k <= K_MAX.
 * Global size (heads, batch). */
__kernel void gate_select(const __global float *probs, /* [B,H,n_blocks] */
                          const __global int *lengths,
                          const int heads, const int n_blocks, const int k, const int sink, const int local_,
                          const float thr,
                          __global int *block_ids)     /* [B,H,k] */
{
    const int h = get_global_id(0), b = get_global_id(1);
    const size_t r = (size_t)(b * heads + h);
    const int nb = min(blocks_of(lengths[b]), n_blocks);
    int sink_hi, local_lo, need;
    row_plan(nb, k, sink, local_, &sink_hi, &local_lo, &need);
    const __global float *row = probs + r * n_blocks;
    Sel t;
    t.n = 0;
    for (int p = sink_hi; p < local_lo; ++p) {
        const float s = row[p];
        if (s >= thr)
            sel_offer(&t, need, s, p);
    }
    write_ids(block_ids + r * k, k, sink_hi, local_lo, nb, &t);
}

/* FUSED gate_relevancy + gate_select: each competing block's probability is computed
 * (exactly as gate_relevancy computes it) and offered at once; forced blocks are only
 * counted in the softmax. Global size (heads, batch). */
__kernel void gate_relevancy_select(const __global store_t *gate_keys, /* [B,H,p_cap,GATE_DIM] */
                                    const __global float *w_q,         /* [GATE_DIM, D] */
                                    const __global float *query,       /* [B,H*group,D] */
                                    const __global int *lengths,       /* [B] */
                                    const int heads, const int p_cap, const int n_blocks, const int group,
                                    const float scale, const int k, const int sink, const int local_,
                                    const float thr,
                                    __global int *block_ids)           /* [B,H,k] */
{
    const int h = get_global_id(0), b = get_global_id(1);
    const size_t r = (size_t)(b * heads + h);
    const int nb = min(blocks_of(lengths[b]), n_blocks);
    int sink_hi, local_lo, need;
    row_plan(nb, k, sink, local_, &sink_hi, &local_lo, &need);
    Sel t;
    t.n = 0;
    if (need > 0) {
        float qg[GATE_DIM];
        gate_query(query + r * group * HEAD_DIM, group, w_q, scale, qg);
        const __global store_t *row = gate_keys + r * p_cap * GATE_DIM;
        float m, s;
        softmax_stats(row, qg, nb, &m, &s);
        for (int p = sink_hi; p < local_lo; ++p) {
            const float pr = block_prob(row, qg, p, m, s);
            if (pr >= thr)
                sel_offer(&t, need, pr, p);
        }
    }
    write_ids(block_ids + r * k, k, sink_hi, local_lo, nb, &t);
}
