/* Page-level query-aware sparse attention (Quest / LServe style), OpenCL C 1.2.
 *
 * Math: hetero/methods/page_sparse_reference.py (the single reference).
 * Launchers: hetero/methods/_page_sparse_cl.py.
 *
 * Written so an FPGA HLS flow (Xilinx Vitis, Intel AOC) could take it as is:
 *   - every inner loop (head_dim, group, page tokens, top-k slots) has a
 *     compile-time trip count; data-dependent limits are `if` guards inside them;
 *   - the only data-dependent loops are outer loops over pages / chunks / selected pages,
 *     bounded by kernel arguments;
 *   - no device-side allocation, no recursion, no atomics; top-k is a fixed-size
 *     streaming sorted insertion buffer (K_MAX slots) per work-item, then a merge kernel.
 * The kernels that do the heavy lifting are single-work-item "task" style loops over a
 * chunk of pages (the idiomatic FPGA form, and on a CPU device one work-item per chunk
 * keeps the per-page work vectorised over HEAD_DIM with explicit vector types).
 *
 * Compile-time defines (all required):
 *   HEAD_DIM      head dimension (any; multiples of 16 take the fastest paths)
 *   GROUP         query heads per KV head (GQA)
 *   PAGE_SIZE     tokens per page
 *   K_MAX         largest number of pages a retrieval may select
 *   STORAGE_HALF  0: keys / values / summaries stored as float; 1: stored as half
 *                 (vload_half* / vstore_half*, core OpenCL 1.2, no cl_khr_fp16).
 *                 Arithmetic is always fp32.
 */

#if !defined(HEAD_DIM) || !defined(GROUP) || !defined(PAGE_SIZE) || !defined(K_MAX) || !defined(STORAGE_HALF)
#error "define HEAD_DIM, GROUP, PAGE_SIZE, K_MAX and STORAGE_HALF"
#endif
#if GROUP < 1 || PAGE_SIZE < 1 || K_MAX < 1
#error "GROUP, PAGE_SIZE and K_MAX must be positive"
#endif

/* ---- vector width over HEAD_DIM: the widest float vector that divides it ---------- */
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
#define NV (HEAD_DIM / VW) /* vectors per head_dim row */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#if VW == 1
typedef float vecf;
#define VLOADF(i, p) ((p)[i]) /* float (query / output) rows */
#define VSTOREF(v, i, p) ((p)[i] = (v))
#else
typedef CAT(float, VW) vecf;
#define VLOADF(i, p) CAT(vload, VW)((i), (p))
#define VSTOREF(v, i, p) CAT(vstore, VW)((v), (i), (p))
#endif

/* ---- storage type switch: the only place that knows whether T is float or half ----- */
/* LOADN(i, p): storage elements p[i*VW .. i*VW+VW-1] as a vecf; STOREN likewise.
 * LOAD_ELEM / STORE_ELEM: one element. */
#if STORAGE_HALF
typedef half store_t;  /* pointer-only use of half is legal without cl_khr_fp16 */
typedef ushort bits_t; /* same-size integer, for bit copies */
#if VW == 1
#define LOADN(i, p) vload_half((i), (p))
#define STOREN(v, i, p) vstore_half((v), (i), (p))
#else
#define LOADN(i, p) CAT(vload_half, VW)((i), (p))
#define STOREN(v, i, p) CAT(vstore_half, VW)((v), (i), (p))
#endif
#define LOAD_ELEM(i, p) vload_half((i), (p))
#define STORE_ELEM(v, i, p) vstore_half((v), (i), (p))
#else
typedef float store_t;
typedef uint bits_t;
#if defined(__x86_64__)
/* CPU (PoCL): PoCL's vloadN is built from narrower loads and, in larger kernels, LLVM does
 * not always fuse them back (AVX-512 then sees 4 x 128-bit loads + inserts per vector).
 * A dereference of an under-aligned vector type gives one unaligned full-width load. */
typedef vecf __attribute__((aligned(4))) vecf_u;
#define LOADN(i, p) (*(const __global vecf_u *)((p) + (size_t)(i) * VW))
#define STOREN(v, i, p) (*(__global vecf_u *)((p) + (size_t)(i) * VW) = (v))
#else
#define LOADN(i, p) VLOADF(i, p)
#define STOREN(v, i, p) VSTOREF(v, i, p)
#endif
#define LOAD_ELEM(i, p) ((p)[i])
#define STORE_ELEM(v, i, p) ((p)[i] = (v))
#endif

/* Sentinel candidate: worse than every real (finite-score) page. */
#define SENT_SCORE (-INFINITY)
#define SENT_ID 0x7fffffff

