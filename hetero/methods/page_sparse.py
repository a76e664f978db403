"""Page-level query-aware sparse attention (Quest / LServe).

    prepare    per page and KV head, the elementwise min and max of the keys
    relevancy  per page, the bound sum_d max(q_d*min_d, q_d*max_d), max over the query
               heads of a KV group (GQA)
    retrieval  top-k pages per sequence and KV head (ties -> lower page index), sink and
               local pages always kept
    apply      exact attention of the query over only the selected pages' tokens

Memory: the page summaries live on the relevancy device, the KV cache on the apply device.
Both are capacity-padded along the token axis so `append` extends them in place; a new
token's page summary is merged with elementwise min/max, which makes incremental updates
exactly equal to a rebuild. The math of every step is defined once, in
`page_sparse_reference`; the torch and OpenCL implementations below are tested against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..backends import host, opencl
from ..devices import get_device
from ..runtime import Run, Step
from .base import Method

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_FILE = "page_sparse.cl"


class DeviceLengths:
    """For a memory's per-sequence `lengths` (host int64): the int32 copy each step reads on
    its device, moved once per update (cached in `_lengths_on`, cleared by every write)."""

    def lengths_for(self, run: Run, step: Step):
        dev = run.device(step)
        value = self._lengths_on.get(dev.id)
        if value is None:
            value = self._lengths_on[dev.id] = run.to(dev, torch.from_numpy(self.lengths.astype(np.int32)), "lengths")
        return value


@dataclass(eq=False)
class PageSparseMemory(DeviceLengths):
    """Prepared memory of one batch of sequences. `summary` [B, H, pages, 2, D] (min, max)
    sits on the relevancy device; `k_cache`/`v_cache` [B, H, tokens, D] on the apply
    device; `lengths` (host, int64) counts valid tokens per sequence."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    lengths: np.ndarray
    summary: object
    k_cache: object
    v_cache: object
    placement: object = None
    max_length: int = 0
    _lengths_on: dict = field(default_factory=dict, repr=False)

    @property
    def token_capacity(self) -> int:
        return int(self.k_cache.shape[2])

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes held per part of the memory."""
        return {"summary": _nbytes(self.summary), "kv_cache": _nbytes(self.k_cache) + _nbytes(self.v_cache)}

    def __repr__(self) -> str:
        return (f"PageSparseMemory(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, lengths={self.lengths.tolist()}, capacity={self.token_capacity})")


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else int(value.nbytes)


class PageSparseAttention(Method):
    """Quest / LServe page-sparse attention for one decode token.

    Args:
        page_size: tokens per page (16, 32, 64, ...).
        budget_tokens: tokens attended per sequence and KV head, rounded up to whole pages.
        budget_pages: the budget in pages instead (give one of the two).
        sink_pages: leading pages always kept (attention sinks).
        local_pages: trailing (most recent) pages always kept.
        scale: softmax scale; default 1/sqrt(head_dim).
    """

    name = "PageSparseAttention"
    memory_type = PageSparseMemory
    # What a backend must implement to run each step. Memory upkeep runs where the memory
    # lives: summaries on the relevancy device, the KV cache on the apply device.
    needs = {
        Step.PREPARE: ("minmax_delta",),
        Step.RELEVANCY: ("relevancy", "empty_summary", "grow_summary", "merge_summary"),
        Step.RETRIEVAL: ("retrieval",),
        Step.APPLY: ("sparse_attention", "empty_cache", "grow_cache", "store_tokens"),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}
    TOKEN_AXES = (2, 2)  # keys, values [B, H, S, D]

    def __init__(self, page_size: int = 16, budget_tokens: int | None = None, budget_pages: int | None = None,
                 sink_pages: int = 1, local_pages: int = 2, scale: float | None = None):
        super().__init__()
        self.page_size = _positive_int("page_size", page_size)
        if budget_tokens is not None and budget_pages is not None:
            raise ValueError("give budget_tokens or budget_pages, not both")
        if budget_pages is None:
            tokens = 2048 if budget_tokens is None else _positive_int("budget_tokens", budget_tokens)
            budget_pages = -(-tokens // self.page_size)
        self.budget_pages = _positive_int("budget_pages", budget_pages)
        self.sink_pages = _nonnegative_int("sink_pages", sink_pages)
        self.local_pages = _nonnegative_int("local_pages", local_pages)
        if self.sink_pages + self.local_pages > self.budget_pages:
            raise ValueError(f"sink_pages + local_pages ({self.sink_pages} + {self.local_pages}) must not exceed the "
                             f"budget of {self.budget_pages} pages")
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        self.scale = scale
        self.implementations = {"torch": TorchPageSparse(self), "opencl": OpenCLPageSparse(self),
                                "host": HostPageSparse(self)}

    def __repr__(self) -> str:
        return (f"PageSparseAttention(page_size={self.page_size}, budget_pages={self.budget_pages}, "
                f"sink_pages={self.sink_pages}, local_pages={self.local_pages}, scale={self.scale})")

    # --- cost ---------------------------------------------------------------------------

    SHAPES = {"batch": 1, "kv_heads": 8, "q_heads": 32, "head_dim": 128, "context": 32768,
              "dtype": "float16", "layers": 1}

    def shapes(self, **given) -> dict:
        """Shapes for the cost model, defaults filled in: batch, kv_heads, q_heads, head_dim,
        context (tokens per sequence), dtype (storage), layers (each with its own memory)."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, **given}
        for key in ("batch", "kv_heads", "q_heads", "head_dim", "context", "layers"):
            _positive_int(f"shapes[{key!r}]", out[key])
        if out["q_heads"] % out["kv_heads"]:
            raise ValueError(f"shapes['q_heads'] ({out['q_heads']}) must be a multiple of shapes['kv_heads'] "
                             f"({out['kv_heads']})")
        if out["dtype"] not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"shapes['dtype'] must be 'float32', 'float16' or 'bfloat16', got {out['dtype']!r}")
        return out

    def shapes_of(self, memory: PageSparseMemory, query=None) -> dict:
        """The cost-model shapes of a prepared memory (and the query's heads, when given)."""
        q_heads = query.shape[1] if query is not None else memory.kv_heads
        return self.shapes(batch=memory.batch, kv_heads=memory.kv_heads, q_heads=q_heads, head_dim=memory.head_dim,
                           context=max(memory.max_length, 1), dtype=str(memory.dtype).removeprefix("torch."))

    def input_shapes(self, keys, values=None, lengths=None, capacity=None) -> dict:
        """The cost-model shapes `prepare(keys, values, ...)` will build (q_heads unknown: one
        query head per KV head unless the caller says otherwise)."""
        _check_tensor("keys", keys, 4, "[batch, kv_heads, seq, head_dim]")
        batch, heads, seq, dim = keys.shape
        return dict(batch=batch, kv_heads=heads, q_heads=heads, head_dim=dim, context=max(seq, 1),
                    dtype=str(keys.dtype).removeprefix("torch."))

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """The tasks of one call: `appended` new tokens per sequence (1 for a decode step,
        the context for prepare), then, with `query`, relevancy -> retrieval -> apply.
        `backends` maps each step to the backend running it (launch counts and storage
        differ); `fused`: relevancy and retrieval run as one fused operation."""
        from ..cost.model import Access, Task, Workload, safe_log2

        s = self.shapes(**shapes)
        b, h, hq, d, ctx = s["batch"], s["kv_heads"], s["q_heads"], s["head_dim"], s["context"]
        page, layers = self.page_size, s["layers"]
        pages = -(-ctx // page)
        k = min(self.budget_pages, pages)

        def elt(step):
            return storage_bytes(s["dtype"], backends[step])

        summary = b * h * pages * 2 * d * elt(Step.RELEVANCY)
        kvw = kv_work(s, backends, appended, k * page, "page_ids")
        query_bytes, ids_bytes = kvw.reads["query"], b * h * k * 4
        tasks: list[Task] = []

        def launches(step, per_backend):  # kernels (torch ops, shim calls) each operation issues, counted in the code below
            return per_backend[backends[step]]

        if allocate:
            tasks += [Task(Step.RELEVANCY, "empty_summary", 0, "float32", "stream",
                           (Access("summary", summary, summary * layers),), launches=1), *kvw.allocate]
        if appended:
            new = kvw.reads["new_keys"]
            local = -(-appended // page) + 1
            delta = b * h * local * 2 * d * elt(Step.RELEVANCY)
            tasks += [
                Task(Step.PREPARE, "minmax_delta", 2 * b * h * appended * d, "float32", "stream",
                     (Access("new_keys", new + delta, new + delta),), ("new_keys",), (("delta", delta),),
                     launches(Step.PREPARE, {"torch": 3 + 4 * b, "host": 3 + 4 * b, "opencl": 1})),
                Task(Step.RELEVANCY, "merge_summary", 2 * b * h * local * d, "float32", "stream",
                     (Access("summary", 3 * delta, summary * layers),), ("delta",), (),
                     launches(Step.RELEVANCY, {"torch": 2 * b, "host": 2 * b, "opencl": 1})), *kvw.store]
        if query:
            scan_flops = 4 * b * hq * pages * d
            summary_read = Access("summary", summary, summary * layers)
            query_read = Access("query", query_bytes, query_bytes)
            scores = b * h * pages * 4
            if fused:
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", scan_flops + b * h * pages * safe_log2(k),
                                  s["dtype"], "scan", (summary_read, query_read, Access("page_ids", ids_bytes, ids_bytes)),
                                  ("query", "lengths"), (("page_ids", ids_bytes),),
                                  launches(Step.RELEVANCY, {"host": 1, "opencl": 2})))
            else:
                tasks.append(Task(Step.RELEVANCY, "relevancy", scan_flops, s["dtype"], "scan",
                                  (summary_read, query_read, Access("scores", scores, scores)),
                                  ("query", "lengths"), (("scores", scores),),
                                  launches(Step.RELEVANCY, {"torch": 12, "host": 1, "opencl": 1})))
                passes = {"torch": 6, "host": 3, "opencl": 1}[backends[Step.RETRIEVAL]]
                tasks.append(Task(Step.RETRIEVAL, "retrieval", b * h * pages * safe_log2(k), "float32", "select",
                                  (Access("scores", passes * scores + ids_bytes, scores),),
                                  ("scores", "lengths"), (("page_ids", ids_bytes),),
                                  launches(Step.RETRIEVAL, {"torch": 25, "host": 10, "opencl": 2})))
            tasks.append(kvw.apply)
        resident = {Step.RELEVANCY: {"summary": summary * layers}, Step.APPLY: {"kv_cache": kvw.resident}}
        return Workload(tasks, kvw.inputs(b, bool(appended), query), ("output",) if query else (), resident, layers)

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """Synthetic inputs at `shapes` (see `shapes()`; the context is the cache length):
        ((keys, values), query) in `shapes['dtype']`, with a planted needle token (`synthetic_cache`)."""
        return kv_example_inputs(self.shapes(**(shapes or {})), seed)

    def reference_step(self, inputs, query):
        """The decode step by `page_sparse_reference` (numpy, float64) on `prepare`'s inputs
        (keys, values): (selected page ids [B, H, width] ascending, -1 padded; output [B, Hq, D])."""
        from . import page_sparse_reference as ref

        keys, values = (np.asarray(x.detach().cpu().float()) for x in inputs[:2])
        q = query.detach().cpu().double().numpy()
        lengths = [keys.shape[2]] * keys.shape[0]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(keys.shape[-1])
        scores = ref.relevancy(*ref.page_minmax(keys, lengths, self.page_size), q, lengths, self.page_size)
        selected = ref.retrieval(scores, lengths, self.page_size, self.budget_pages, self.sink_pages, self.local_pages)
        return selected, ref.sparse_attention(keys, values, q, selected, lengths, self.page_size, scale)

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, keys, values, lengths=None, capacity: int | None = None) -> PageSparseMemory:
        """Build the memory from keys/values [B, H, S, D]; `lengths` [B] gives each
        sequence's valid tokens (default S); `capacity` reserves room for appends."""
        batch, heads, seq, dim = _check_kv(keys, values)
        lengths = _check_lengths(lengths, batch, seq)
        tokens = _round_up(_capacity(capacity, lengths), self.page_size)
        memory = PageSparseMemory(
            batch, heads, dim, keys.dtype, np.zeros(batch, dtype=np.int64),
            summary=run.run(Step.RELEVANCY, "empty_summary", (batch, heads, tokens // self.page_size, 2, dim),
                            keys.dtype, label="prepare"),
            k_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, tokens, dim), keys.dtype, label="prepare"),
            v_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, tokens, dim), keys.dtype, label="prepare"))
        self._write(run, memory, keys, values, memory.summary, memory.k_cache, memory.v_cache, lengths)
        return memory

    def append(self, run: Run, memory: PageSparseMemory, keys, values) -> PageSparseMemory:
        """Extend every sequence by keys/values [B, H, n, D], updating the partial last page's
        summary in place. Everything is checked before anything changes."""
        n = _check_append(memory, keys, values, run.validate)
        if n == 0:
            return memory
        summary, k_cache, v_cache = memory.summary, memory.k_cache, memory.v_cache
        tokens = _grown_capacity(memory, n, self.page_size)
        if tokens:  # grow into new arrays; the old ones stay valid until the end
            summary = run.run(Step.RELEVANCY, "grow_summary", summary, tokens // self.page_size, label="prepare")
            k_cache = run.run(Step.APPLY, "grow_cache", k_cache, tokens, label="prepare")
            v_cache = run.run(Step.APPLY, "grow_cache", v_cache, tokens, label="prepare")
        self._write(run, memory, keys, values, summary, k_cache, v_cache, np.full(memory.batch, n, dtype=np.int64))
        return memory

    def _write(self, run, memory, keys, values, summary, k_cache, v_cache, count):
        n_local = int(((memory.lengths % self.page_size + count + self.page_size - 1) // self.page_size).max())
        # per-sequence offsets travel as tuples: host metadata, never moved as device values
        start, counts = tuple(memory.lengths.tolist()), tuple(count.tolist())
        delta = run.run(Step.PREPARE, "minmax_delta", keys, start, counts, n_local)
        run.run(Step.RELEVANCY, "merge_summary", summary, delta, start, label="prepare")
        memory.summary = summary
        store_kv(run, memory, keys, values, k_cache, v_cache, start, counts)

    def step(self, run: Run, query, memory: PageSparseMemory):
        """One decode token's query [B, Hq, D] -> attention output [B, Hq, D] on its device."""
        _check_query(query, memory, scan_values=run.validate)
        n_pages = -(-memory.max_length // self.page_size)
        k = min(self.budget_pages, n_pages)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(memory.head_dim)
        if run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            page_ids = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.summary, query,
                               memory.lengths_for(run, Step.RELEVANCY), n_pages, k, self.sink_pages,
                               self.local_pages, label="relevancy+retrieval")
        else:
            scores = run.run(Step.RELEVANCY, "relevancy", memory.summary, query,
                             memory.lengths_for(run, Step.RELEVANCY), n_pages)
            page_ids = run.run(Step.RETRIEVAL, "retrieval", scores, memory.lengths_for(run, Step.RETRIEVAL), k,
                               self.sink_pages, self.local_pages,
                               (memory.head_dim, query.shape[1] // memory.kv_heads, memory.dtype == torch.float16))
        # kept by reference: free unless read ("page_ids" is the older name)
        run.record.artifacts["selected"] = run.record.artifacts["page_ids"] = page_ids
        out = run.run(Step.APPLY, "sparse_attention", memory.k_cache, memory.v_cache, query, page_ids,
                      memory.lengths_for(run, Step.APPLY), scale)
        out = run.to_torch(out, query.device)
        return out if out.dtype == query.dtype else out.to(query.dtype)


# --- input checks ----------------------------------------------------------------------

def _positive_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _nonnegative_int(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_tensor(name: str, value, rank: int, layout: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {list(value.shape)}")
    if value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be float32, float16 or bfloat16, got {value.dtype}")


def _check_finite(name: str, value: torch.Tensor) -> None:
    if value.device.type == "cpu" and value.dtype != torch.bfloat16:
        array = value.detach().numpy()
        # one reduction decides the common case: a finite sum means every element is finite;
        # a non-finite one (NaN/Inf inside, or an overflowing sum) gets the exact test
        finite = bool(np.isfinite(array.sum())) or bool(np.isfinite(array).all())
    else:
        finite = bool(torch.isfinite(value).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf")


def _check_kv(keys, values, allow_empty: bool = False, scan_values: bool = True):
    layout = "[batch, kv_heads, seq, head_dim]"
    _check_tensor("keys", keys, 4, layout)
    _check_tensor("values", values, 4, layout)
    if keys.shape != values.shape:
        raise ValueError(f"values shape {list(values.shape)} must equal keys shape {list(keys.shape)}")
    if keys.dtype != values.dtype:
        raise ValueError(f"values dtype {values.dtype} must equal keys dtype {keys.dtype}")
    if keys.device != values.device:
        raise ValueError(f"keys are on {keys.device} but values on {values.device}; put them on one device")
    batch, heads, seq, dim = keys.shape
    if batch == 0 or heads == 0 or dim == 0:
        raise ValueError(f"keys must have batch, kv_heads and head_dim >= 1, got shape {list(keys.shape)}")
    if seq == 0 and not allow_empty:
        raise ValueError("keys hold no tokens (seq = 0): an empty memory cannot be prepared")
    if scan_values:
        _check_finite("keys", keys)
        _check_finite("values", values)
    return batch, heads, seq, dim


def _check_lengths(lengths, batch: int, seq: int) -> np.ndarray:
    if lengths is None:
        return np.full(batch, seq, dtype=np.int64)
    arr = lengths.detach().cpu().numpy() if isinstance(lengths, torch.Tensor) else np.asarray(lengths)
    if arr.shape != (batch,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths must be {batch} integers (one per sequence), got {arr.tolist()!r}")
    if (arr < 1).any() or (arr > seq).any():
        raise ValueError(f"lengths must lie in [1, {seq}] (an empty sequence has no memory), got {arr.tolist()}")
    return arr.astype(np.int64)


def _check_query(query, memory: PageSparseMemory, scan_values: bool = True) -> None:
    _check_tensor("query", query, 3, "[batch, q_heads, head_dim]")
    batch, q_heads, dim = query.shape
    if batch != memory.batch or dim != memory.head_dim:
        raise ValueError(f"query must be [{memory.batch}, q_heads, {memory.head_dim}] to match the memory, "
                         f"got {list(query.shape)}")
    if q_heads == 0 or q_heads % memory.kv_heads:
        raise ValueError(f"query q_heads ({q_heads}) must be a positive multiple of the memory's kv_heads "
                         f"({memory.kv_heads})")
    if scan_values:
        _check_finite("query", query)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --- the KV cache every method keeps on its apply device ---------------------------------

KV_OPS = ("empty_cache", "grow_cache", "store_tokens", "sparse_attention")


def _capacity(capacity, lengths: np.ndarray) -> int:
    """Tokens to reserve per sequence: `capacity`, checked, or the longest sequence + 1/8."""
    longest = int(lengths.max())
    if capacity is None:
        return longest + max(256, longest // 8)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < longest:
        raise ValueError(f"capacity must be an int >= the longest sequence ({longest}), got {capacity!r}")
    return capacity


def _check_append(memory, keys, values, scan_values: bool) -> int:
    """Tokens per sequence that `append(memory, keys, values, ...)` adds, after checking the
    new keys/values match the memory."""
    batch, heads, n, dim = _check_kv(keys, values, allow_empty=True, scan_values=scan_values)
    if (batch, heads, dim) != (memory.batch, memory.kv_heads, memory.head_dim):
        raise ValueError(f"keys must be [{memory.batch}, {memory.kv_heads}, n, {memory.head_dim}] like the memory, "
                         f"got {list(keys.shape)}")
    if keys.dtype != memory.dtype:
        raise ValueError(f"keys dtype {keys.dtype} differs from the memory's {memory.dtype}")
    return n


def _grown_capacity(memory, n: int, multiple: int) -> int:
    """The token capacity the caches grow to (a multiple of `multiple`, by at least a
    quarter) when `n` more tokens do not fit; 0 when they do."""
    needed = int(memory.lengths.max()) + n
    if needed <= memory.token_capacity:
        return 0
    return _round_up(max(needed, memory.token_capacity + memory.token_capacity // 4), multiple)


def store_kv(run: Run, memory, keys, values, k_cache, v_cache, start: tuple, counts: tuple) -> None:
    """Write the new tokens' K/V at `start` on the apply device and advance the lengths:
    the last part of every prepare and append."""
    run.run(Step.APPLY, "store_tokens", k_cache, keys, start, counts, label="prepare")
    run.run(Step.APPLY, "store_tokens", v_cache, values, start, counts, label="prepare")
    memory.k_cache, memory.v_cache = k_cache, v_cache
    memory.lengths = memory.lengths + np.asarray(counts, dtype=np.int64)
    memory.max_length = int(memory.lengths.max())
    memory._lengths_on.clear()


def storage_bytes(dtype: str, backend: str) -> int:
    """Bytes per stored element of `dtype` on `backend`: OpenCL stores float16 as half and
    everything else as float; torch and the host keep the caller's dtype."""
    if backend == "opencl":
        return 2 if dtype == "float16" else 4
    return 4 if dtype == "float32" else 2


@dataclass
class KVWork:
    """The KV cache's share of any method's workload (see `kv_work`), in flow order: the
    two caches' allocation, the two stores of each append, apply over the selection."""

    allocate: list
    store: list
    apply: object
    reads: dict  # bytes of new_keys, new_values and query, values the call receives
    resident: float  # bytes of K and V over all layers

    def inputs(self, batch: int, appended: bool, query: bool) -> dict:
        """A call's inputs from the home device: lengths, and the new K/V and/or the query."""
        names = (("new_keys", "new_values") if appended else ()) + (("query",) if query else ())
        return {"lengths": batch * 4, **{n: self.reads[n] for n in names}}


def kv_work(s: dict, backends: dict, appended: int, selected_tokens: int, ids: str) -> KVWork:
    """Cost-model tasks of the KV cache for shapes `s`: `appended` tokens per sequence
    stored, then attention over `selected_tokens` per sequence and KV head whose ids
    arrive as the value `ids`."""
    from ..cost.model import Access, Task

    b, h, hq, d, ctx, layers = s["batch"], s["kv_heads"], s["q_heads"], s["head_dim"], s["context"], s["layers"]
    backend = backends[Step.APPLY]
    in_size, elt = storage_bytes(s["dtype"], "torch"), storage_bytes(s["dtype"], backend)
    kv = 2 * b * h * ctx * d * elt
    new = b * h * appended * d * in_size
    out_bytes = b * hq * d * 4
    allocate = [Task(Step.APPLY, "empty_cache", 0, "float32", "stream", (Access("kv_cache", kv / 2, kv * layers),),
                     launches=1) for _ in range(2)]
    store = [Task(Step.APPLY, "store_tokens", 0, "float32", "stream",
                  (Access("kv_cache", 2 * new * elt / in_size, kv * layers),), (what,),
                  launches={"torch": b, "host": 1, "opencl": 1}[backend]) for what in ("new_keys", "new_values")]
    gathered = 2 * b * h * selected_tokens * d * elt
    apply = Task(Step.APPLY, "sparse_attention", 4 * b * hq * selected_tokens * d, "float32", "gather",
                 (Access("kv_cache", gathered, kv * layers), Access("output", out_bytes, out_bytes)),
                 ("query", ids, "lengths"), (("output", out_bytes),), {"torch": 20, "host": 17, "opencl": 1}[backend])
    reads = {"new_keys": new, "new_values": new, "query": b * hq * d * in_size}
    return KVWork(allocate, store, apply, reads, kv * layers)


class SharesApply:
    """A method implementation whose KV cache and apply step are page-sparse's: the ops
    in KV_OPS come from `method.attention`'s implementation on the same backend."""

    def __init__(self, method, backend: str):
        self.method = method
        self.attention = method.attention.impl(backend)
        for op in KV_OPS:
            setattr(self, op, getattr(self.attention, op))


# --- torch ----------------------------------------------------------------------------

class TorchPageSparse:
    """All four steps with torch ops, on CPU or GPU."""

    def __init__(self, method: PageSparseAttention):
        self.page_size = method.page_size
        self._gathered: dict[str, torch.Tensor] = {}  # "k"/"v" -> the last gather buffer, reused

    def _gather(self, name: str, cache, flat):
        """The pages `flat` of `cache` [.., tokens, D] copied into a buffer kept between calls:
        a fresh multi-MB tensor each step is mmap'd and page-faulted anew by glibc on many
        calls, which made CPU steps bimodal (e.g. 3.5 vs 8.5 ms at 16K)."""
        dim = cache.shape[-1]
        shape = (flat.numel(), self.page_size, dim)
        buf = self._gathered.get(name)
        if buf is None or buf.shape != shape or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self._gathered[name] = torch.empty(shape, dtype=cache.dtype, device=cache.device)
        return torch.index_select(cache.view(-1, self.page_size, dim), 0, flat, out=buf)

    def empty_summary(self, dev, shape, dtype):
        return _fill_summary(torch.empty(shape, dtype=dtype, device=dev.handle))

    def empty_cache(self, dev, shape, dtype):
        return torch.zeros(shape, dtype=dtype, device=dev.handle)

    def grow_summary(self, dev, summary, pages):
        grown = self.empty_summary(dev, (*summary.shape[:2], pages, *summary.shape[3:]), summary.dtype)
        grown[:, :, : summary.shape[2]] = summary
        return grown

    def grow_cache(self, dev, cache, tokens):
        grown = self.empty_cache(dev, (*cache.shape[:2], tokens, cache.shape[3]), cache.dtype)
        grown[:, :, : cache.shape[2]] = cache
        return grown

    def minmax_delta(self, dev, keys, start, count, n_local):
        """Min/max of the new tokens per page they fall in; local page j of sequence b is
        absolute page start[b] // page + j. Pages without new tokens hold +inf / -inf."""
        batch, heads, _, dim = keys.shape
        page = self.page_size
        delta = self.empty_summary(dev, (batch, heads, n_local, 2, dim), keys.dtype)
        for b in range(batch):
            offset, n = int(start[b]) % page, int(count[b])
            head = min(n, (page - offset) % page)  # tokens completing a partial first page
            if head:
                _merge_minmax(delta[b, :, 0], keys[b, :, :head])
            full = (n - head) // page
            if full:
                pages = keys[b, :, head: head + full * page].unflatten(1, (full, page))
                first = 1 if head else 0
                delta[b, :, first: first + full, 0] = pages.amin(2)
                delta[b, :, first: first + full, 1] = pages.amax(2)
            tail = n - head - full * page
            if tail:
                _merge_minmax(delta[b, :, (1 if head else 0) + full], keys[b, :, n - tail: n])
        return delta

    def merge_summary(self, dev, summary, delta, start):
        for b in range(summary.shape[0]):
            first = int(start[b]) // self.page_size
            n = min(delta.shape[2], summary.shape[2] - first)
            target = summary[b, :, first: first + n]
            torch.minimum(target[:, :, 0], delta[b, :, :n, 0], out=target[:, :, 0])
            torch.maximum(target[:, :, 1], delta[b, :, :n, 1], out=target[:, :, 1])

    def store_tokens(self, dev, cache, new, start, count):
        for b in range(cache.shape[0]):
            s, n = int(start[b]), int(count[b])
            cache[b, :, s: s + n] = new[b, :, :n]

    def relevancy(self, dev, summary, query, lengths, n_pages):
        """The bound as one batched GEMM: [min | max] . [min(q, 0) | max(q, 0)] equals
        sum_d max(q_d*min_d, q_d*max_d) term by term, since min <= max."""
        batch, heads, _, _, dim = summary.shape
        group = query.shape[1] // heads
        pages = summary[:, :, :n_pages].flatten(0, 1).flatten(-2)  # [B*H, n, 2D], a view
        q = query.reshape(batch * heads, group, dim)
        weights = torch.cat([q.clamp(max=0), q.clamp(min=0)], -1).transpose(1, 2)
        compute = torch.float32 if pages.device.type == "cpu" else pages.dtype  # CPU half GEMMs are slow
        scores = torch.bmm(pages.to(compute), weights.to(compute)).amax(-1).view(batch, heads, n_pages).float()
        valid = torch.arange(n_pages, device=scores.device) < _pages_of(lengths, self.page_size)[:, None]
        return scores.masked_fill_(~valid[:, None, :], -math.inf)

    def retrieval(self, dev, scores, lengths, k, sink_pages, local_pages, shape=None):
        """Forced pages get +inf; then exactly k per row: every score above the k-th
        largest, and the lowest-index pages among those equal to it."""
        batch, heads, n = scores.shape
        n_pages = _pages_of(lengths, self.page_size)[:, None]
        page = torch.arange(n, device=scores.device)[None, :]
        forced = ((page < sink_pages) | (page >= n_pages - local_pages)) & (page < n_pages)
        ranked = scores.masked_fill(forced[:, None, :], math.inf)
        kth = torch.topk(ranked, k, dim=-1).values[..., -1:]
        above = ranked > kth
        tied = ranked == kth
        take_tied = tied & (torch.cumsum(tied, -1) <= k - above.sum(-1, keepdim=True))
        ids = (above | take_tied).nonzero()[:, 2].view(batch, heads, k)  # row-major: ascending
        return torch.where(ids < n_pages[:, :, None], ids, -1).to(torch.int32)

    def sparse_attention(self, dev, k_cache, v_cache, query, page_ids, lengths, scale):
        batch, heads, tokens, dim = k_cache.shape
        page = self.page_size
        k = page_ids.shape[-1]
        rows = torch.arange(batch * heads, device=k_cache.device).view(batch, heads, 1) * (tokens // page)
        flat = (rows + page_ids.clamp(min=0).long()).flatten()
        # whole pages are contiguous: index_select copies page-sized blocks
        k_sel = self._gather("k", k_cache, flat).view(batch, heads, k * page, dim)
        v_sel = self._gather("v", v_cache, flat).view(batch, heads, k * page, dim)
        return _attend_pages(query, k_sel, v_sel, page_ids, lengths, page, scale)


def _attend_pages(query, k_sel, v_sel, page_ids, lengths, page: int, scale: float):
    """Attention over gathered pages k_sel/v_sel [B, H, k*page, D] (page i of a row holds
    page_ids[..., i]); padding pages and tokens past a sequence's end are masked out. The G
    query heads of a KV group are G query rows against that head's tokens: GQA without
    repeated K/V, in one fused SDPA kernel (faster than matmul-softmax-matmul)."""
    batch, heads, tokens, dim = k_sel.shape
    ids = page_ids.long()
    pos = ids[..., None] * page + torch.arange(page, device=k_sel.device)
    valid = (ids[..., None] >= 0) & (pos < lengths.long()[:, None, None, None])
    if k_sel.dtype != torch.float32 and k_sel.device.type == "cpu":
        k_sel, v_sel = k_sel.float(), v_sel.float()
    q = query.reshape(batch, heads, -1, dim).to(k_sel.dtype)
    out = F.scaled_dot_product_attention(q, k_sel, v_sel, attn_mask=valid.view(batch, heads, 1, tokens), scale=scale)
    return out.reshape(query.shape).float()


def _fill_summary(summary):
    """Every page empty: +inf mins and -inf maxes, the identities of min and max."""
    summary[:, :, :, 0] = math.inf
    summary[:, :, :, 1] = -math.inf
    return summary


def _merge_minmax(target, tokens) -> None:
    """target [H, 2, D] <- elementwise min/max with tokens [H, n, D]."""
    torch.minimum(target[:, 0], tokens.amin(1), out=target[:, 0])
    torch.maximum(target[:, 1], tokens.amax(1), out=target[:, 1])


def _pages_of(lengths, page_size: int):
    return (lengths.long() + page_size - 1) // page_size


def kv_example_inputs(s: dict, seed: int = 0):
    """((keys, values), query) of `synthetic_cache` at complete shapes `s`, in s['dtype']."""
    keys, values, query, _ = synthetic_cache(s["batch"], s["kv_heads"], s["q_heads"] // s["kv_heads"], s["context"],
                                             s["head_dim"], seed)
    dtype = getattr(torch, s["dtype"])
    return (keys.to(dtype), values.to(dtype)), query.to(dtype)


def synthetic_cache(batch: int, kv_heads: int, group: int, seq: int, dim: int, seed: int = 0):
    """Random keys/values and a query; returns (keys, values, query, needle_token)."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    values = torch.randn(batch, kv_heads, seq, dim, generator=gen)
    query = torch.randn(batch, kv_heads * group, dim, generator=gen)
    needle = int(torch.randint(seq // 4, 3 * seq // 4, (1,), generator=gen))
    direction = query.view(batch, kv_heads, group, dim).mean(2)
    keys[:, :, needle] = 8.0 * direction / direction.norm(dim=-1, keepdim=True) * dim ** 0.5
    return keys, values, query, needle


def dense_attention(keys, values, query, lengths=None, scale=None):
    """The dense baseline: attention of one decode token over every valid token. A KV
    group's query heads are the query rows of one SDPA call, so GQA needs no repeated K/V
    (the fastest dense form on CPU in bench/sparse_attention.py)."""
    batch, heads, seq, dim = keys.shape
    q = query.reshape(batch, heads, -1, dim)
    mask = None
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=keys.device)
        mask = (torch.arange(seq, device=keys.device)[None, :] < lengths[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).reshape(query.shape)


# --- OpenCL ---------------------------------------------------------------------------

class OpenCLPageSparse:
    """Steps as OpenCL kernels (fpga_kernels/page_sparse.cl), with a fused relevancy+top-k
    used when relevancy and retrieval share a device. Storage is half for float16 keys,
    float otherwise; compute is float32."""

    def __init__(self, method: PageSparseAttention):
        self.method = method

    def _program(self, dev, head_dim: int, storage, group: int = 1):
        from . import _page_sparse_cl as kernels

        defines = kernels.defines(head_dim, group, self.method.page_size, self.method.budget_pages,
                                  np.dtype(storage) == np.float16)
        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, defines), kernels

    def _host_filled(self, dev, shape, dtype, fill_summary: bool):
        """Initial contents built on the host and copied in: no generated kernels, so the
        same path works on an FPGA that runs only its precompiled program."""
        np_dtype = np.float16 if dtype == torch.float16 else np.float32
        host = np.zeros(shape, dtype=np_dtype)
        if fill_summary:
            host[:, :, :, 0] = np.inf
            host[:, :, :, 1] = -np.inf
        return opencl.cla.to_device(opencl.queue(dev), host)

    def empty_summary(self, dev, shape, dtype):
        return self._host_filled(dev, shape, dtype, True), []

    def empty_cache(self, dev, shape, dtype):
        return self._host_filled(dev, shape, dtype, False), []

    def _grow(self, dev, old, new_len, fill_summary):
        shape = (*old.shape[:2], new_len, *old.shape[3:])
        grown = self._host_filled(dev, shape, torch.float16 if old.dtype == np.float16 else torch.float32, fill_summary)
        rows = old.shape[0] * old.shape[1]
        old_row, new_row = old.nbytes // rows, grown.nbytes // rows
        evt = opencl.cl.enqueue_copy(opencl.queue(dev), grown.data, old.data, src_origin=(0, 0, 0),
                                     dst_origin=(0, 0, 0), region=(old_row, rows, 1),
                                     src_pitches=(old_row, 0), dst_pitches=(new_row, 0))
        return grown, [evt]

    def grow_summary(self, dev, summary, pages):
        return self._grow(dev, summary, pages, True)

    def grow_cache(self, dev, cache, tokens):
        return self._grow(dev, cache, tokens, False)

    def minmax_delta(self, dev, keys, start, count, n_local):
        q, prg, kernels = self._program(dev, keys.shape[-1], keys.dtype)
        return kernels.minmax_delta(q, prg, keys, _ints(q, start), _ints(q, count), n_local)

    def merge_summary(self, dev, summary, delta, start):
        q, prg, kernels = self._program(dev, summary.shape[-1], summary.dtype)
        return None, kernels.merge_summary(q, prg, summary, delta, _ints(q, start))

    def store_tokens(self, dev, cache, new, start, count):
        q, prg, kernels = self._program(dev, cache.shape[-1], cache.dtype)
        return None, kernels.store_tokens(q, prg, cache, new, _ints(q, start), _ints(q, count))

    def relevancy(self, dev, summary, query, lengths, n_pages):
        q, prg, kernels = self._program(dev, summary.shape[-1], summary.dtype, query.shape[1] // summary.shape[1])
        return kernels.relevancy(q, prg, summary, _f32(query), lengths, n_pages)

    def retrieval(self, dev, scores, lengths, k, sink_pages, local_pages, shape=(1, 1, False)):
        # `shape` (head_dim, group, half storage) names the compiled configuration: on an FPGA every kernel of
        # a configuration sits in one binary, the retrieval kernel included
        q, prg, kernels = self._program(dev, shape[0], np.float16 if shape[2] else np.float32, shape[1])
        return kernels.retrieval(q, prg, scores, lengths, k, sink_pages, local_pages)

    def relevancy_retrieval(self, dev, summary, query, lengths, n_pages, k, sink_pages, local_pages):
        q, prg, kernels = self._program(dev, summary.shape[-1], summary.dtype, query.shape[1] // summary.shape[1])
        return kernels.relevancy_retrieval(q, prg, summary, _f32(query), lengths, n_pages, k, sink_pages, local_pages)

    def sparse_attention(self, dev, k_cache, v_cache, query, page_ids, lengths, scale):
        q, prg, kernels = self._program(dev, k_cache.shape[-1], k_cache.dtype, query.shape[1] // k_cache.shape[1])
        return kernels.sparse_attention(q, prg, k_cache, v_cache, _f32(query), page_ids, lengths, scale)


def _ints(queue, values) -> "opencl.cla.Array":
    return opencl.cla.to_device(queue, np.ascontiguousarray(values, dtype=np.int32))


def _f32(array):
    """Kernels read float32 queries; other dtypes are converted through the host."""
    if array.dtype == np.float32:
        return array
    return opencl.cla.to_device(array.queue, array.get().astype(np.float32))


# --- host (C++ shim) ------------------------------------------------------------------

class HostPageSparse:
    """The CPU through the C++ shim: relevancy, top-k and their fusion, the page gather of
    apply and the append scatter run multi-threaded with the GIL released. Elementwise
    memory upkeep (min/max summaries, growing) runs as torch ops on zero-copy views of the
    same host arrays."""

    def __init__(self, method: PageSparseAttention):
        self.method = method
        self.torch = TorchPageSparse(method)
        self.cpu = get_device("torch:cpu")

    def _alloc(self, shape, dtype, fill_summary: bool):
        out = host.staging(shape, host.numpy_dtype(dtype))
        view = torch.from_numpy(out)
        _fill_summary(view) if fill_summary else view.zero_()
        return out

    def empty_summary(self, dev, shape, dtype):
        return self._alloc(shape, dtype, True)

    def empty_cache(self, dev, shape, dtype):
        return self._alloc(shape, dtype, False)

    def _grow(self, old, length, fill_summary):
        grown = self._alloc((*old.shape[:2], length, *old.shape[3:]), torch.from_numpy(old).dtype, fill_summary)
        grown[:, :, : old.shape[2]] = old
        return grown

    def grow_summary(self, dev, summary, pages):
        return self._grow(summary, pages, True)

    def grow_cache(self, dev, cache, tokens):
        return self._grow(cache, tokens, False)

    def minmax_delta(self, dev, keys, start, count, n_local):
        return self.torch.minmax_delta(self.cpu, torch.from_numpy(keys), start, count, n_local).numpy()

    def merge_summary(self, dev, summary, delta, start):
        self.torch.merge_summary(self.cpu, torch.from_numpy(summary), torch.from_numpy(delta), start)

    def store_tokens(self, dev, cache, new, start, count):
        # every sequence's whole slice of `new` is written: slots past count[b] lie past that
        # sequence's length (and within capacity), where nothing reads them
        host._host.scatter_tokens(cache, np.ascontiguousarray(new), np.asarray(start, dtype=np.int64))

    def relevancy(self, dev, summary, query, lengths, n_pages):
        return host._host.page_scores(summary, _as_f32(query), lengths, n_pages, self.method.page_size)

    def retrieval(self, dev, scores, lengths, k, sink_pages, local_pages, shape=None):
        """Forced pages raised to +inf, the shim's top-k (ties -> lower index), then ids in
        ascending order with pages past a sequence's end as -1 padding."""
        batch, heads, n = scores.shape
        n_pages = (lengths.astype(np.int64) + self.method.page_size - 1) // self.method.page_size
        page = np.arange(n)
        forced = ((page < sink_pages) | (page >= (n_pages - local_pages)[:, None])) & (page < n_pages[:, None])
        ranked = np.where(forced[:, None, :], np.float32(np.inf), scores).reshape(batch * heads, n)
        ids = np.sort(host._host.topk(np.ascontiguousarray(ranked, np.float32), k)[1], axis=-1).reshape(batch, heads, k)
        return np.where(ids < n_pages[:, None, None], ids, -1).astype(np.int32)

    def relevancy_retrieval(self, dev, summary, query, lengths, n_pages, k, sink_pages, local_pages):
        return host._host.page_topk(summary, _as_f32(query), lengths, n_pages, self.method.page_size, k,
                                    sink_pages, local_pages)

    def sparse_attention(self, dev, k_cache, v_cache, query, page_ids, lengths, scale):
        """The shim gathers the selected pages into pooled buffers; attention over them is
        one SDPA call on zero-copy views."""
        page = self.method.page_size
        k_sel = torch.from_numpy(host._host.gather_pages(k_cache, page_ids, page))
        v_sel = torch.from_numpy(host._host.gather_pages(v_cache, page_ids, page))
        return _attend_pages(torch.from_numpy(_as_f32(query)), k_sel, v_sel, torch.from_numpy(page_ids),
                             torch.from_numpy(lengths), page, scale).numpy()


def _as_f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32)
