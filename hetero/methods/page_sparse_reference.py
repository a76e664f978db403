"""The one reference for page-sparse attention, written for clarity (numpy, float64).

Every implementation of every step (torch, OpenCL, host) is tested against these
functions. They favour obviousness over speed: explicit loops where the rule is subtle
(retrieval), plain broadcasting elsewhere.

Layouts (the usual KV-cache ones):
  keys, values  [batch, kv_heads, seq, head_dim]
  query         [batch, q_heads, head_dim]    one decode token, q_heads = kv_heads * group
  lengths       [batch]                        valid tokens per sequence (<= seq)
  page_min/max  [batch, kv_heads, pages, head_dim]
  scores        [batch, kv_heads, pages]       -inf for pages past a sequence's end
  page_ids      [batch, kv_heads, k]           ascending, -1 padding at the end
"""

from __future__ import annotations

import numpy as np


def num_pages(length: int, page_size: int) -> int:
    return -(-int(length) // page_size)


def page_minmax(keys, lengths, page_size):
    """Per page and KV head, the elementwise min and max of the keys (partial last page
    included). Pages past a sequence's end hold +inf / -inf (the identities of min / max)."""
    keys = np.asarray(keys, dtype=np.float64)
    batch, heads, _, dim = keys.shape
    pages = max(num_pages(n, page_size) for n in lengths)
    mn = np.full((batch, heads, pages, dim), np.inf)
    mx = np.full((batch, heads, pages, dim), -np.inf)
    for b, n in enumerate(lengths):
        for p in range(num_pages(n, page_size)):
            tokens = keys[b, :, p * page_size: min((p + 1) * page_size, n)]
            mn[b, :, p] = tokens.min(axis=1)
            mx[b, :, p] = tokens.max(axis=1)
    return mn, mx


def relevancy(page_min, page_max, query, lengths, page_size):
    """Upper bound of q.k over a page, sum_d max(q_d*min_d, q_d*max_d), reduced with max
    over the query heads that share a KV head (GQA)."""
    batch, heads, pages, dim = page_min.shape
    group = query.shape[1] // heads
    q = np.asarray(query, dtype=np.float64).reshape(batch, heads, group, 1, dim)
    mn = page_min[:, :, None]
    mx = page_max[:, :, None]
    with np.errstate(invalid="ignore"):  # inf * 0 on padding pages, overwritten below
        bound = np.maximum(q * mn, q * mx).sum(axis=-1).max(axis=2)
    for b, n in enumerate(lengths):
        bound[b, :, num_pages(n, page_size):] = -np.inf
    return bound


def forced_pages(n_pages: int, sink_pages: int, local_pages: int) -> set[int]:
    """Pages always kept: the first `sink_pages` and the last `local_pages` of a sequence."""
    return set(range(min(sink_pages, n_pages))) | set(range(max(0, n_pages - local_pages), n_pages))


def retrieval(scores, lengths, page_size, k_pages, sink_pages, local_pages):
    """Per sequence and KV head: the sink and local pages, then the highest-scoring other
    pages until k are chosen; equal scores go to the lower page index. Returns ascending
    page ids, [batch, kv_heads, min(k_pages, max pages)], -1 padded."""
    batch, heads, pages = scores.shape
    width = min(k_pages, pages)
    out = np.full((batch, heads, width), -1, dtype=np.int64)
    for b, n in enumerate(lengths):
        n_pages = num_pages(n, page_size)
        for h in range(heads):
            if n_pages <= k_pages:
                chosen = set(range(n_pages))
            else:
                chosen = forced_pages(n_pages, sink_pages, local_pages)
                others = [p for p in range(n_pages) if p not in chosen]
                others.sort(key=lambda p: (-scores[b, h, p], p))
                chosen |= set(others[: k_pages - len(chosen)])
            ids = sorted(chosen)
            out[b, h, : len(ids)] = ids
    return out


def sparse_attention(keys, values, query, page_ids, lengths, page_size, scale):
    """Exact softmax attention of each query head over only the tokens of its KV head's
    selected pages (tokens past the sequence end excluded)."""
    keys = np.asarray(keys, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    query = np.asarray(query, dtype=np.float64)
    batch, heads = keys.shape[:2]
    group = query.shape[1] // heads
    out = np.zeros(query.shape)
    for b, n in enumerate(lengths):
        for h in range(heads):
            tokens = [t for p in page_ids[b, h] if p >= 0
                      for t in range(p * page_size, min((p + 1) * page_size, n))]
            k, v = keys[b, h, tokens], values[b, h, tokens]
            for g in range(group):
                qh = h * group + g
                logits = k @ query[b, qh] * scale
                w = np.exp(logits - logits.max())
                out[b, qh] = (w / w.sum()) @ v
    return out


def dense_attention(keys, values, query, lengths, scale):
    """Full attention over every valid token: what sparse attention approximates."""
    batch, heads, seq, _ = keys.shape
    all_pages = np.tile(np.arange(seq), (batch, heads, 1))
    return sparse_attention(keys, values, query, all_pages, lengths, 1, scale)