/* Horizontal reductions in a fixed pairwise order (halves first), so every kernel that
 * scores a page gets bit-identical results (fused and unfused retrieval must agree
 * exactly). reduce_sumW / reduce_maxW take a floatW; hsum picks the width of vecf. */
#define DEFINE_REDUCE(NAME, OP)                                                      \
    inline float CAT(NAME, 1)(float v) { return v; }                                 \
    inline float CAT(NAME, 2)(float2 v) { return OP(v.x, v.y); }                     \
    inline float CAT(NAME, 4)(float4 v) { return CAT(NAME, 2)(OP(v.lo, v.hi)); }     \
    inline float CAT(NAME, 8)(float8 v) { return CAT(NAME, 4)(OP(v.lo, v.hi)); }     \
    inline float CAT(NAME, 16)(float16 v) { return CAT(NAME, 8)(OP(v.lo, v.hi)); }
#define ADD(a, b) ((a) + (b))
DEFINE_REDUCE(reduce_sum, ADD)
DEFINE_REDUCE(reduce_max, max)
#define hsum CAT(reduce_sum, VW)

inline int pages_of(int length) { return (length + PAGE_SIZE - 1) / PAGE_SIZE; }

/* Retrieval order: higher score first, equal scores -> lower page index first. */
inline int better(float s1, int i1, float s2, int i2)
{
    return (s1 > s2) || (s1 == s2 && i1 < i2);
}

/* Streaming top-k: a sorted insertion buffer, best first (a systolic priority queue in
 * hardware). A kernel selecting `n` <= K_MAX pages keeps a register copy of the n-th best
 * score as its admission threshold, so a rejected candidate costs one compare; an admitted
 * one costs two data-parallel passes over the slots, TKW slots per vector op, with no
 * data-dependent control flow: rank = number of slots that beat it, then every slot past
 * the rank takes its upper neighbour's value (in hardware: K_MAX comparators and a shift
 * register, one candidate per cycle). Slots past n keep the next-best candidates, so the
 * whole buffer stays sorted and slot n-1 is always the n-th best.
 *
 * Layout: TopK.s/.i[0] is a sentinel pad, logical slot j lives at [1 + j], KBUF slots
 * (K_MAX rounded up to TKW) so the passes are whole vectors. */
#define TKW 16
#define KBUF (((K_MAX + TKW - 1) / TKW) * TKW)
#define NKV (KBUF / TKW)

typedef struct {
    float s[KBUF + 1];
    int i[KBUF + 1];
} TopK;

inline void topk_init(TopK *t)
{
    for (int j = 0; j < KBUF + 1; ++j) {
        t->s[j] = SENT_SCORE;
        t->i[j] = SENT_ID;
    }
}

inline float topk_score(const TopK *t, int j) { return t->s[1 + j]; }
inline int topk_id(const TopK *t, int j) { return t->i[1 + j]; }

/* Insert (s, id); the caller has checked that it beats slot n-1 (so it lands in [0, n)). */
inline void topk_insert(TopK *t, const float s, const int id)
{
    int16 cnt = (int16)(0);
    for (int c = 0; c < NKV; ++c) { /* rank: slots that beat the newcomer */
        const float16 sv = vload16(0, t->s + 1 + c * TKW);
        const int16 iv = vload16(0, t->i + 1 + c * TKW);
        cnt += (sv > (float16)(s)) | ((sv == (float16)(s)) & (iv < (int16)(id))); /* -1: true */
    }
    const int8 c8 = cnt.lo + cnt.hi;
    const int4 c4 = c8.lo + c8.hi;
    const int2 c2 = c4.lo + c4.hi;
    const int pos = -(c2.x + c2.y);
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int c = NKV - 1; c >= 0; --c) { /* shift down past pos; top chunk first */
        const int16 down = (lane + (int16)(c * TKW)) > (int16)(pos);
        const float16 cur = vload16(0, t->s + 1 + c * TKW), up = vload16(0, t->s + c * TKW);
        const int16 curi = vload16(0, t->i + 1 + c * TKW), upi = vload16(0, t->i + c * TKW);
        vstore16(select(cur, up, down), 0, t->s + 1 + c * TKW);
        vstore16(select(curi, upi, down), 0, t->i + 1 + c * TKW);
    }
    t->s[1 + pos] = s;
    t->i[1 + pos] = id;
}

/* Query of one KV head's GROUP query heads, split as relu(q) and min(q, 0): for min <= max,
 * max(q*min, q*max) == relu(q)*max + min(q,0)*min, which needs no compare per element. */
