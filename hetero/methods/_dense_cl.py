"""Thin pyopencl launchers for fpga_kernels/dense.cl (DenseRetrieval).

Conventions as in `_page_sparse_cl`: each launcher takes a PROFILING_ENABLE queue, the
program built from KERNEL_FILE with `defines(dim)`, pyopencl arrays, and returns
``(result, events)`` without waiting on the device. Embeddings are float32 [cap, dim]
(the first n rows are documents); queries float32 [B, dim]; scores float32 [B, n];
retrieval returns (ids int32 [B, k], scores float32 [B, k]) ranked, -1 / -inf padded.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ._page_sparse_cl import _compute_units, _events_of, _run
from ._select_cl import select_topk

KERNEL_FILE = "dense.cl"

_B = None
_I = np.int32
_SCORES_ARGS = [_B, _B, _I, _I, _I, _B]
ARG_TYPES = {
    "scores_dot1": _SCORES_ARGS, "scores_dot2": _SCORES_ARGS, "scores_dot4": _SCORES_ARGS,
    "scores_outer16": _SCORES_ARGS, "scores_outer32": _SCORES_ARGS,
    "rank_topk": [_B, _B, _I, _I, _I, _B, _B],
    "sort_candidates": [_B, _I], "rescore": [_B, _B, _B, _I, _I, _B], "candidate_ids": [_B, _B, _I, _I],
}

# scoring: work-items per compute unit, and the smallest chunk of documents worth one
_WAVES_PER_CU = 4
_MIN_CHUNK = 1536
_TILE = 12  # chunks are whole register tiles: 4 documents (dot) and 6 (outer)


def defines(dim: int) -> dict[str, int]:
    """Compile-time constants of dense.cl, for ``-D{name}={value}`` build options."""
    return {"DIM": int(dim)}


def scoring_kernel(batch: int, local_mem_bytes: int | None = None, dim: int = 0) -> tuple[str, int]:
    """(kernel name, queries per work-item) for a batch. Up to 4 queries: the dot-product
    kernel (one pass over the embeddings, bandwidth-bound); from 5: the outer-product kernel,
    16 queries a tile up to 16, else 32 (measured on PoCL / AVX-512 at 1M x 384: one outer16
    pass costs about as much as 1.7 dot1 passes but serves 16 queries), when its transposed
    queries fit local memory."""
    if batch >= 5:
        for name, per in (("scores_outer32", 32), ("scores_outer16", 16)):
            if (per == 16 or batch > 16) and (local_mem_bytes is None or 4 * dim * per <= local_mem_bytes):
                return name, per
    for per in (4, 2, 1):
        if batch >= per or (per == 4 and batch == 3):
            return f"scores_dot{per}", per
    return "scores_dot1", 1


def relevancy(queue, prg, embeddings, query, n: int):
    """scores f32[B, n] = query [B, dim] . embeddings[:n] [n, dim]^T."""
    batch, dim = query.shape
    n = int(n)
    scores = cla.empty(queue, (batch, n), np.float32)
    if n == 0 or batch == 0:
        return scores, []
    name, per = scoring_kernel(batch, queue.device.local_mem_size, dim)
    tiles = -(-batch // per)
    want = -(-_WAVES_PER_CU * _compute_units(queue) // tiles)
    chunk = max(_MIN_CHUNK, -(-n // want))
    chunk = -(-chunk // _TILE) * _TILE
    evt = _run(queue, prg, name, (-(-n // chunk), tiles), (1, 1),
               (embeddings.data, query.data, batch, n, chunk, scores.data),
               _events_of(embeddings, query), (scores,), ARG_TYPES)
    return scores, [evt]


_lengths_cache: dict = {}


def _lengths(queue, batch: int, n: int):
    """int32 [B] filled with n on the device (select_topk's row lengths), kept per queue."""
    key = (queue.int_ptr, batch, n)
    arr = _lengths_cache.get(key)
    if arr is None:
        if len(_lengths_cache) > 64:
            _lengths_cache.clear()
        arr = _lengths_cache[key] = cla.to_device(queue, np.full(batch, n, dtype=np.int32))
    return arr


def retrieval(queue, prg, scores, k: int):
    """(ids i32[B, k], top f32[B, k]): each row's k best documents ranked by score descending,
    equal scores -> lower id; -1 / -inf past the row's n documents. The exact radix select
    (select_topk.clh) picks the ids in ascending order, rank_topk ranks them."""
    batch, n = scores.shape
    k = int(k)
    ids = cla.empty(queue, (batch, k), np.int32)
    top = cla.empty(queue, (batch, k), np.float32)
    if batch == 0 or k == 0:
        return (ids, top), []
    width = min(k, n)
    events = []
    if width:
        sel, events = select_topk(queue, prg, scores, _lengths(queue, batch, n), k)
        wait = events + _events_of(scores)
        sel_data = sel.data
    else:  # no documents: every slot is padding
        wait, sel_data = _events_of(scores), cl.Buffer(queue.context, cl.mem_flags.READ_ONLY, 4)
    scores_data = scores.data if scores.size else cl.Buffer(queue.context, cl.mem_flags.READ_ONLY, 4)
    evt = _run(queue, prg, "rank_topk", (k, batch), None,
               (scores_data, sel_data, n, width, k, ids.data, top.data), wait, (ids, top), ARG_TYPES)
    return (ids, top), events + [evt]


def relevancy_retrieval(queue, prg, embeddings, query, n: int, k: int):
    """Fused relevancy + retrieval: the scores stay on the device between the kernels.
    Same result as retrieval(relevancy(...)), exactly."""
    scores, e1 = relevancy(queue, prg, embeddings, query, n)
    result, e2 = retrieval(queue, prg, scores, k)
    return result, e1 + e2


def rescore(queue, prg, embeddings, query, candidates, k: int):
    """Two-stage retrieval's second stage: (ids i32[B, k], top f32[B, k]) of the k best among
    each row's candidates (document ids i32[B, n_cand], -1 padded, any order) by query .
    embedding, ranked like `retrieval` (equal scores: lower id). The candidates are sorted
    first, so a candidate's position orders like its id; `retrieval` ranks positions, which
    then become ids."""
    batch, n_cand = candidates.shape
    dim = query.shape[1]
    cand = candidates.copy()  # sorted in place: the caller's array stays as it was
    e1 = _run(queue, prg, "sort_candidates", (batch,), (1,), (cand.data, n_cand), _events_of(candidates), (cand,),
              ARG_TYPES)
    scores = cla.empty(queue, (batch, n_cand), np.float32)
    e2 = _run(queue, prg, "rescore", (n_cand, batch), None,
              (embeddings.data, query.data, cand.data, n_cand, dim, scores.data),
              [e1] + _events_of(embeddings, query), (scores,), ARG_TYPES)
    (pos, top), e3 = retrieval(queue, prg, scores, k)
    e4 = _run(queue, prg, "candidate_ids", (int(k), batch), None, (pos.data, cand.data, n_cand, int(k)),
              _events_of(pos, cand), (pos,), ARG_TYPES)
    return (pos, top), [e1, e2, *e3, e4]
