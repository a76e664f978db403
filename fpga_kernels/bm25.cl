/* BM25 relevancy and top-k over a term-major (CSC) index (hetero/methods/bm25.py).
 *
 * Index: the postings of term t are p in [indptr[t], indptr[t + 1]): the document docs[p]
 * (ascending within a term, each document at most once) and its precomputed BM25 weight
 * weights[p]. A query is a row of n_terms term ids in query order (a repeated term repeated,
 * -1 = no term: padding).
 *
 * Scoring is document-blocked, with no atomics: one work-item per (block of documents
 * [lo, hi), query). For each of the query's terms in order it binary-searches the term's
 * postings for the first document >= lo, then adds the weights of the postings below hi to
 * the block's scores. No two work-items write one score, so no atomics are needed (PoCL's
 * CPU float atomics are compare-exchange loops, and atomics would sum in a racy order), and
 * every document's sum is formed in query-term order, from 0: the float32 scores equal the
 * host's and torch's bit for bit, whatever the blocking. The price over a term-parallel
 * scatter is one binary search (log2 of the postings) per block and query term.
 *
 * Top-k keeps, per work-item, the kk best (score, id) pairs in a private sorted list
 * ("better" = higher score, equal scores: lower id); a merge kernel combines the blocks'
 * lists per query into the ranked top-k. The fused kernel selects from its block while the
 * block's scores are still in cache, visiting only the documents its postings touched.
 * K_MAX (compile time) bounds kk; larger k go through select_topk.clh's radix select and
 * rank_selected.
 */
#include "select_topk.clh"

#ifndef K_MAX
#define K_MAX 16
#endif

inline int better(const float s, const int id, const float t, const int jd)
{
    return s > t || (s == t && id < jd);
}

typedef struct {
    float score[K_MAX];
    int id[K_MAX];
    int count;
} TopList;

/* Offer (s, id) to a list holding at most kk entries, best first. */
inline void top_offer(TopList *top, const int kk, const float s, const int id)
{
    int i = top->count;
    if (i == kk) {
        if (!better(s, id, top->score[kk - 1], top->id[kk - 1]))
            return;
        i = kk - 1;
    } else {
        top->count++;
    }
    while (i > 0 && better(s, id, top->score[i - 1], top->id[i - 1])) {
        top->score[i] = top->score[i - 1];
        top->id[i] = top->id[i - 1];
        --i;
    }
    top->score[i] = s;
    top->id[i] = id;
}

/* The first posting of term t with a document >= lo (binary search). */
inline long first_posting(const __global long *indptr, const __global int *docs, const int t, const int lo)
{
    long a = indptr[t], b = indptr[t + 1];
    while (a < b) {
        const long m = a + ((b - a) >> 1);
        if (docs[m] < lo)
            a = m + 1;
        else
            b = m;
    }
    return a;
}

/* Scores of documents [lo, hi) for one query, written to row[lo..hi) (zeroed first). */
inline void score_block(const __global long *indptr, const __global int *docs, const __global float *weights,
                        const __global int *terms, const int n_terms, const int lo, const int hi,
                        __global float *row)
{
    for (int d = lo; d < hi; ++d)
        row[d] = 0.0f;
    for (int j = 0; j < n_terms; ++j) {
        const int t = terms[j];
        if (t < 0)
            continue;
        const long end = indptr[t + 1];
        for (long p = first_posting(indptr, docs, t, lo); p < end; ++p) {
            const int d = docs[p];
            if (d >= hi)
                break;
            row[d] += weights[p];
        }
    }
}

/* Best kk of row[lo..hi) into the candidate slot (kk entries, -1 / -inf padded). */
inline void select_block(const __global float *row, const int lo, const int hi, const int kk,
                         __global float *cand_score, __global int *cand_id)
{
    TopList top;
    top.count = 0;
    for (int d = lo; d < hi; ++d)
        top_offer(&top, kk, row[d], d);
    for (int i = 0; i < kk; ++i) {
        cand_score[i] = i < top.count ? top.score[i] : -INFINITY;
        cand_id[i] = i < top.count ? top.id[i] : -1;
    }
}

/* scores [B, n]. Global (n_blocks, B), local (1, 1). */
__kernel void bm25_scores(const __global long *indptr, const __global int *docs, const __global float *weights,
                          const __global int *terms, /* [B, n_terms] */
                          const int n_terms, const int n, const int block, __global float *scores)
{
    const int c = get_global_id(0), q = get_global_id(1);
    const int lo = c * block, hi = min(lo + block, n);
    score_block(indptr, docs, weights, terms + (size_t)q * n_terms, n_terms, lo, hi, scores + (size_t)q * n);
}

