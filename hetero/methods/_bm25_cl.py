"""Thin pyopencl launchers for fpga_kernels/bm25.cl (BM25 scoring and top-k).

Conventions as in `_page_sparse_cl`: each launcher takes a PROFILING_ENABLE queue, the
program built from KERNEL_FILE with `defines(k)`, pyopencl arrays, and returns
``(result, events)`` without waiting on the device. The index is indptr int64 [V + 1],
docs int32 [nnz], weights float32 [nnz]; query terms int32 [B, T] (-1 padded); scores
float32 [B, n]; ranked ids int32 [B, k] (-1 padded) with their scores float32 [B, k]
(-inf padded).

Top-k: for k <= K_MAX the blocks' private top lists are merged (`merge_topk`), already
ranked; above, select_topk.clh's radix select picks the ids (ascending) and
`rank_selected` sorts them by score on the device (stable, so equal scores stay in
ascending id order).
"""

from __future__ import annotations

import threading

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ._page_sparse_cl import _compute_units, _events_of, _run
from ._select_cl import select_topk

KERNEL_FILE = "bm25.cl"
K_LIMIT = 2048  # the largest K_MAX built; larger k take the radix-select path

_B = None
_I = np.int32
ARG_TYPES = {
    "bm25_scores": [_B, _B, _B, _B, _I, _I, _I, _B],
    "bm25_scores_topk": [_B, _B, _B, _B, _I, _I, _I, _I, _B, _B, _B],
    "block_topk": [_B, _I, _I, _I, _B, _B],
    "merge_topk": [_B, _B, _I, _I, _I, _B, _B],
    "rank_selected": [_B, _I, _B, _I, _I, _B, _B],
}

# work-items per compute unit (load balance), and the smallest block of documents worth one
_WAVES_PER_CU = 4
_MIN_BLOCK = 4096


def defines(k: int) -> dict[str, int]:
    """K_MAX: k rounded up to a power of two (at least 16), or 16 when k is above K_LIMIT
    (those take the radix-select path)."""
    k_max = 16
    while k_max < k and k_max < K_LIMIT:
        k_max *= 2
    return {"K_MAX": k_max if k <= K_LIMIT else 16}


def _launch(queue, prg, name, gsize, lsize, args, wait_for=(), outputs=()):
    return _run(queue, prg, name, gsize, lsize, args, wait_for, outputs, ARG_TYPES)


_dummies: dict[int, cl.Buffer] = {}  # context pointer -> 4-byte buffer
_lock = threading.Lock()


def _data(array):
    """The array's buffer, or a 4-byte stand-in for an empty array (a kernel never reads it)."""
    if array.size:
        return array.data
    ctx = array.queue.context
    with _lock:
        buf = _dummies.get(ctx.int_ptr)
        if buf is None:
            buf = _dummies[ctx.int_ptr] = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, 4)
    return buf


