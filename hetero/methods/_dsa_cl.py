"""Thin pyopencl launchers for fpga_kernels/dsa.cl (DSA's lightning indexer).

Conventions as in `_page_sparse_cl`: each launcher takes a PROFILING_ENABLE queue, the
program built from KERNEL_FILE with `defines(...)`, pyopencl arrays, and returns
``(result, events)`` without waiting on the device. Index keys are float32 [B, cap, ID]
(the index cache is a [B, 1, cap, ID] page-sparse cache); packed index queries float32
[B, IH, ID + 1]; scores float32 [B, n]; ids int32 [B, kv_heads, width].
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla

from . import dsa_reference as ref
from ._page_sparse_cl import _compute_units, _events_of, _run
from ._select_cl import select_topk

KERNEL_FILE = "dsa.cl"

_B = None
_I = np.int32
ARG_TYPES = {
    "project": [_B, _B, _I, _I, _I, _B],
    "rope": [_B, _B, _I, _I, _I],
    "index_scores": [_B, _B, _B, _I, _I, _I, _B],
}

# index_scores: work-items per compute unit, and the smallest chunk of tokens worth one
_WAVES_PER_CU = 4
_MIN_CHUNK = 1024


def defines(index_heads: int, index_dim: int) -> dict[str, int]:
    """Compile-time constants of dsa.cl, for ``-D{name}={value}`` build options."""
    if index_heads % 16:
        raise ValueError(f"the OpenCL indexer needs index_heads a multiple of 16, got {index_heads}")
    return {"IH": int(index_heads), "ID": int(index_dim)}


def _launch(queue, prg, name, gsize, lsize, args, wait_for=(), outputs=()):
    return _run(queue, prg, name, gsize, lsize, args, wait_for, outputs, ARG_TYPES)


def _cos_sin(queue, positions: np.ndarray, rope_dim: int):
    """cos/sin [rows, rope_dim/2, 2] float32 of each row's position, computed in float64 on
    the host (a float32 angle at position 1e5 would be off by ~0.01 rad)."""
    half = rope_dim // 2
    angle = positions.astype(np.float64)[:, None] * ref.ROPE_BASE ** (-np.arange(half) / half)
    return cla.to_device(queue, np.stack([np.cos(angle), np.sin(angle)], -1).astype(np.float32))


def project(queue, prg, x, wt, rows: int, wait=()):
    """y f32[rows, n_out] = x[rows, n_in] @ W^T for W^T given as wt [n_in, n_out] (project.clh,
    in any program that includes it); returns (y, event)."""
    n_in, n_out = wt.shape
    y = cla.empty(queue, (rows, n_out), np.float32)
    evt = _launch(queue, prg, "project", (-(-n_out // 64), -(-rows // 4)), (1, 1),
                  (x.data, wt.data, rows, n_in, n_out, y.data), list(wait))
    return y, evt


def _rope(queue, prg, y, positions: np.ndarray, heads: int, stride: int, rope_dim: int, wait):
    rows = positions.size
    cs = _cos_sin(queue, positions, rope_dim)
    return _launch(queue, prg, "rope", (rope_dim // 2, heads, rows), None,
                   (y.data, cs.data, heads, stride, rope_dim // 2), wait + list(cs.events))


def project_keys(queue, prg, hidden, w_k, start, rope_dim: int):
    """Index keys [B, 1, n, ID] of hidden [B, n, hidden], roped at start[b] + i (start: a
    host int array)."""
    batch, n, _ = hidden.shape
    y, e1 = project(queue, prg, hidden, w_k, batch * n, _events_of(hidden, w_k))
    events = [e1]
    if rope_dim:
        positions = (np.asarray(start)[:, None] + np.arange(n)).reshape(-1)
        events.append(_rope(queue, prg, y, positions, 1, w_k.shape[1], rope_dim, [e1]))
    y = y.reshape(batch, 1, n, w_k.shape[1])
    y.add_event(events[-1])
    return y, events


def project_query(queue, prg, hidden_last, w_qw, positions, index_heads: int, rope_dim: int):
    """Packed index queries [B, IH, ID + 1] of hidden_last [B, hidden], roped at positions[b]."""
    batch = hidden_last.shape[0]
    y, e1 = project(queue, prg, hidden_last, w_qw, batch, _events_of(hidden_last, w_qw))
    events = [e1]
    stride = w_qw.shape[1] // index_heads
    if rope_dim:
        events.append(_rope(queue, prg, y, np.asarray(positions), index_heads, stride, rope_dim, [e1]))
    y = y.reshape(batch, index_heads, stride)
    y.add_event(events[-1])
    return y, events


def relevancy(queue, prg, index_keys, index_query, lengths, n):
    """scores f32[B, n]: sum_j w_j ReLU(q_j . k_s), -inf at and past lengths[b]."""
    batch, _, cap, _ = index_keys.shape
    n = int(n)
    scores = cla.empty(queue, (batch, n), np.float32)
    if n == 0 or batch == 0:
        return scores, []
    want = -(-_WAVES_PER_CU * _compute_units(queue) // batch)
    chunk = max(_MIN_CHUNK, -(-n // want))
    chunk = -(-chunk // 24) * 24  # whole register tiles (4 or 6 tokens)
    evt = _launch(queue, prg, "index_scores", (-(-n // chunk), batch), (1, 1),
                  (index_keys.data, index_query.data, lengths.data, cap, n, chunk, scores.data),
                  _events_of(index_keys, index_query, lengths), (scores,))
    return scores, [evt]


def retrieval(queue, prg, scores, lengths, k, kv_heads):
    """ids i32[B, kv_heads, min(k, n)]: each row's top k tokens (ties -> lower index),
    ascending, -1 padded; the same ids for every KV head (select_topk.clh)."""
    return select_topk(queue, prg, scores, lengths, k, kv_heads)


def relevancy_retrieval(queue, prg, index_keys, index_query, lengths, n, k, kv_heads):
    """Fused relevancy + retrieval: one operation, the scores kept on the device between
    the two kernels. Same ids as retrieval(relevancy(...)), exactly."""
    scores, e1 = relevancy(queue, prg, index_keys, index_query, lengths, n)
    ids, e2 = retrieval(queue, prg, scores, lengths, k, kv_heads)
    return ids, e1 + e2
