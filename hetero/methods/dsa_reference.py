"""The one reference for DeepSeek Sparse Attention's lightning indexer (numpy, float64).

Every implementation of every DSA step (torch, OpenCL, host) is tested against these
functions; they favour obviousness over speed.

Layouts:
  hidden       [batch, seq, hidden_dim]        the tokens' hidden states
  index_keys   [batch, seq, index_dim]         one index key per token, shared by all heads
  index_query  [batch, index_heads, index_dim] the query token's index queries
  weights      [batch, index_heads]            its per-head weights (scales folded in)
  scores       [batch, seq]                    -inf at and past a sequence's length
  token_ids    [batch, k]                      ascending, -1 padding at the end
"""

from __future__ import annotations

import numpy as np

ROPE_BASE = 10000.0


def rope(x, positions, rope_dim: int):
    """Rotary embedding on the first `rope_dim` features of x [..., n, dim] at `positions`
    [..., n] ("rotate half": feature i pairs with i + rope_dim/2); the rest pass unchanged."""
    x = np.array(x, dtype=np.float64)
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    freq = ROPE_BASE ** (-np.arange(half) / half)
    angle = np.asarray(positions, dtype=np.float64)[..., None] * freq
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., :half].copy(), x[..., half:rope_dim].copy()
    x[..., :half] = a * cos - b * sin
    x[..., half:rope_dim] = b * cos + a * sin
    return x


def index_keys(hidden, w_k, rope_dim: int):
    """k_s = RoPE(W_k h_s) at position s."""
    hidden = np.asarray(hidden, dtype=np.float64)
    keys = hidden @ np.asarray(w_k, dtype=np.float64).T
    return rope(keys, np.arange(hidden.shape[1]), rope_dim)


def index_query(hidden_last, positions, w_q, w_w, index_heads: int, rope_dim: int):
    """The query token's index queries q_j = RoPE(W_q h)_j at its position, and weights
    w_j = (W_w h)_j / sqrt(index_heads * index_dim) (DeepSeek's scales folded into w)."""
    h = np.asarray(hidden_last, dtype=np.float64)
    batch = h.shape[0]
    q = (h @ np.asarray(w_q, dtype=np.float64).T).reshape(batch, index_heads, -1)
    q = rope(q, np.repeat(np.asarray(positions)[:, None], index_heads, 1), rope_dim)
    w = h @ np.asarray(w_w, dtype=np.float64).T / np.sqrt(index_heads * q.shape[-1])
    return q, w


def relevancy(keys, query, weights, lengths):
    """I(t, s) = sum_j w_j * ReLU(q_j . k_s) for every s < length (causal: the query token
    is the sequence's last); -inf elsewhere."""
    dots = np.einsum("bjd,bsd->bsj", np.asarray(query, np.float64), np.asarray(keys, np.float64))
    scores = (np.maximum(dots, 0.0) * np.asarray(weights, np.float64)[:, None, :]).sum(-1)
    for b, n in enumerate(lengths):
        scores[b, n:] = -np.inf
    return scores


def retrieval(scores, lengths, top_k: int):
    """Per sequence the top_k highest-scoring valid tokens, equal scores to the lower index;
    every valid token when there are fewer. Ascending ids [batch, min(top_k, seq)], -1 padded."""
    batch, seq = scores.shape
    width = min(top_k, seq)
    out = np.full((batch, width), -1, dtype=np.int64)
    for b, n in enumerate(lengths):
        ranked = sorted(range(n), key=lambda s: (-scores[b, s], s))
        ids = sorted(ranked[:top_k])
        out[b, : len(ids)] = ids
    return out