/* A chunk's sorted candidates (the `need` best) out to global memory at offset o. */
inline void topk_store(const TopK *t, const int need, __global float *cand_score, __global int *cand_id,
                       const size_t o)
{
    for (int i = 0; i < K_MAX; ++i) {
        if (i < need) {
            cand_score[o + i] = topk_score(t, i);
            cand_id[o + i] = topk_id(t, i);
        }
    }
}

inline void load_query_split(const __global float *q, vecf *qp, vecf *qn)
{
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            vecf x = VLOADF(v, q + g * HEAD_DIM);
            qp[g * NV + v] = fmax(x, (vecf)(0.0f));
            qn[g * NV + v] = fmin(x, (vecf)(0.0f));
        }
    }
}

/* Pages scored together by one work-item: PB pages share every query-vector load and give
 * GROUP*PB independent FMA chains (enough to hide FMA latency) while GROUP*PB vector
 * accumulators still fit in registers (AVX-512 has 32). */
#ifndef PB
#if GROUP <= 4
#define PB 4
#elif GROUP <= 8
#define PB 2
#else
#define PB 1
#endif
#endif

/* Software prefetch PF_DIST pages ahead of the page block being scored. A CPU core streams
 * the summary faster with it (the hardware prefetcher alone leaves gaps while the core
 * computes); it is a no-op outside x86 (HLS infers burst reads from the sequential
 * access instead). */
#ifndef PF_DIST
#define PF_DIST 8
#endif
#if defined(__x86_64__) && defined(__has_builtin)
#if __has_builtin(__builtin_prefetch)
#define PREFETCH(p) __builtin_prefetch(p)
#endif
#endif
#ifndef PREFETCH
#define PREFETCH(p) ((void)0)
#endif
#define LINE_ELEMS (64 / (int)sizeof(store_t)) /* storage elements per 64-byte line */
#ifndef ATT_PF_PAGES
#define ATT_PF_PAGES 4 /* sparse_attention: selected pages prefetched ahead */
#endif

/* Relevancy upper bound of pages p0 .. p0+PB-1 of one (b,h) row:
 *   sc[i] = max_g sum_d max(q_gd*min_d, q_gd*max_d)   (= relu(q)*max + min(q,0)*min).
 * `row` points at the row's page 0 summary ([page][2][HEAD_DIM]: mins then maxes).
 * Pages past `last` are clamped to `last` (computed, then ignored by the caller), so every
 * page's score comes out of the same instruction sequence wherever it sits in a block:
 * the unfused and fused kernels, which both call this, agree bit for bit. */
inline void block_scores(const __global store_t *row, const int p0, const int last,
                         const vecf *qp, const vecf *qn, float *sc)
{
    const __global store_t *pg[PB];
#pragma unroll
    for (int i = 0; i < PB; ++i)
        pg[i] = row + (size_t)min(p0 + i, last) * 2 * HEAD_DIM;
#if PF_DIST > 0
    {
        const __global store_t *pf = row + (size_t)(p0 + PF_DIST) * 2 * HEAD_DIM;
#pragma unroll
        for (int i = 0; i < PB * 2 * HEAD_DIM; i += LINE_ELEMS)
            PREFETCH(pf + i); /* never faults, even past the buffer end */
    }
#endif
    vecf acc[GROUP][PB];
#pragma unroll
    for (int g = 0; g < GROUP; ++g)
#pragma unroll
        for (int i = 0; i < PB; ++i)
            acc[g][i] = (vecf)(0.0f);
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        vecf mn[PB], mx[PB];
#pragma unroll
        for (int i = 0; i < PB; ++i) {
            mn[i] = LOADN(v, pg[i]);
            mx[i] = LOADN(NV + v, pg[i]);
        }
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            const vecf a = qp[g * NV + v], b = qn[g * NV + v];
#pragma unroll
            for (int i = 0; i < PB; ++i)
                acc[g][i] = fma(b, mn[i], fma(a, mx[i], acc[g][i]));
        }
    }
#if VW == 16 && PB == 4
    /* transposed reduction: the 4 pages' sums come out in one float4 per head */
    float4 best = (float4)(-INFINITY);
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const float16 a = acc[g][0], b = acc[g][1], c = acc[g][2], d = acc[g][3];
        const float16 x = (float16)(a.lo, b.lo) + (float16)(a.hi, b.hi);
        const float16 y = (float16)(c.lo, d.lo) + (float16)(c.hi, d.hi);
        const float16 z = (float16)(x.lo.lo, x.hi.lo, y.lo.lo, y.hi.lo)
                        + (float16)(x.lo.hi, x.hi.hi, y.lo.hi, y.hi.hi);
        const float8 w = z.even + z.odd;
        best = max(best, w.even + w.odd); /* max over the GROUP heads */
    }
    sc[0] = best.x;
    sc[1] = best.y;
    sc[2] = best.z;
    sc[3] = best.w;
