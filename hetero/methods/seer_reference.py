"""The one reference for SeerAttention-R style block gating, written for clarity (numpy, float64).

Every implementation of every step (torch, OpenCL, host) is tested against these
functions. Explicit loops where a rule is subtle (pooling of partial blocks, threshold
retrieval), plain broadcasting elsewhere.

Layouts:
  keys, values   [batch, kv_heads, seq, head_dim]
  query          [batch, q_heads, head_dim]        one decode token, q_heads = kv_heads * group
  lengths        [batch]                            valid tokens per sequence (<= seq)
  w_q            [gate_dim, head_dim]               gate query projection (shared by all heads)
  w_k            [gate_dim, 2 * head_dim]           gate key projection of [max-pool | mean-pool]
  pooled         [batch, kv_heads, blocks, 2 * head_dim]
  gate_keys      [batch, kv_heads, blocks, gate_dim]
  probs          [batch, kv_heads, blocks]          gate probabilities; -inf past a sequence's end
  block_ids      [batch, kv_heads, width]           ascending, -1 padding at the end

Blocks past a sequence's end hold zeros in `pooled` / `gate_keys` (never read).
"""

from __future__ import annotations

import numpy as np

# apply is page-sparse's block-sparse attention (pages = blocks); dense attention is its baseline
from .page_sparse_reference import dense_attention, forced_pages, sparse_attention  # noqa: F401
from .page_sparse_reference import retrieval as topk_retrieval


def num_blocks(length: int, block_size: int) -> int:
    return -(-int(length) // block_size)


def pooled_blocks(keys, lengths, block_size):
    """Per block of keys and KV head: [max over the block's tokens | mean over them]; a
    partial last block pools its valid tokens only."""
    keys = np.asarray(keys, dtype=np.float64)
    batch, heads, _, dim = keys.shape
    blocks = max(num_blocks(n, block_size) for n in lengths)
    out = np.zeros((batch, heads, blocks, 2 * dim))
    for b, n in enumerate(lengths):
        for p in range(num_blocks(n, block_size)):
            tokens = keys[b, :, p * block_size: min((p + 1) * block_size, n)]  # [H, t, D]
            out[b, :, p, :dim] = tokens.max(axis=1)
            out[b, :, p, dim:] = tokens.mean(axis=1)
    return out


def gate_keys(keys, lengths, block_size, w_k):
    """k_gate[block] = w_k @ pooled[block]; zeros for blocks past a sequence's end."""
    pooled = pooled_blocks(keys, lengths, block_size)
    return pooled @ np.asarray(w_k, dtype=np.float64).T


def gate_query(query, w_q, kv_heads):
    """q_gate = w_q @ (mean of the query heads of the KV group): [batch, kv_heads, gate_dim]."""
    query = np.asarray(query, dtype=np.float64)
    batch, q_heads, dim = query.shape
    mean = query.reshape(batch, kv_heads, q_heads // kv_heads, dim).mean(axis=2)
    return mean @ np.asarray(w_q, dtype=np.float64).T


def relevancy(gate_keys, gate_query, lengths, block_size):
    """Gate probabilities: softmax over a sequence's blocks of q_gate . k_gate / sqrt(gate_dim),
    per KV head; -inf for blocks past the sequence's end."""
    batch, heads, blocks, gate_dim = gate_keys.shape
    out = np.full((batch, heads, blocks), -np.inf)
    for b, n in enumerate(lengths):
        nb = num_blocks(n, block_size)
        for h in range(heads):
            logits = gate_keys[b, h, :nb] @ gate_query[b, h] / np.sqrt(gate_dim)
            e = np.exp(logits - logits.max())
            out[b, h, :nb] = e / e.sum()
    return out


def retrieval_threshold(scores, lengths, block_size, k_blocks, sink_blocks, local_blocks, threshold):
    """Per sequence and KV head: the sink and local blocks, plus every other block whose gate
    probability is >= threshold, the highest first (equal ones to the lower index) until k
    are chosen. Returns ascending block ids, [batch, kv_heads, min(k_blocks, max blocks)],
    -1 padded (a variable count per row)."""
    batch, heads, blocks = scores.shape
    width = min(k_blocks, blocks)
    out = np.full((batch, heads, width), -1, dtype=np.int64)
    for b, n in enumerate(lengths):
        nb = num_blocks(n, block_size)
        for h in range(heads):
            chosen = forced_pages(nb, sink_blocks, local_blocks)
            passing = [p for p in range(nb) if p not in chosen and scores[b, h, p] >= threshold]
            passing.sort(key=lambda p: (-scores[b, h, p], p))
            chosen |= set(passing[: k_blocks - len(chosen)])
            ids = sorted(chosen)
            out[b, h, : len(ids)] = ids
    return out


def retrieval(scores, lengths, block_size, k_blocks, sink_blocks, local_blocks, threshold=None):
    """Top-k mode (threshold None): page-sparse's rule, exactly min(k, blocks) per row (sink
    and local forced, the best others, ties to the lower index); threshold mode:
    `retrieval_threshold`."""
    if threshold is None:
        return topk_retrieval(scores, lengths, block_size, k_blocks, sink_blocks, local_blocks)
    return retrieval_threshold(scores, lengths, block_size, k_blocks, sink_blocks, local_blocks, threshold)


def step(keys, values, query, lengths, block_size, k_blocks, sink_blocks, local_blocks, threshold, w_q, w_k,
         scale):
    """The whole decode step: (block_ids, output [B, Hq, D], probs, gate_keys)."""
    lengths = [int(n) for n in lengths]
    heads = np.asarray(keys).shape[1]
    gk = gate_keys(keys, lengths, block_size, w_k)
    probs = relevancy(gk, gate_query(query, w_q, heads), lengths, block_size)
    ids = retrieval(probs, lengths, block_size, k_blocks, sink_blocks, local_blocks, threshold)
    out = sparse_attention(keys, values, query, ids, lengths, block_size, scale)
    return ids, out, probs, gk
