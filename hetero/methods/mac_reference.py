"""The one reference for Memory-as-Context (HMT-style memory bank), numpy float64.

Layouts:
  memory    [batch, entries, dim]   segment embeddings, appended one per segment
  segment   [batch, length, dim]    the next segment's input embeddings
  keys      [batch, entries, key_dim]
  scores    [batch, entries]        -inf at and past a sequence's entry count
  readout   [batch, dim]            the retrieved memory vector
"""

from __future__ import annotations

import numpy as np


def memory_keys(memory, w_k):
    """k_j = W_k m_j."""
    return np.asarray(memory, np.float64) @ np.asarray(w_k, np.float64).T


def relevancy(keys, segment, w_q, lengths, scale: float):
    """scores_j = (W_q mean(segment)) . k_j * scale for j < lengths[b]; -inf elsewhere."""
    q = np.asarray(segment, np.float64).mean(1) @ np.asarray(w_q, np.float64).T
    scores = np.einsum("bd,bnd->bn", q, np.asarray(keys, np.float64)) * scale
    for b, n in enumerate(lengths):
        scores[b, n:] = -np.inf
    return scores


def retrieval(scores, memory, lengths, k: int = 0):
    """The softmax-weighted sum of the memory entries (over every valid entry, or with k > 0
    over the k highest-scoring ones, equal scores to the lower index); zeros for a sequence
    with no entries yet."""
    memory = np.asarray(memory, np.float64)
    out = np.zeros((scores.shape[0], memory.shape[2]))
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        chosen = sorted(range(n), key=lambda j: (-scores[b, j], j))[: k if 0 < k < n else n]
        s = scores[b, chosen]
        w = np.exp(s - s.max())
        out[b] = (w / w.sum()) @ memory[b, chosen]
    return out


def prepend(readout, segment):
    """The retrieved memory vector as the first input embedding of the segment: [B, L + 1, dim]."""
    return np.concatenate([np.asarray(readout, np.float64)[:, None], np.asarray(segment, np.float64)], 1)