#else
#pragma unroll
    for (int i = 0; i < PB; ++i) {
        float best = -INFINITY;
#pragma unroll
        for (int g = 0; g < GROUP; ++g)
            best = max(best, hsum(acc[g][i]));
        sc[i] = best;
    }
#endif
}

/* ======================================================================================
 * Summary maintenance
 * ====================================================================================*/

/* delta[b,h,j] = elementwise min / max of the NEW tokens in absolute page
 * start[b]/PAGE_SIZE + j (+INF / -INF where the page gets none). The new tokens of
 * sequence b are keys_new[b,:,0:count[b]].
 * Global size (n_local, heads, batch); one work-item per (local page, head, sequence). */
__kernel void minmax_delta(const __global store_t *keys_new, /* [B,H,n_new,D] */
                           const __global int *start,        /* [B] */
                           const __global int *count,        /* [B] */
                           const int heads, const int n_new, const int n_local,
                           __global store_t *delta) /* [B,H,n_local,2,D] */
{
    const int j = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (j >= n_local)
        return;
    const int cnt = min(count[b], n_new);
    const int st = start[b];
    /* new-token index of the page's first slot (may be negative: slot before start) */
    const int n0 = (st / PAGE_SIZE + j) * PAGE_SIZE - st;
    const __global store_t *src = keys_new + (size_t)(b * heads + h) * n_new * HEAD_DIM;
    vecf mn[NV], mx[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        mn[v] = (vecf)(INFINITY);
        mx[v] = (vecf)(-INFINITY);
    }
    for (int t = 0; t < PAGE_SIZE; ++t) { /* fixed trip, guarded */
        const int n = n0 + t;
        if (n >= 0 && n < cnt) {
            const __global store_t *row = src + (size_t)n * HEAD_DIM;
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                vecf x = LOADN(v, row);
                mn[v] = fmin(mn[v], x);
                mx[v] = fmax(mx[v], x);
            }
        }
    }
    __global store_t *dst = delta + ((size_t)(b * heads + h) * n_local + j) * 2 * HEAD_DIM;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        STOREN(mn[v], v, dst);
        STOREN(mx[v], NV + v, dst);
    }
}

/* summary[b,h,start[b]/PAGE_SIZE + j] = min/max merge with delta[b,h,j], in place.
 * Global size (n_local, heads, batch). Pages past p_cap are skipped. */
__kernel void merge_summary(__global store_t *summary,      /* [B,H,p_cap,2,D] */
                            const __global store_t *delta,  /* [B,H,n_local,2,D] */
                            const __global int *start,      /* [B] */
                            const int heads, const int p_cap, const int n_local)
{
    const int j = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (j >= n_local)
        return;
    const int p = start[b] / PAGE_SIZE + j;
    if (p >= p_cap)
        return;
    __global store_t *dst = summary + ((size_t)(b * heads + h) * p_cap + p) * 2 * HEAD_DIM;
    const __global store_t *src = delta + ((size_t)(b * heads + h) * n_local + j) * 2 * HEAD_DIM;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        STOREN(fmin(LOADN(v, dst), LOADN(v, src)), v, dst);
        STOREN(fmax(LOADN(NV + v, dst), LOADN(NV + v, src)), NV + v, dst);
    }
}

/* cache[b,h,start[b]+n] = new[b,h,n] for n < count[b]:
 * append into a capacity-padded KV cache.
 * Global size (n_new, heads, batch). Rows past s_cap are skipped. */
__kernel void store_tokens(__global store_t *cache,       /* [B,H,s_cap,D] */
                           const __global store_t *newt,  /* [B,H,n_new,D] */
                           const __global int *start,     /* [B] */
                           const __global int *count,     /* [B] */
                           const int heads, const int s_cap, const int n_new)
{
    const int n = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    if (n >= n_new || n >= count[b])
        return;
    const int pos = start[b] + n;
    if (pos >= s_cap)
        return;
    __global store_t *dst = cache + ((size_t)(b * heads + h) * s_cap + pos) * HEAD_DIM;
    const __global store_t *src = newt + ((size_t)(b * heads + h) * n_new + n) * HEAD_DIM;
    /* bit copy in storage format (no round trip through float; half needs no extension) */
    const __global bits_t *from = (const __global bits_t *)src;
    __global bits_t *to = (__global bits_t *)dst;
#pragma unroll
    for (int i = 0; i < HEAD_DIM; ++i)
        to[i] = from[i];
}

/* ======================================================================================
 * Relevancy and retrieval
 *
 * Pages of a (b,h) row are split into chunks of `chunk_pages`; one work-item (work-group
 * of 1) per (chunk, h, b) streams through its chunk. Enough chunks are launched to keep
 * every compute unit busy.
 * ====================================================================================*/