def _blocking(queue, batch: int, n: int) -> tuple[int, int]:
    """(n_blocks, block): enough (block, query) work-items to occupy every compute unit a few
    times over, blocks of at least _MIN_BLOCK documents."""
    want = -(-_WAVES_PER_CU * _compute_units(queue) // max(batch, 1))
    n_blocks = max(1, min(want, -(-n // _MIN_BLOCK)))
    block = -(-n // n_blocks)
    return -(-n // block), block


def relevancy(queue, prg, indptr, docs, weights, terms, n: int):
    """scores f32 [B, n]: per query, the sum of its terms' weights per document."""
    batch, n_terms = terms.shape
    n = int(n)
    scores = cla.empty(queue, (batch, n), np.float32)
    if n == 0 or batch == 0:
        return scores, []
    n_blocks, block = _blocking(queue, batch, n)
    evt = _launch(queue, prg, "bm25_scores", (n_blocks, batch), (1, 1),
                  (indptr.data, _data(docs), _data(weights), terms.data, n_terms, n, block, scores.data),
                  _events_of(indptr, docs, weights, terms), (scores,))
    return scores, [evt]


def _empty_result(queue, batch: int, k: int):
    ids = cla.to_device(queue, np.full((batch, k), -1, np.int32))
    vals = cla.to_device(queue, np.full((batch, k), -np.inf, np.float32))
    return (ids, vals), []


def _merge(queue, prg, cand_score, cand_id, n_blocks, kk, k, batch, wait):
    ids = cla.empty(queue, (batch, k), np.int32)
    vals = cla.empty(queue, (batch, k), np.float32)
    evt = _launch(queue, prg, "merge_topk", (batch,), (1,),
                  (cand_score.data, cand_id.data, n_blocks, kk, k, ids.data, vals.data), wait, (ids, vals))
    return (ids, vals), evt


def retrieval(queue, prg, scores, k: int, k_max: int):
    """(ids i32 [B, k], scores f32 [B, k]): each row's best min(k, n) documents ranked
    (score descending, equal scores to the lower id), -1 / -inf padded."""
    batch, n = scores.shape
    k = int(k)
    if n == 0 or batch == 0:
        return _empty_result(queue, batch, k)
    kk = min(k, n)
    if kk > k_max:
        return _rank_selected(queue, prg, scores, kk, k)
    n_blocks, block = _blocking(queue, batch, n)
    cand_score = cla.empty(queue, (batch, n_blocks, kk), np.float32)
    cand_id = cla.empty(queue, (batch, n_blocks, kk), np.int32)
    e1 = _launch(queue, prg, "block_topk", (n_blocks, batch), (1, 1),
                 (scores.data, n, block, kk, cand_score.data, cand_id.data), _events_of(scores),
                 (cand_score, cand_id))
    out, e2 = _merge(queue, prg, cand_score, cand_id, n_blocks, kk, k, batch, [e1])
    return out, [e1, e2]


def _rank_selected(queue, prg, scores, kk: int, k: int):
    batch, n = scores.shape
    lengths = cla.to_device(queue, np.full(batch, n, np.int32))
    selected, e1 = select_topk(queue, prg, scores, lengths, kk)
    ids = cla.empty(queue, (batch, k), np.int32)
    vals = cla.empty(queue, (batch, k), np.float32)
    e2 = _launch(queue, prg, "rank_selected", (batch,), (1,),
                 (scores.data, n, selected.data, selected.shape[-1], k, ids.data, vals.data),
                 _events_of(selected), (ids, vals))
    return (ids, vals), e1 + [e2]


def relevancy_retrieval(queue, prg, indptr, docs, weights, terms, n: int, k: int, k_max: int):
    """Fused: each (block, query) work-item scores its block into a scratch row and keeps
    its best k; a merge ranks them. Same result as retrieval(relevancy(...)), exactly."""
    batch, n_terms = terms.shape
    n, k = int(n), int(k)
    if n == 0 or batch == 0:
        return _empty_result(queue, batch, k)
    kk = min(k, n)
    if kk > k_max:
        scores, e1 = relevancy(queue, prg, indptr, docs, weights, terms, n)
        out, e2 = _rank_selected(queue, prg, scores, kk, k)
        return out, e1 + e2
    n_blocks, block = _blocking(queue, batch, n)
    scratch, last = _scratch(queue, 4 * batch * n)
    cand_score = cla.empty(queue, (batch, n_blocks, kk), np.float32)
    cand_id = cla.empty(queue, (batch, n_blocks, kk), np.int32)
    e1 = _launch(queue, prg, "bm25_scores_topk", (n_blocks, batch), (1, 1),
                 (indptr.data, _data(docs), _data(weights), terms.data, n_terms, n, block, kk, scratch,
                  cand_score.data, cand_id.data),
                 _events_of(indptr, docs, weights, terms) + last, (cand_score, cand_id))
    _scratches[queue.int_ptr] = (scratch, [e1])
    out, e2 = _merge(queue, prg, cand_score, cand_id, n_blocks, kk, k, batch, [e1])
    return out, [e1, e2]


# per queue (hetero's queues live as long as the process): the fused kernel's scratch scores,
# kept (a fresh multi-MB buffer is page-faulted anew on every call), and the event of its
# last user, which the next one waits for
_scratches: dict[int, tuple] = {}


def _scratch(queue, nbytes: int):
    buf, last = _scratches.get(queue.int_ptr, (None, []))
    if buf is None or buf.size < nbytes:
        buf, last = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, max(nbytes, 4)), []
    return buf, last
