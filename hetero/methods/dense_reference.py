"""Reference math of DenseRetrieval, in numpy float64: what every implementation is tested
against.

    relevancy  scores[b, i] = q_b . e_i over the stored document embeddings e_i ("ip"), or
               the same on L2-normalised vectors ("cosine"; a zero vector stays zero)
    retrieval  per query the k best documents, ranked by score descending, equal scores
               to the lower document id; fewer than k documents -> id -1, score -inf

Embedding (prepare) is not reference math: it is the caller's model (or the hashing
embedder), and every backend stores the same float32 embeddings it returns.
"""

from __future__ import annotations

import numpy as np


def normalize(x) -> np.ndarray:
    """Rows of x scaled to unit L2 norm (float64); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.sqrt((x * x).sum(-1, keepdims=True))
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def relevancy(embeddings, queries, metric: str = "ip") -> np.ndarray:
    """scores float64 [B, N] of queries [B, d] against embeddings [N, d]."""
    e = np.asarray(embeddings, dtype=np.float64)
    q = np.asarray(queries, dtype=np.float64)
    if metric == "cosine":
        e, q = normalize(e), normalize(q)
    return q @ e.T


def retrieval(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [B, k], scores float64 [B, k]): each row's k best entries by (score
    descending, id ascending); past the row's length, -1 and -inf."""
    scores = np.asarray(scores, dtype=np.float64)
    batch, n = scores.shape
    width = min(k, n)
    ids = np.full((batch, k), -1, dtype=np.int64)
    top = np.full((batch, k), -np.inf)
    for b in range(batch):
        order = np.lexsort((np.arange(n), -scores[b]))[:width]
        ids[b, :width] = order
        top[b, :width] = scores[b, order]
    return ids, top