/* scores[b,h,p] for p in the chunk; -INFINITY past the sequence's last page.
 * Global size (n_chunks, heads, batch), local size (1,1,1). */
__kernel void relevancy(const __global store_t *summary, /* [B,H,p_cap,2,D] */
                        const __global float *query,     /* [B,H*GROUP,D] */
                        const __global int *lengths,     /* [B] */
                        const int heads, const int p_cap, const int n_pages,
                        const int chunk_pages,
                        __global float *scores)          /* [B,H,n_pages] */
{
    const int c = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    const int nb = pages_of(lengths[b]);
    const int lo = c * chunk_pages;
    const int hi = min(lo + chunk_pages, n_pages);
    const int valid_hi = min(hi, nb);

    vecf qp[GROUP * NV], qn[GROUP * NV]; /* query kept in private memory for the chunk */
    load_query_split(query + (size_t)(b * heads + h) * GROUP * HEAD_DIM, qp, qn);

    const __global store_t *row = summary + (size_t)(b * heads + h) * p_cap * 2 * HEAD_DIM;
    __global float *out = scores + (size_t)(b * heads + h) * n_pages;
    for (int p = lo; p < valid_hi; p += PB) {
        float sc[PB];
        block_scores(row, p, valid_hi - 1, qp, qn, sc);
#pragma unroll
        for (int i = 0; i < PB; ++i)
            if (p + i < valid_hi)
                out[p + i] = sc[i];
    }
    for (int p = max(lo, valid_hi); p < hi; ++p)
        out[p] = -INFINITY;
}

/* Partial top-k of precomputed scores: the candidates of one chunk.
 * Only pages in [sink, nb - local) compete; the others are forced (sink / local) or past
 * the end. Rows with nb <= k select every page and need no candidates at all.
 * Global size (n_chunks, heads, batch), local size (1,1,1).
 * cand_*: [B,H,n_chunks,need], need = k-sink-local (best first, sentinel-padded). */
__kernel void topk_partial(const __global float *scores, /* [B,H,n_pages] */
                           const __global int *lengths,
                           const int heads, const int n_pages, const int chunk_pages,
                           const int k, const int sink, const int local_,
                           __global float *cand_score, __global int *cand_id)
{
    const int c = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    const int n_chunks = get_global_size(0);
    const int nb = pages_of(lengths[b]);
    const int need = min(k - sink - local_, K_MAX); /* caller guarantees k <= K_MAX */
    if (nb <= k || need <= 0)
        return; /* merge stage does not read candidates for such rows */
    const int lo = max(c * chunk_pages, sink);
    const int hi = min(c * chunk_pages + chunk_pages, nb - local_);

    TopK top;
    topk_init(&top);
    const __global float *row = scores + (size_t)(b * heads + h) * n_pages;
    /* Pages arrive in ascending order, so a page that only ties the n-th best kept one
     * loses (the kept one has the lower index): a strict compare against the threshold. */
    float thr = SENT_SCORE;
    for (int p = lo; p < hi; ++p) {
        const float s = row[p];
        if (s > thr) {
            topk_insert(&top, s, p);
            thr = topk_score(&top, need - 1);
        }
    }

    topk_store(&top, need, cand_score, cand_id, ((size_t)(b * heads + h) * n_chunks + c) * need);
}

/* FUSED relevancy + partial top-k: scores live only in registers, never in global memory.
 * Same work decomposition and same block_scores() as `relevancy`, so the selection equals
 * topk over the unfused scores bit for bit. Forced pages are not even read. */
__kernel void relevancy_topk_partial(const __global store_t *summary, /* [B,H,p_cap,2,D] */
                                     const __global float *query,     /* [B,H*GROUP,D] */
                                     const __global int *lengths,
                                     const int heads, const int p_cap, const int chunk_pages,
                                     const int k, const int sink, const int local_,
                                     __global float *cand_score, __global int *cand_id)
{
    const int c = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    const int n_chunks = get_global_size(0);
    const int nb = pages_of(lengths[b]);
    const int need = min(k - sink - local_, K_MAX);
    if (nb <= k || need <= 0)
        return;
    const int lo = max(c * chunk_pages, sink);
    const int hi = min(c * chunk_pages + chunk_pages, nb - local_);

    vecf qp[GROUP * NV], qn[GROUP * NV];
    load_query_split(query + (size_t)(b * heads + h) * GROUP * HEAD_DIM, qp, qn);

    TopK top;
    topk_init(&top);
    float thr = SENT_SCORE; /* score of the need-th best kept page */
    const __global store_t *row = summary + (size_t)(b * heads + h) * p_cap * 2 * HEAD_DIM;
    for (int p = lo; p < hi; p += PB) {
        float sc[PB];
        block_scores(row, p, hi - 1, qp, qn, sc);
#pragma unroll
        for (int i = 0; i < PB; ++i) {
            if (p + i < hi && sc[i] > thr) { /* see topk_partial: ascending pages */
                topk_insert(&top, sc[i], p + i);
                thr = topk_score(&top, need - 1);
            }
        }
    }

    topk_store(&top, need, cand_score, cand_id, ((size_t)(b * heads + h) * n_chunks + c) * need);
}