/* Fused: the block's scores into scratch [B, n], then its best kk into the candidates
 * [B, n_blocks, kk]. Only documents a query term touched can score above 0 (every weight is
 * positive), so selection walks the block's postings again instead of the whole block,
 * offering each touched document once (its scratch score is then set to -1) and, when fewer
 * than kk were touched, the block's lowest-id untouched documents (score 0). Global
 * (n_blocks, B), local (1, 1). */
__kernel void bm25_scores_topk(const __global long *indptr, const __global int *docs,
                               const __global float *weights, const __global int *terms, const int n_terms,
                               const int n, const int block, const int kk, __global float *scratch,
                               __global float *cand_score, __global int *cand_id)
{
    const int c = get_global_id(0), q = get_global_id(1), n_blocks = get_global_size(0);
    const int lo = c * block, hi = min(lo + block, n);
    const __global int *qterms = terms + (size_t)q * n_terms;
    __global float *row = scratch + (size_t)q * n;
    score_block(indptr, docs, weights, qterms, n_terms, lo, hi, row);

    TopList top;
    top.count = 0;
    for (int j = 0; j < n_terms; ++j) {
        const int t = qterms[j];
        if (t < 0)
            continue;
        for (long p = first_posting(indptr, docs, t, lo); p < indptr[t + 1]; ++p) {
            const int d = docs[p];
            if (d >= hi)
                break;
            const float s = row[d];
            if (s >= 0.0f) { /* not offered yet */
                top_offer(&top, kk, s, d);
                row[d] = -1.0f;
            }
        }
    }
    for (int d = lo; d < hi && top.count < kk; ++d)
        if (row[d] == 0.0f)
            top_offer(&top, kk, 0.0f, d);
    const size_t slot = ((size_t)q * n_blocks + c) * kk;
    for (int i = 0; i < kk; ++i) {
        cand_score[slot + i] = i < top.count ? top.score[i] : -INFINITY;
        cand_id[slot + i] = i < top.count ? top.id[i] : -1;
    }
}

/* The best kk of each block of given scores [B, n]. Global (n_blocks, B), local (1, 1). */
__kernel void block_topk(const __global float *scores, const int n, const int block, const int kk,
                         __global float *cand_score, __global int *cand_id)
{
    const int c = get_global_id(0), q = get_global_id(1), n_blocks = get_global_size(0);
    const int lo = c * block, hi = min(lo + block, n);
    const size_t slot = ((size_t)q * n_blocks + c) * kk;
    select_block(scores + (size_t)q * n, lo, hi, kk, cand_score + slot, cand_id + slot);
}

/* Per query: the ranked best kk of its blocks' candidates, -1 / -inf padded to width.
 * Each block's list is sorted, so it is read only up to its first entry that does not
 * enter. Global (B), local (1). ids, out_scores: [B, width]. */
__kernel void merge_topk(const __global float *cand_score, const __global int *cand_id, const int n_blocks,
                         const int kk, const int width, __global int *ids, __global float *out_scores)
{
    const int q = get_global_id(0);
    TopList top;
    top.count = 0;
    for (int c = 0; c < n_blocks; ++c) {
        const size_t slot = ((size_t)q * n_blocks + c) * kk;
        for (int i = 0; i < kk; ++i) {
            const int id = cand_id[slot + i];
            if (id < 0)
                break;
            const float s = cand_score[slot + i];
            if (top.count == kk && !better(s, id, top.score[kk - 1], top.id[kk - 1]))
                break;
            top_offer(&top, kk, s, id);
        }
    }
    for (int i = 0; i < width; ++i) {
        ids[(size_t)q * width + i] = i < top.count ? top.id[i] : -1;
        out_scores[(size_t)q * width + i] = i < top.count ? top.score[i] : -INFINITY;
    }
}

/* Ranks select_topk's ids (ascending, -1 padded, [B, 1, w]) by score: a stable insertion
 * sort by descending score keeps equal scores in ascending id order. O(w^2) per query: only
 * for k above K_MAX. Global (B), local (1). ids, out_scores: [B, width], width >= w. */
__kernel void rank_selected(const __global float *scores, const int n, const __global int *selected, const int w,
                            const int width, __global int *ids, __global float *out_scores)
{
    const int q = get_global_id(0);
    __global int *out = ids + (size_t)q * width;
    __global float *vals = out_scores + (size_t)q * width;
    int count = 0;
    for (int i = 0; i < w; ++i) {
        const int id = selected[(size_t)q * w + i];
        if (id < 0)
            break;
        const float s = scores[(size_t)q * n + id];
        int j = count++;
        while (j > 0 && s > vals[j - 1]) {
            vals[j] = vals[j - 1];
            out[j] = out[j - 1];
            --j;
        }
        vals[j] = s;
        out[j] = id;
    }
    for (int i = count; i < width; ++i) {
        out[i] = -1;
        vals[i] = -INFINITY;
    }
}
