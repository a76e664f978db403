"""Thin pyopencl launchers for fpga_kernels/mac.cl (Memory-as-Context).

Conventions as in `_page_sparse_cl`: a PROFILING_ENABLE queue, the built program, pyopencl
arrays in, ``(result, events)`` out, no host waits. Keys are the [B, 1, cap, KD] and memory
values the [B, 1, cap, D] float32 caches page-sparse's cache ops keep.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla

from ._dsa_cl import project
from ._page_sparse_cl import _compute_units, _events_of, _run
from ._select_cl import select_topk

KERNEL_FILE = "mac.cl"
_B, _I, _F = None, np.int32, np.float32
ARG_TYPES = {
    "segment_mean": [_B, _I, _I, _B],
    "mac_scores": [_B, _B, _B, _I, _I, _I, _F, _B],
    "mac_softmax": [_B, _B, _B, _I, _I, _B],
    "mac_readout_partial": [_B, _B, _B, _I, _I, _I, _I, _B],
    "mac_readout": [_B, _I, _I, _B],
}


def _launch(queue, prg, name, gsize, args, wait, outputs=()):
    return _run(queue, prg, name, gsize, None, args, wait, outputs, ARG_TYPES)


def relevancy(queue, prg, keys, w_q, segment, lengths, n, scale):
    """scores f32[B, n] = (W_q mean(segment)) . k_j * scale, -inf at and past lengths[b]."""
    batch, _, cap, kd = keys.shape
    _, seg_len, dim = segment.shape
    n = int(n)  # >= 1: the flow skips an empty memory
    scores = cla.empty(queue, (batch, n), np.float32)
    mean = cla.empty(queue, (batch, dim), np.float32)
    e1 = _launch(queue, prg, "segment_mean", (dim, batch), (segment.data, seg_len, dim, mean.data),
                 _events_of(segment))
    q, e2 = project(queue, prg, mean, w_q, batch, [e1])
    e3 = _launch(queue, prg, "mac_scores", (n, batch),
                 (keys.data, q.data, lengths.data, cap, n, kd, float(scale), scores.data),
                 [e2] + _events_of(keys, w_q, lengths), (scores,))
    return scores, [e1, e2, e3]


def retrieval(queue, prg, scores, values, lengths, k):
    """readout f32[B, D]: the softmax-weighted sum of the valid memory entries (k > 0: of the
    k best, ties -> lower index), zeros for a row with none."""
    batch, _, cap, dim = values.shape
    n = scores.shape[1]
    out = cla.empty(queue, (batch, dim), np.float32)
    events = []
    width = 0
    ids = cla.empty(queue, (batch, 1, 1), np.int32)
    if 0 < k < n:
        ids, events = select_topk(queue, prg, scores, lengths, k)
        width = ids.shape[2]
    weights = cla.empty(queue, (batch, n), np.float32)
    e1 = _launch(queue, prg, "mac_softmax", (batch,), (scores.data, ids.data, lengths.data, n, width, weights.data),
                 events + _events_of(scores, lengths), (weights,))
    # entry chunks: a few per compute unit, each at least 256 entries
    n_chunks = max(1, min(-(-n // 256), 4 * _compute_units(queue)))
    chunk = -(-n // n_chunks)
    n_chunks = -(-n // chunk)
    partial = cla.empty(queue, (n_chunks, batch, dim), np.float32)
    e2 = _launch(queue, prg, "mac_readout_partial", (n_chunks, batch),
                 (weights.data, values.data, lengths.data, cap, n, dim, chunk, partial.data),
                 [e1] + _events_of(values), (partial,))
    evt = _launch(queue, prg, "mac_readout", (dim, batch), (partial.data, n_chunks, dim, out.data), [e2], (out,))
    events += [e1, e2]
    return out, events + [evt]


def relevancy_retrieval(queue, prg, keys, values, w_q, segment, lengths, n, scale, k):
    """Both steps as one operation, the scores kept on the device."""
    scores, e1 = relevancy(queue, prg, keys, w_q, segment, lengths, n, scale)
    out, e2 = retrieval(queue, prg, scores, values, lengths, k)
    return out, e1 + e2