/* Merge stage: per (b,h) row, the chunks' sorted candidate lists stream through one more
 * insertion buffer (each list only until its first rejected entry); the
 * result plus the forced sink / local pages is written in ascending page order. The order
 * comes from rank counting (rank of an id = number of kept ids below it): a fixed
 * K_MAX x KBUF compare loop nest with no data-dependent control, TKW compares per step.
 * Global size (heads, batch), local size (1,1). page_ids: [B,H,width], -1 padded. */
__kernel void topk_merge(const __global float *cand_score, const __global int *cand_id,
                         const __global int *lengths,
                         const int heads, const int n_chunks, const int k, const int sink,
                         const int local_, const int width,
                         __global int *page_ids)
{
    const int h = get_global_id(0), b = get_global_id(1);
    const int nb = pages_of(lengths[b]);
    __global int *out = page_ids + (size_t)(b * heads + h) * width;

    if (nb <= k) { /* every page of the sequence, then -1 padding */
        for (int i = 0; i < width; ++i) /* width <= k: bounded by an argument */
            out[i] = i < nb ? i : -1;
        return;
    }
    const int need = min(k - sink - local_, K_MAX);
    TopK top;
    topk_init(&top);
    if (need > 0) {
        for (int c = 0; c < n_chunks; ++c) {
            const size_t o = ((size_t)(b * heads + h) * n_chunks + c) * need;
            int open = 1; /* a chunk's list is sorted: stop at its first loser */
            for (int i = 0; i < K_MAX; ++i) {
                if (open && i < need) {
                    const float s = cand_score[o + i];
                    const int id = cand_id[o + i];
                    if (better(s, id, topk_score(&top, need - 1), topk_id(&top, need - 1)))
                        topk_insert(&top, s, id);
                    else
                        open = 0;
                }
            }
        }
    }
    /* ascending output: sink pages, ranked free picks (all in [sink, nb-local)), local pages */
    for (int i = 0; i < K_MAX; ++i)
        if (i < sink)
            out[i] = i;
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int i = 0; i < K_MAX; ++i) {
        if (i < need) {
            const int id = topk_id(&top, i);
            int16 cnt = (int16)(0);
            for (int c = 0; c < NKV; ++c) { /* kept ids below id, TKW slots at a time */
                const int16 iv = vload16(0, top.i + 1 + c * TKW);
                cnt += (iv < (int16)(id)) & ((lane + (int16)(c * TKW)) < (int16)(need));
            }
            const int8 c8 = cnt.lo + cnt.hi;
            const int4 c4 = c8.lo + c8.hi;
            const int2 c2 = c4.lo + c4.hi;
            out[sink - (c2.x + c2.y)] = id; /* -1 per true lane */
        }
    }
    for (int i = 0; i < K_MAX; ++i)
        if (i < local_)
            out[sink + need + i] = nb - local_ + i;
}

/* ======================================================================================
 * Sparse attention (decode, one query token per sequence)
 *
 * One work-item per (split, kv head, sequence) handles all GROUP query heads of the KV
 * head, so each selected K/V row comes from memory once (the page's 2 x PAGE_SIZE rows
 * are then re-read from L1 per head). The selected pages of a row may be split across
 * `n_split` work-items (flash-decoding) when rows alone cannot occupy the device; then
 * partial (m, l, acc) are written and `attention_combine` finishes. With n_split == 1 the
 * output is written directly. Online softmax in fp32, rescaled once per page per head.
 * ====================================================================================*/

/* Tokens of a page are handled TOKV at a time (max / exp / sum as vectors). */
#if PAGE_SIZE % 16 == 0
#define TOKV 16
#elif PAGE_SIZE % 8 == 0
#define TOKV 8
#elif PAGE_SIZE % 4 == 0
#define TOKV 4
#elif PAGE_SIZE % 2 == 0
#define TOKV 2
#else
#define TOKV 1
#endif
#define NTV (PAGE_SIZE / TOKV)
#if TOKV == 1
typedef float tokv;
#define VLOAD_TOK(i, p) ((p)[i])
#define VSTORE_TOK(x, i, p) ((p)[i] = (x))
#else
typedef CAT(float, TOKV) tokv;
#define VLOAD_TOK(i, p) CAT(vload, TOKV)((i), (p))
#define VSTORE_TOK(x, i, p) CAT(vstore, TOKV)((x), (i), (p))
#endif

