"""Thin pyopencl launchers for fpga_kernels/seer.cl (SeerAttention-R style block gating).

Same conventions as ``_page_sparse_cl``: every launcher takes a ``pyopencl.CommandQueue``
(PROFILING_ENABLE), a program built from ``KERNEL_FILE`` with ``defines(...)``, and
``pyopencl.array.Array`` inputs; it returns ``(result, events)`` (in-place ones ``events``
only), ``events`` listing every enqueued command in order. Nothing here waits on the
device: each enqueue waits for the events of its input arrays and results carry their
events. Kernel objects, with their scalar argument types declared, are cached per program
and per thread (`_page_sparse_cl`'s cache).

Storage type T (new keys, gate keys) is float32 or float16, matching the program's
STORAGE_HALF; the running stats, weights, queries and probabilities are float32, ids and
lengths int32. The math is hetero/methods/seer_reference.py.
"""

from __future__ import annotations

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

from ._page_sparse_cl import _events_of
from ._page_sparse_cl import _run as _page_sparse_run

KERNEL_FILE = "seer.cl"

_B = None  # buffer argument
_I = np.int32
_F = np.float32
_ARG_TYPES = {
    "pool_project": [_B, _B, _B, _B, _B, _I, _I, _I, _B, _B],
    "store_gate_keys": [_B, _B, _B, _B, _I, _I, _I],
    "gate_relevancy": [_B, _B, _B, _B, _I, _I, _I, _I, _F, _B],
    "gate_select": [_B, _B, _I, _I, _I, _I, _I, _F, _B],
    "gate_relevancy_select": [_B, _B, _B, _B, _I, _I, _I, _I, _F, _I, _I, _I, _F, _B],
}


def defines(head_dim: int, gate_dim: int, block_size: int, k_max: int, storage_half) -> dict[str, int]:
    """Compile-time constants of seer.cl, for ``-D{name}={value}`` build options."""
    return {
        "HEAD_DIM": int(head_dim),
        "GATE_DIM": int(gate_dim),
        "BLOCK_SIZE": int(block_size),
        "K_MAX": int(k_max),
        "STORAGE_HALF": int(bool(storage_half)),
    }


def _run(queue, prg, name, gsize, args, wait_for=(), outputs=()):
    return _page_sparse_run(queue, prg, name, gsize, None, args, wait_for, outputs, _ARG_TYPES)


def _gate_scale(gate_dim: int) -> float:
    return float(np.float32(1.0 / np.sqrt(gate_dim)))


# --------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------

def pool_project(queue, prg, keys_new, tail, w_k, start, count, n_local):
    """delta T[B,H,n_local,GATE_DIM]: gate keys of the blocks the new tokens touch (local
    block j = absolute block start[b] // BLOCK_SIZE + j), pooled together with the running
    stats `tail` f32[B,H,2,D]; `tail` is updated in place to the new partial block's stats
    (the kernel writes a scratch copy, then it is copied over: no work-item reads what
    another writes)."""
    batch, heads, n_new, _ = keys_new.shape
    gate_dim = w_k.shape[0]
    n_local = int(n_local)
    delta = cla.empty(queue, (batch, heads, n_local, gate_dim), keys_new.dtype)
    if n_local == 0 or batch * heads == 0:
        return delta, []
    tail_out = cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, tail.nbytes)
    e1 = _run(queue, prg, "pool_project", (n_local, heads, batch),
              (keys_new.data, tail.data, w_k.data, start.data, count.data, heads, n_new, n_local,
               delta.data, tail_out),
              _events_of(keys_new, tail, w_k, start, count), (delta,))
    e2 = cl.enqueue_copy(queue, tail.data, tail_out, byte_count=tail.nbytes, wait_for=[e1])
    tail.add_event(e2)
    return delta, [e1, e2]


def store_gate_keys(queue, prg, gate_keys, delta, start, count):
    """In place: gate_keys[b,h,start[b]//BLOCK_SIZE + j] = delta[b,h,j] for the blocks the
    count[b] new tokens touch (blocks past capacity skipped)."""
    batch, heads, p_cap = gate_keys.shape[:3]
    n_local = delta.shape[2]
    if n_local == 0 or batch * heads == 0:
        return []
    evt = _run(queue, prg, "store_gate_keys", (n_local, heads, batch),
               (gate_keys.data, delta.data, start.data, count.data, heads, p_cap, n_local),
               _events_of(gate_keys, delta, start, count), (gate_keys,))
    return [evt]


# --------------------------------------------------------------------------------------
# relevancy and retrieval
# --------------------------------------------------------------------------------------

def relevancy(queue, prg, gate_keys, w_q, query, lengths, n_blocks):
    """probs f32[B,H,n_blocks]: softmax over each row's blocks of the scaled gate logits;
    -inf past a sequence's blocks."""
    batch, heads, p_cap, gate_dim = gate_keys.shape
    group = query.shape[1] // heads
    n_blocks = int(n_blocks)
    probs = cla.empty(queue, (batch, heads, n_blocks), np.float32)
    if n_blocks == 0 or batch * heads == 0:
        return probs, []
    evt = _run(queue, prg, "gate_relevancy", (heads, batch),
               (gate_keys.data, w_q.data, query.data, lengths.data, heads, p_cap, n_blocks, group,
                _gate_scale(gate_dim), probs.data),
               _events_of(gate_keys, w_q, query, lengths), (probs,))
    return probs, [evt]


def _thr(threshold) -> float:
    return float("-inf") if threshold is None else float(threshold)


def retrieval(queue, prg, probs, lengths, k, sink, local, threshold=None):
    """block_ids i32[B,H,k]: forced sink / local blocks plus the best others passing the
    threshold (all of them with threshold None), up to k; ascending, -1 padded.
    Caller: sink + local <= k <= min(K_MAX, n_blocks)."""
    batch, heads, n_blocks = probs.shape
    k = int(k)
    ids = cla.empty(queue, (batch, heads, k), np.int32)
    if k == 0 or batch * heads == 0:
        return ids, []
    evt = _run(queue, prg, "gate_select", (heads, batch),
               (probs.data, lengths.data, heads, n_blocks, k, int(sink), int(local), _thr(threshold), ids.data),
               _events_of(probs, lengths), (ids,))
    return ids, [evt]


def relevancy_retrieval(queue, prg, gate_keys, w_q, query, lengths, n_blocks, k, sink, local, threshold=None):
    """Fused relevancy + retrieval: the same ids as retrieval(relevancy(...)), exactly."""
    batch, heads, p_cap, gate_dim = gate_keys.shape
    group = query.shape[1] // heads
    k = int(k)
    ids = cla.empty(queue, (batch, heads, k), np.int32)
    if k == 0 or batch * heads == 0:
        return ids, []
    evt = _run(queue, prg, "gate_relevancy_select", (heads, batch),
               (gate_keys.data, w_q.data, query.data, lengths.data, heads, p_cap, int(n_blocks), group,
                _gate_scale(gate_dim), k, int(sink), int(local), _thr(threshold), ids.data),
               _events_of(gate_keys, w_q, query, lengths), (ids,))
    return ids, [evt]
