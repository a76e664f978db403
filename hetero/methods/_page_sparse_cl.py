"""Thin pyopencl launchers for fpga_kernels/page_sparse.cl (page-level sparse attention).

Every launcher takes a ``pyopencl.CommandQueue`` (created with PROFILING_ENABLE), a built
``pyopencl.Program`` (built from ``KERNEL_FILE`` with ``defines(...)`` as ``-D`` options),
and ``pyopencl.array.Array`` inputs. Each returns ``(result, events)``; in-place ones
return ``events`` only. ``events`` lists every enqueued kernel, in order, so the caller
can read device timestamps. Nothing here waits on the device: each enqueue waits (on the
device) for the events of its input arrays, and results carry their events, so
out-of-order queues work too. (pyopencl's ``Array.add_event`` itself waits on an array's
oldest events once more than 12 pile up on it, e.g. a summary merged into many times.)

Storage type T (keys / values / summaries) is float32 or float16 and must match the
program's STORAGE_HALF; query / scores / outputs are float32, ids / lengths int32.
The math is hetero/methods/page_sparse_reference.py.

Host overhead: ``cl.Kernel(prg, name)`` costs ~0.3 ms on PoCL and untyped scalar
arguments ~30 us each, so kernel objects (with their scalar argument types declared) are
kept per program and per thread (a kernel object's arguments are shared state).
Scratch buffers are plain ``cl.Buffer`` objects (a ``pyopencl.array`` costs ~50 us).
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pyopencl as cl
import pyopencl.array as cla

KERNEL_FILE = "page_sparse.cl"

# Work-items launched per compute unit for the page-chunk kernels (load balance), and the
# smallest chunk worth a private top-k buffer (smaller chunks only add merge work).
_WAVES_PER_CU = 8
_MIN_CHUNK_PAGES = 256

_B = None  # buffer argument
_I = np.int32
_F = np.float32
_ARG_TYPES = {
    "minmax_delta": [_B, _B, _B, _I, _I, _I, _B],
    "merge_summary": [_B, _B, _B, _I, _I, _I],
    "store_tokens": [_B, _B, _B, _B, _I, _I, _I],
    "relevancy": [_B, _B, _B, _I, _I, _I, _I, _B],
    "topk_partial": [_B, _B, _I, _I, _I, _I, _I, _I, _B, _B],
    "relevancy_topk_partial": [_B, _B, _B, _I, _I, _I, _I, _I, _I, _B, _B],
    "topk_merge": [_B, _B, _B, _I, _I, _I, _I, _I, _I, _B],
    "sparse_attention": [_B, _B, _B, _B, _B, _I, _I, _I, _I, _F, _B, _B, _B],
    "attention_combine": [_B, _B, _I, _I, _B],
}


def defines(head_dim: int, group: int, page_size: int, k_max: int, storage_half) -> dict[str, int]:
    """Compile-time constants of page_sparse.cl, for ``-D{name}={value}`` build options."""
    return {
        "HEAD_DIM": int(head_dim),
        "GROUP": int(group),
        "PAGE_SIZE": int(page_size),
        "K_MAX": int(k_max),
        "STORAGE_HALF": int(bool(storage_half)),
    }


# --------------------------------------------------------------------------------------
# plumbing
# --------------------------------------------------------------------------------------

_tls = threading.local()


def _kernel(prg, name: str, arg_types: dict | None = None) -> cl.Kernel:
    """The cached kernel `name` of `prg`, its scalar argument types taken from `arg_types`
    (another kernel file's table; default this file's)."""
    cache = getattr(_tls, "kernels", None)
    if cache is None:
        cache = _tls.kernels = weakref.WeakKeyDictionary()
    per_prg = cache.get(prg)
    if per_prg is None:
        per_prg = cache[prg] = {}
    knl = per_prg.get(name)
    if knl is None:
        knl = cl.Kernel(prg, name)
        knl.set_scalar_arg_dtypes((arg_types or _ARG_TYPES)[name])
        per_prg[name] = knl
    return knl


def _events_of(*arrays) -> list:
    evs = []
    for a in arrays:
        evs.extend(getattr(a, "events", None) or [])
    return evs


def _run(queue, prg, name, gsize, lsize, args, wait_for=(), outputs=(), arg_types=None):
    """Enqueue kernel `name`; `wait_for` are events, `outputs` arrays that get the event."""
    evt = _kernel(prg, name, arg_types)(queue, gsize, lsize, *args, wait_for=list(wait_for) or None)
    for o in outputs:
        o.add_event(evt)
    return evt


def _scratch(queue, nbytes: int) -> cl.Buffer:
    return cl.Buffer(queue.context, cl.mem_flags.READ_WRITE, max(int(nbytes), 4))


def _compute_units(queue) -> int:
    return max(1, int(queue.device.max_compute_units))


def _chunking(queue, rows: int, n_pages: int) -> tuple[int, int]:
    """(n_chunks, chunk_pages) per (b, h) row: enough work-items to occupy every compute
    unit a few times over, but chunks of at least _MIN_CHUNK_PAGES pages."""
    want = -(-_WAVES_PER_CU * _compute_units(queue) // max(rows, 1))
    n_chunks = max(1, min(want, -(-n_pages // _MIN_CHUNK_PAGES)))
    chunk_pages = max(1, -(-n_pages // n_chunks))
    n_chunks = -(-n_pages // chunk_pages)
    return max(n_chunks, 1), chunk_pages


# --------------------------------------------------------------------------------------
# summary maintenance and cache append
# --------------------------------------------------------------------------------------

def minmax_delta(queue, prg, keys_new, start, count, n_local):
    """delta T[B,H,n_local,2,D]: per local page j (absolute page start[b]//PAGE_SIZE + j),
    min / max over the new tokens keys_new[b, :, :count[b]] in that page (+inf / -inf
    where none)."""
    batch, heads, n_new, dim = keys_new.shape
    n_local = int(n_local)
    delta = cla.empty(queue, (batch, heads, n_local, 2, dim), keys_new.dtype)
    if n_local == 0 or batch * heads == 0:
        return delta, []
    evt = _run(queue, prg, "minmax_delta", (n_local, heads, batch), None,
               (keys_new.data, start.data, count.data, heads, n_new, n_local, delta.data),
               _events_of(keys_new, start, count), (delta,))
    return delta, [evt]


def merge_summary(queue, prg, summary, delta, start):
    """In place: summary[b,h,start[b]//PAGE_SIZE + j] = min/max merge with delta[b,h,j]
    (pages at or past the summary's capacity are skipped)."""
    batch, heads, p_cap = summary.shape[:3]
    n_local = delta.shape[2]
    if n_local == 0 or batch * heads == 0:
        return []
    evt = _run(queue, prg, "merge_summary", (n_local, heads, batch), None,
               (summary.data, delta.data, start.data, heads, p_cap, n_local),
               _events_of(summary, delta, start), (summary,))
    return [evt]


def store_tokens(queue, prg, cache, new, start, count):
    """In place: cache[b,h,start[b]+n,:] = new[b,h,n,:] for n < count[b] (rows past
    capacity skipped)."""
    batch, heads, s_cap = cache.shape[:3]
    n_new = new.shape[2]
    if n_new == 0 or batch * heads == 0:
        return []
    evt = _run(queue, prg, "store_tokens", (n_new, heads, batch), None,
               (cache.data, new.data, start.data, count.data, heads, s_cap, n_new),
               _events_of(cache, new, start, count), (cache,))
    return [evt]


# --------------------------------------------------------------------------------------
# relevancy and retrieval
# --------------------------------------------------------------------------------------

def relevancy(queue, prg, summary, query, lengths, n_pages):
    """scores f32[B,H,n_pages]: max over the group of sum_d max(q*min, q*max);
    -inf past each sequence's pages."""
    batch, heads, p_cap = summary.shape[:3]
    n_pages = int(n_pages)
    scores = cla.empty(queue, (batch, heads, n_pages), np.float32)
    if n_pages == 0 or batch * heads == 0:
        return scores, []
    n_chunks, chunk = _chunking(queue, batch * heads, n_pages)
    evt = _run(queue, prg, "relevancy", (n_chunks, heads, batch), (1, 1, 1),
               (summary.data, query.data, lengths.data, heads, p_cap, n_pages, chunk,
                scores.data),
               _events_of(summary, query, lengths), (scores,))
    return scores, [evt]


def _topk(queue, prg, partial_kernel, partial_args, wait_for, lengths, batch, heads, n_pages,
          k, sink, local):
    """Partial top-k per page chunk (`partial_kernel`), then the merge into page ids."""
    width = min(k, n_pages)
    page_ids = cla.empty(queue, (batch, heads, width), np.int32)
    if width == 0 or batch * heads == 0:
        return page_ids, []
    n_chunks, chunk = _chunking(queue, batch * heads, n_pages)
    slots = batch * heads * n_chunks * max(k - sink - local, 1)
    cand_s, cand_i = _scratch(queue, 4 * slots), _scratch(queue, 4 * slots)
    e1 = _run(queue, prg, partial_kernel, (n_chunks, heads, batch), (1, 1, 1),
              partial_args(chunk) + (k, sink, local, cand_s, cand_i), wait_for)
    e2 = _run(queue, prg, "topk_merge", (heads, batch), (1, 1),
              (cand_s, cand_i, lengths.data, heads, n_chunks, k, sink, local, width,
               page_ids.data),
              [e1], (page_ids,))
    return page_ids, [e1, e2]


def retrieval(queue, prg, scores, lengths, k, sink_pages, local_pages):
    """page_ids i32[B,H,min(k,n_pages)]: sink + local pages plus the best-scoring others
    (ties -> lower page), ascending, -1 padded. Caller: sink + local <= k <= K_MAX."""
    batch, heads, n_pages = scores.shape
    return _topk(queue, prg, "topk_partial",
                 lambda chunk: (scores.data, lengths.data, heads, n_pages, chunk),
                 _events_of(scores, lengths), lengths, batch, heads, n_pages,
                 int(k), int(sink_pages), int(local_pages))


def relevancy_retrieval(queue, prg, summary, query, lengths, n_pages, k, sink_pages, local_pages):
    """Fused relevancy + retrieval: scores never reach global memory. Same page ids as
    retrieval(relevancy(...)), exactly."""
    batch, heads, p_cap = summary.shape[:3]
    return _topk(queue, prg, "relevancy_topk_partial",
                 lambda chunk: (summary.data, query.data, lengths.data, heads, p_cap, chunk),
                 _events_of(summary, query, lengths), lengths, batch, heads, int(n_pages),
                 int(k), int(sink_pages), int(local_pages))


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------

def sparse_attention(queue, prg, k_cache, v_cache, query, page_ids, lengths, scale):
    """out f32[B,H*GROUP,D]: exact softmax attention of each query head over the tokens of
    its KV head's selected pages (tokens >= lengths[b] excluded, page id -1 skipped)."""
    batch, heads, s_cap, dim = k_cache.shape
    q_heads = query.shape[1]
    k_eff = page_ids.shape[2]
    out = cla.empty(queue, (batch, q_heads, dim), np.float32)
    if batch * heads == 0:
        return out, []
    # split the selected pages across work-items only when rows alone cannot fill the CUs
    rows, cus = batch * heads, _compute_units(queue)
    want = -(-2 * cus // rows) if rows < 2 * cus else 1
    n_split = max(1, min(want, k_eff // 4))
    per = max(1, -(-k_eff // n_split))
    n_split = max(1, -(-k_eff // per))
    wait = _events_of(k_cache, v_cache, query, page_ids, lengths)
    if n_split == 1:
        e1 = _run(queue, prg, "sparse_attention", (1, heads, batch), (1, 1, 1),
                  (k_cache.data, v_cache.data, query.data, page_ids.data, lengths.data, heads,
                   s_cap, k_eff, per, float(scale), out.data, out.data, out.data),
                  wait, (out,))
        return out, [e1]
    part_ml = _scratch(queue, 4 * batch * q_heads * n_split * 2)
    part_acc = _scratch(queue, 4 * batch * q_heads * n_split * dim)
    e1 = _run(queue, prg, "sparse_attention", (n_split, heads, batch), (1, 1, 1),
              (k_cache.data, v_cache.data, query.data, page_ids.data, lengths.data, heads,
               s_cap, k_eff, per, float(scale), out.data, part_ml, part_acc),
              wait)
    e2 = _run(queue, prg, "attention_combine", (q_heads, batch), (1, 1),
              (part_ml, part_acc, q_heads, n_split, out.data), [e1], (out,))
    return out, [e1, e2]