#define tok_max CAT(reduce_max, TOKV)
#define tok_sum CAT(reduce_sum, TOKV)

#if VW == 16
/* One level of a transposed reduction: lanes of the result are pairwise sums of a's lanes
 * (low half) and b's lanes (high half). Four levels turn 16 dot-product vectors into one
 * float16 of 16 dot products, in token order. */
inline float16 pair_sum(float16 a, float16 b)
{
    return (float16)(a.even, b.even) + (float16)(a.odd, b.odd);
}
#endif

/* Scaled logits of the page's tokens for query head g into lg[PAGE_SIZE]
 * (-INFINITY for tokens t >= nt, i.e. past the sequence end). */
inline void page_logits(const __global store_t *kp, const vecf *qg, const int nt,
                        const float scale, float *lg)
{
#if VW == 16 && TOKV == 16
    /* 16 tokens per block; the reduction tree is walked depth first so only a few partial
     * vectors are live and the head's query stays in registers. */
#pragma unroll
    for (int j = 0; j < NTV; ++j) {
        float16 l3[2];
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
            float16 l2[2];
#pragma unroll
            for (int h1 = 0; h1 < 2; ++h1) {
                float16 l1[2];
#pragma unroll
                for (int h0 = 0; h0 < 2; ++h0) {
                    float16 d[2];
#pragma unroll
                    for (int u = 0; u < 2; ++u) {
                        const int t = j * 16 + h2 * 8 + h1 * 4 + h0 * 2 + u;
                        vecf a = (vecf)(0.0f);
                        if (t < nt) {
#pragma unroll
                            for (int v = 0; v < NV; ++v)
                                a = fma(qg[v], LOADN(v, kp + t * HEAD_DIM), a);
                        }
                        d[u] = a;
                    }
                    l1[h0] = pair_sum(d[0], d[1]);
                }
                l2[h1] = pair_sum(l1[0], l1[1]);
            }
            l3[h2] = pair_sum(l2[0], l2[1]);
        }
        vstore16(pair_sum(l3[0], l3[1]) * scale, j, lg);
    }
#else
#pragma unroll
    for (int t = 0; t < PAGE_SIZE; ++t) {
        vecf a = (vecf)(0.0f);
        if (t < nt) {
#pragma unroll
            for (int v = 0; v < NV; ++v)
                a = fma(qg[v], LOADN(v, kp + t * HEAD_DIM), a);
        }
        lg[t] = hsum(a) * scale;
    }
#endif
    if (nt < PAGE_SIZE) { /* only the sequence's last page is partial */
#pragma unroll
        for (int t = 0; t < PAGE_SIZE; ++t)
            if (t >= nt)
                lg[t] = -INFINITY;
    }
}

