"""Launcher of fpga_kernels/select_topk.clh's exact top-k, for any program that includes it.

Conventions as in `_page_sparse_cl`: a PROFILING_ENABLE queue, the built program, pyopencl
arrays in, ``(result, events)`` out, no host waits.
"""

from __future__ import annotations

import numpy as np
import pyopencl.array as cla

from ._page_sparse_cl import _events_of, _run

ARG_TYPES = {"select_topk": [None, None, np.int32, np.int32, np.int32, np.int32, None]}


def select_topk(queue, prg, scores, lengths, k: int, copies: int = 1):
    """ids i32[B, copies, min(k, n)]: per row of scores f32[B, n], the top k entries before
    lengths[b] (ties -> lower index), ascending, -1 padded; each row's ids `copies` times."""
    batch, n = scores.shape
    width = min(int(k), n)
    ids = cla.empty(queue, (batch, copies, width), np.int32)
    if width == 0 or batch == 0:
        return ids, []
    evt = _run(queue, prg, "select_topk", (batch,), (1,),
               (scores.data, lengths.data, n, int(k), int(copies), width, ids.data),
               _events_of(scores, lengths), (ids,), ARG_TYPES)
    return ids, [evt]