__kernel void sparse_attention(const __global store_t *k_cache, /* [B,H,s_cap,D] */
                               const __global store_t *v_cache, /* [B,H,s_cap,D] */
                               const __global float *query,     /* [B,H*GROUP,D] */
                               const __global int *page_ids,    /* [B,H,k_eff] */
                               const __global int *lengths,     /* [B] */
                               const int heads, const int s_cap, const int k_eff,
                               const int pages_per_split, const float scale,
                               __global float *out,      /* [B,H*GROUP,D] (n_split == 1) */
                               __global float *part_ml,  /* [B,H*GROUP,n_split,2] */
                               __global float *part_acc) /* [B,H*GROUP,n_split,D] */
{
    const int s = get_global_id(0), h = get_global_id(1), b = get_global_id(2);
    const int n_split = get_global_size(0);
    const int len = lengths[b];
    const size_t kv_row = (size_t)(b * heads + h) * s_cap;
    const __global int *ids = page_ids + (size_t)(b * heads + h) * k_eff;

    vecf q[GROUP * NV], acc[GROUP * NV];
    float m[GROUP], l[GROUP];
    const __global float *qsrc = query + (size_t)(b * heads + h) * GROUP * HEAD_DIM;
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            q[g * NV + v] = VLOADF(v, qsrc + g * HEAD_DIM);
            acc[g * NV + v] = (vecf)(0.0f);
        }
    }

    const int i_lo = s * pages_per_split;
    const int i_hi = min(i_lo + pages_per_split, k_eff);
    for (int i = i_lo; i < i_hi; ++i) {
        const int p = ids[i];
        const int t0 = p * PAGE_SIZE;
        if (p < 0 || t0 >= len)
            continue; /* padding, or a page with no valid token */
        const int nt = min(PAGE_SIZE, len - t0); /* valid tokens, >= 1 */
        const __global store_t *kp = k_cache + (kv_row + t0) * HEAD_DIM;
        const __global store_t *vp = v_cache + (kv_row + t0) * HEAD_DIM;
#if ATT_PF_PAGES > 0
        if (i + ATT_PF_PAGES < i_hi) { /* selected pages are scattered: fetch ahead */
            const int pn = ids[i + ATT_PF_PAGES];
            if (pn >= 0 && pn * PAGE_SIZE < len) {
                const size_t o = (kv_row + (size_t)pn * PAGE_SIZE) * HEAD_DIM;
                const int n_el = min(PAGE_SIZE, len - pn * PAGE_SIZE) * HEAD_DIM;
#pragma unroll
                for (int e = 0; e < PAGE_SIZE * HEAD_DIM; e += LINE_ELEMS) {
                    if (e < n_el) {
                        PREFETCH(k_cache + o + e);
                        PREFETCH(v_cache + o + e);
                    }
                }
            }
        }
#endif
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float lg[PAGE_SIZE];
            page_logits(kp, q + g * NV, nt, scale, lg);
            /* online softmax, once per page: new max, rescale, weights */
            tokv mv = VLOAD_TOK(0, lg);
#pragma unroll
            for (int j = 1; j < NTV; ++j)
                mv = max(mv, VLOAD_TOK(j, lg));
            const float mnew = max(m[g], tok_max(mv)); /* finite: token 0 is valid */
            const float corr = exp(m[g] - mnew);        /* exp(-inf) = 0 on the first page */
            tokv sv = (tokv)(0.0f);
#pragma unroll
            for (int j = 0; j < NTV; ++j) {
                const tokv w = exp(VLOAD_TOK(j, lg) - (tokv)(mnew)); /* 0 past the end */
                VSTORE_TOK(w, j, lg);
                sv += w;
            }
            l[g] = l[g] * corr + tok_sum(sv);
            m[g] = mnew;
            /* acc = acc * corr + sum_t w_t v_t; one head's NV accumulators in registers */
            vecf a[NV];
#pragma unroll
            for (int v = 0; v < NV; ++v)
                a[v] = acc[g * NV + v] * corr;
#pragma unroll
            for (int t = 0; t < PAGE_SIZE; ++t) {
                if (t < nt) {
                    const vecf w = (vecf)(lg[t]);
#pragma unroll
                    for (int v = 0; v < NV; ++v)
                        a[v] = fma(w, LOADN(v, vp + t * HEAD_DIM), a[v]);
                }
            }
#pragma unroll
            for (int v = 0; v < NV; ++v)
                acc[g * NV + v] = a[v];
        }
    }

#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        const size_t qh = (size_t)(b * heads + h) * GROUP + g;
        if (n_split == 1) {
            const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
#pragma unroll
            for (int v = 0; v < NV; ++v)
                VSTOREF(acc[g * NV + v] * inv, v, out + qh * HEAD_DIM);
        } else {
            part_ml[(qh * n_split + s) * 2] = m[g];
            part_ml[(qh * n_split + s) * 2 + 1] = l[g];
#pragma unroll
            for (int v = 0; v < NV; ++v)
                VSTOREF(acc[g * NV + v], v, part_acc + (qh * n_split + s) * HEAD_DIM);
        }
    }
}

/* Combine flash-decoding splits. Global size (H*GROUP, batch). */
__kernel void attention_combine(const __global float *part_ml, const __global float *part_acc,
                                const int q_heads, const int n_split,
                                __global float *out) /* [B,H*GROUP,D] */
{
    const int qh = get_global_id(0), b = get_global_id(1);
    const size_t row = (size_t)b * q_heads + qh;
    float mx = -INFINITY;
    for (int s = 0; s < n_split; ++s)
        mx = fmax(mx, part_ml[(row * n_split + s) * 2]);
    vecf acc[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v)
        acc[v] = (vecf)(0.0f);
    float l = 0.0f;
    for (int s = 0; s < n_split; ++s) {
        const float ms = part_ml[(row * n_split + s) * 2];
        if (ms == -INFINITY)
            continue; /* split saw no token */
        const float w = exp(ms - mx);
        l += w * part_ml[(row * n_split + s) * 2 + 1];
#pragma unroll
        for (int v = 0; v < NV; ++v)
            acc[v] = fma((vecf)(w), VLOADF(v, part_acc + (row * n_split + s) * HEAD_DIM), acc[v]);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int v = 0; v < NV; ++v)
        VSTOREF(acc[v] * inv, v, out + row * HEAD_DIM);
}
