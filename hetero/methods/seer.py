"""SeerAttention-R style block gating: learned-gate block-sparse attention.

    prepare    per block of keys (block_size tokens) and KV head, [max-pool | mean-pool] of
               the block's keys through a projection: the gate key k_gate = W_k pooled
    relevancy  per KV head, the gate query q_gate = W_q mean(query heads of the KV group),
               then softmax over the sequence's blocks of q_gate . k_gate / sqrt(gate_dim)
    retrieval  top-k mode (threshold None): exactly min(budget, blocks) blocks, the sink
               and local blocks forced in, then the most probable (ties -> lower index);
               threshold mode: the forced blocks plus every block whose gate probability
               is >= threshold, the most probable first, at most `budget` in all (a
               variable count per row, -1 padded)
    apply      exact attention of the query over only the selected blocks' tokens

Memory: the gate keys [B, H, blocks, gate_dim] and W_q on the relevancy device; the running
(max, sum) stats of each sequence's partial last block and W_k on the prepare device; the KV
cache on the apply device. Apply and the KV-cache upkeep are page-sparse's with pages of
`block_size` tokens (`self.attention`): identical code paths on every backend. An append
pools its new tokens together with the running stats and re-projects only the blocks it
touches, which equals a rebuild: bit for bit on OpenCL (block sums run in token order), up
to float rounding of the block sums with torch. The math of every step is `seer_reference`;
the implementations below are tested against it.

OpenCL (fpga_kernels/seer.cl): one work-item per (sequence, KV head) row for relevancy and
retrieval (a streaming "task", the FPGA form; fine on CPUs, under-occupies a GPU at small
batch x heads); any head_dim / gate_dim / block_size; the budget is the compile-time K_MAX
of a private selection buffer (cost O(budget) per admitted block). The host backend has no
fused relevancy+retrieval (the shim has no GEMM: its gate softmax runs as torch ops on
zero-copy views), so relevancy and retrieval run as two ops there.

The threshold is applied to float32 probabilities after rounding it to float32 once, on
every backend, so retrievals from equal probabilities are identical everywhere (set and
order).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends import opencl
from ..runtime import Run, Step
from . import seer_reference as ref
from .base import Method, weight_matrices
from .page_sparse import (DeviceLengths, PageSparseAttention, SharesApply, _capacity, _check_append, _check_kv,
                          _check_lengths, _check_query, _grown_capacity, _nbytes, _nonnegative_int, _positive_int,
                          _round_up, kv_example_inputs, kv_work, storage_bytes, store_kv)

KERNEL_FILE = "seer.cl"
WEIGHT_NAMES = ("w_q", "w_k")


@dataclass(eq=False)
class SeerMemory(DeviceLengths):
    """Prepared memory of one batch of sequences. `gate_keys` [B, H, blocks, gate_dim] and
    `w_q` sit on the relevancy device; `tail` [B, H, 2, D] (float32 running max and sum of
    each sequence's partial last block) and `w_k` on the prepare device; `k_cache`/`v_cache`
    [B, H, tokens, D] on the apply device; `lengths` (host, int64) counts valid tokens."""

    batch: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    lengths: np.ndarray
    gate_keys: object
    k_cache: object
    v_cache: object
    w_q: object
    w_k: object
    tail: object
    placement: object = None
    max_length: int = 0
    _lengths_on: dict = field(default_factory=dict, repr=False)

    @property
    def token_capacity(self) -> int:
        return int(self.k_cache.shape[2])

    @property
    def block_capacity(self) -> int:
        return int(self.gate_keys.shape[2])

    @property
    def nbytes(self) -> dict[str, int]:
        """Bytes held per part of the memory."""
        return {"gate_keys": _nbytes(self.gate_keys) + _nbytes(self.w_q),
                "tail": _nbytes(self.tail) + _nbytes(self.w_k),
                "kv_cache": _nbytes(self.k_cache) + _nbytes(self.v_cache)}

    def __repr__(self) -> str:
        return (f"SeerMemory(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, lengths={self.lengths.tolist()}, capacity={self.token_capacity})")


class SeerAttention(Method):
    """SeerAttention-R style block gating for one decode token.

    Args:
        block_size: tokens per block (64).
        budget_tokens: tokens attended per sequence and KV head at most, rounded up to whole
            blocks (default 2048).
        budget_blocks: the budget in blocks instead (give one of the two). Top-k mode selects
            exactly min(budget, blocks); threshold mode at most the budget.
        threshold: None for top-k mode, else a gate probability in (0, 1): every block at or
            above it is selected (most probable first, up to the budget).
        sink_blocks: leading blocks always kept (attention sinks).
        local_blocks: trailing (most recent) blocks always kept; the query token's own block
            is the last one.
        gate_dim: dimension of the gate query / keys (128).
        weights: {"w_q": [gate_dim, head_dim], "w_k": [gate_dim, 2 * head_dim]} (torch
            tensors or arrays; w_k acts on [max-pool | mean-pool]), shared by all KV heads;
            or None: drawn from a normal distribution with `seed`, scaled by 1/sqrt(fan_in),
            once head_dim is known (at prepare). Nothing is downloaded.
        seed: seed of the drawn weights.
        scale: attention softmax scale; default 1/sqrt(head_dim).
    """

    name = "SeerAttention"
    memory_type = SeerMemory
    # What a backend must implement to run each step. Memory upkeep runs where the memory
    # lives: gate keys on the relevancy device, the KV cache on the apply device.
    needs = {
        Step.PREPARE: ("pool_project",),
        Step.RELEVANCY: ("relevancy", "empty_gate_keys", "grow_gate_keys", "store_gate_keys"),
        Step.RETRIEVAL: ("retrieval",),
        Step.APPLY: ("sparse_attention", "empty_cache", "grow_cache", "store_tokens"),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}
    TOKEN_AXES = (2, 2)  # keys, values [B, H, S, D]

    def __init__(self, block_size: int = 64, budget_tokens: int | None = None, budget_blocks: int | None = None,
                 threshold: float | None = None, sink_blocks: int = 1, local_blocks: int = 2, gate_dim: int = 128,
                 weights: dict | None = None, seed: int = 0, scale: float | None = None):
        super().__init__()
        self.block_size = _positive_int("block_size", block_size)
        if budget_tokens is not None and budget_blocks is not None:
            raise ValueError("give budget_tokens or budget_blocks, not both")
        if budget_blocks is None:
            tokens = 2048 if budget_tokens is None else _positive_int("budget_tokens", budget_tokens)
            budget_blocks = -(-tokens // self.block_size)
            # named in errors as the caller gave it
            self._budget_arg = "budget_tokens" if budget_tokens is not None else "budget_tokens (default 2048)"
            self._budget_given = tokens
        else:
            self._budget_arg = "budget_blocks"
            self._budget_given = budget_blocks
        self.budget_blocks = _positive_int("budget_blocks", budget_blocks)
        self.sink_blocks = _nonnegative_int("sink_blocks", sink_blocks)
        self.local_blocks = _nonnegative_int("local_blocks", local_blocks)
        if self.sink_blocks + self.local_blocks > self.budget_blocks:
            raise ValueError(f"sink_blocks + local_blocks ({self.sink_blocks} + {self.local_blocks}) must not exceed "
                             f"the budget of {self.budget_blocks} blocks")
        if threshold is not None:
            if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                    or not 0.0 < float(threshold) < 1.0):  # NaN fails the comparison too
                raise ValueError(f"threshold must be a gate probability in (0, 1) (exclusive) or None for top-k, "
                                 f"got {threshold!r}")
            if self.sink_blocks + self.local_blocks == 0:
                raise ValueError("threshold mode needs sink_blocks + local_blocks >= 1: a row whose blocks all fall "
                                 "below the threshold would attend to nothing")
            threshold = float(threshold)
        self.threshold = threshold
        self.gate_dim = _positive_int("gate_dim", gate_dim)
        self.seed = _nonnegative_int("seed", seed)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        self.scale = scale
        self._weights = self._check_weights(weights) if weights is not None else None
        self._drawn: dict[int, dict] = {}  # head_dim -> seeded weights
        # apply and KV upkeep: page-sparse's block-sparse attention with pages of one block
        self.attention = PageSparseAttention(page_size=self.block_size, budget_pages=self.budget_blocks,
                                             sink_pages=self.sink_blocks, local_pages=self.local_blocks, scale=scale)
        self.implementations = {"torch": TorchSeer(self), "opencl": OpenCLSeer(self), "host": HostSeer(self)}

    def __repr__(self) -> str:
        return (f"SeerAttention(block_size={self.block_size}, budget_blocks={self.budget_blocks}, "
                f"threshold={self.threshold}, sink_blocks={self.sink_blocks}, local_blocks={self.local_blocks}, "
                f"gate_dim={self.gate_dim}, scale={self.scale})")

    @property
    def threshold32(self) -> float | None:
        """The threshold as every backend applies it: rounded to float32 once."""
        return None if self.threshold is None else float(np.float32(self.threshold))

    # --- weights ------------------------------------------------------------------------

    def _check_weights(self, weights) -> dict:
        out = weight_matrices(weights, WEIGHT_NAMES)
        dim = out["w_q"].shape[1]
        if out["w_q"].shape[0] != self.gate_dim or dim == 0:
            raise ValueError(f"weights['w_q'] must be [gate_dim, head_dim] = [{self.gate_dim}, head_dim], "
                             f"got {list(out['w_q'].shape)}")
        if tuple(out["w_k"].shape) != (self.gate_dim, 2 * dim):
            raise ValueError(f"weights['w_k'] must be [gate_dim, 2 * head_dim] = [{self.gate_dim}, {2 * dim}] "
                             f"(it projects [max-pool | mean-pool] of the keys), got {list(out['w_k'].shape)}")
        return out

    def weights(self, head_dim: int) -> dict:
        """The gate projections for keys of `head_dim` features: {"w_q", "w_k"}, float32 CPU."""
        if self._weights is not None:
            have = int(self._weights["w_q"].shape[1])
            if have != head_dim:
                raise ValueError(f"weights['w_q'] is [{self.gate_dim}, {have}] and weights['w_k'] "
                                 f"[{self.gate_dim}, {2 * have}] (head_dim {have}), but the keys have head_dim "
                                 f"{head_dim}")
            return self._weights
        drawn = self._drawn.get(head_dim)
        if drawn is None:
            gen = torch.Generator().manual_seed(self.seed)
            w_q = torch.randn(self.gate_dim, head_dim, generator=gen) / math.sqrt(head_dim)
            w_k = torch.randn(self.gate_dim, 2 * head_dim, generator=gen) / math.sqrt(2 * head_dim)
            drawn = self._drawn[head_dim] = {"w_q": w_q, "w_k": w_k}
        return drawn

    def _check_budget(self, n_blocks: int, longest: int) -> None:
        """Top-k mode selects exactly `budget_blocks`: a budget above the longest sequence's
        blocks is an error (threshold mode takes the budget as a cap only)."""
        if self.threshold is None and self.budget_blocks > n_blocks:
            raise ValueError(
                f"{self._budget_arg} ({self._budget_given}, {self.budget_blocks} blocks of {self.block_size} tokens) "
                f"is above the context: the longest sequence has {longest} tokens ({n_blocks} blocks); give a "
                f"smaller budget, or a threshold")

    # --- cost ---------------------------------------------------------------------------

    SHAPES = dict(PageSparseAttention.SHAPES)

    def shapes(self, **given) -> dict:
        """Shapes for the cost model, defaults filled in: batch, kv_heads, q_heads, head_dim,
        context (tokens per sequence), dtype (storage), layers (each with its own memory)."""
        out = PageSparseAttention.shapes(self, **given)
        self._check_budget(-(-out["context"] // self.block_size), out["context"])
        return out

    def _context_for(self, tokens: int) -> int:
        """A context at least the top-k budget (a memory shorter than that cannot step yet)."""
        if self.threshold is None:
            tokens = max(tokens, self.budget_blocks * self.block_size)
        return max(tokens, 1)

    def shapes_of(self, memory: SeerMemory, query=None) -> dict:
        """The cost-model shapes of a prepared memory (and the query's heads, when given)."""
        q_heads = query.shape[1] if query is not None else memory.kv_heads
        return self.shapes(batch=memory.batch, kv_heads=memory.kv_heads, q_heads=q_heads, head_dim=memory.head_dim,
                           context=self._context_for(memory.max_length),
                           dtype=str(memory.dtype).removeprefix("torch."))

    def input_shapes(self, keys, values=None, lengths=None, capacity=None) -> dict:
        """The cost-model shapes `prepare(keys, values, ...)` will build (q_heads unknown: one
        query head per KV head unless the caller says otherwise)."""
        shapes = PageSparseAttention.input_shapes(self, keys, values, lengths, capacity)
        shapes["context"] = self._context_for(shapes["context"])
        return shapes

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """The tasks of one call: `appended` new tokens per sequence (1 for a decode step,
        the context for prepare), then, with `query`, relevancy -> retrieval -> apply.
        `backends` maps each step to the backend running it (launch counts and storage
        differ); `fused`: relevancy and retrieval run as one fused operation."""
        from ..cost.model import Access, Task, Workload, safe_log2

        s = self.shapes(**shapes)
        b, h, hq, d, ctx = s["batch"], s["kv_heads"], s["q_heads"], s["head_dim"], s["context"]
        blk, layers, gd = self.block_size, s["layers"], self.gate_dim
        blocks = -(-ctx // blk)
        k = min(self.budget_blocks, blocks)

        def elt(step):
            return storage_bytes(s["dtype"], backends[step])

        gate = b * h * blocks * gd * elt(Step.RELEVANCY)
        kvw = kv_work(s, backends, appended, k * blk, "block_ids")
        w_q, w_k, tail = gd * d * 4, gd * 2 * d * 4, b * h * 2 * d * 4
        query_bytes, ids_bytes = kvw.reads["query"], b * h * k * 4
        scores = b * h * blocks * 4
        tasks: list[Task] = []

        def launches(step, per_backend):  # kernels (torch ops, shim calls) each operation issues, counted in the code below
            return per_backend[backends[step]]

        if allocate:
            tasks += [Task(Step.RELEVANCY, "empty_gate_keys", 0, "float32", "stream",
                           (Access("gate_keys", gate, gate * layers),), launches=1), *kvw.allocate]
        if appended:
            new = kvw.reads["new_keys"]
            local = -(-(appended + blk - 1) // blk)  # blocks the new tokens can touch
            delta = b * h * local * gd * elt(Step.PREPARE)
            pool_flops = 2 * b * h * appended * d + 2 * b * h * local * gd * 2 * d
            tasks += [
                Task(Step.PREPARE, "pool_project", pool_flops, "float32", "stream",
                     (Access("new_keys", new + delta + 2 * tail, new + delta + 2 * tail), Access("w_k", w_k, w_k)),
                     ("new_keys",), (("delta", delta),),
                     launches(Step.PREPARE, {"torch": 1 + 16 * b, "host": 1 + 16 * b, "opencl": 2})),
                Task(Step.RELEVANCY, "store_gate_keys", 0, "float32", "stream",
                     (Access("gate_keys", 2 * delta * elt(Step.RELEVANCY) / elt(Step.PREPARE), gate * layers),),
                     ("delta",), (), launches(Step.RELEVANCY, {"torch": b, "host": b, "opencl": 1})), *kvw.store]
        if query:
            # group mean + gate query projection + logits + softmax
            gate_flops = b * hq * d + 2 * b * h * gd * d + 2 * b * h * blocks * gd + 5 * b * h * blocks
            query_read = Access("query", query_bytes, query_bytes)
            w_q_read = Access("w_q", w_q, w_q)
            select_flops = b * h * blocks * safe_log2(k)
            if fused:  # OpenCL: the gate keys are read twice (softmax statistics, then probabilities)
                passes = 2 if backends[Step.RELEVANCY] == "opencl" else 1
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", 2 * gate_flops + select_flops, "float32",
                                  "scan", (Access("gate_keys", passes * gate, gate * layers), query_read, w_q_read,
                                           Access("block_ids", ids_bytes, ids_bytes)),
                                  ("query", "lengths"), (("block_ids", ids_bytes),),
                                  launches(Step.RELEVANCY, {"torch": 1, "host": 1, "opencl": 1})))
            else:
                passes = 2 if backends[Step.RELEVANCY] == "opencl" else 1
                tasks.append(Task(Step.RELEVANCY, "relevancy", passes * gate_flops, "float32", "scan",
                                  (Access("gate_keys", passes * gate, gate * layers), query_read, w_q_read,
                                   Access("scores", scores, scores)),
                                  ("query", "lengths"), (("scores", scores),),
                                  launches(Step.RELEVANCY, {"torch": 12, "host": 12, "opencl": 1})))
                topk_mode = self.threshold is None
                passes = {"torch": 6 if topk_mode else 10, "host": 3 if topk_mode else 6,
                          "opencl": 1}[backends[Step.RETRIEVAL]]
                tasks.append(Task(Step.RETRIEVAL, "retrieval", select_flops, "float32", "select",
                                  (Access("scores", passes * scores + ids_bytes, scores),),
                                  ("scores", "lengths"), (("block_ids", ids_bytes),),
                                  launches(Step.RETRIEVAL, {"torch": 25 if topk_mode else 36,
                                                            "host": 10 if topk_mode else 16, "opencl": 1})))
            tasks.append(kvw.apply)
        resident = {Step.PREPARE: {"tail": tail * layers, "w_k": w_k * layers},
                    Step.RELEVANCY: {"gate_keys": gate * layers, "w_q": w_q * layers},
                    Step.APPLY: {"kv_cache": kvw.resident}}
        return Workload(tasks, kvw.inputs(b, bool(appended), query), ("output",) if query else (), resident, layers)

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """Synthetic inputs at `shapes` (see `shapes()`; the context is the cache length):
        ((keys, values), query) in `shapes['dtype']`, with a planted needle token (`synthetic_cache`)."""
        return kv_example_inputs(self.shapes(**(shapes or {})), seed)

    def reference_step(self, inputs, query):
        """(selected block ids [B, H, width] int64, output [B, Hq, D] float64) of
        `prepare(*inputs)` then `step(query)`, by the numpy float64 reference."""
        keys, values = inputs[:2]
        keys, values, query = (t.detach().cpu().double().numpy() for t in (keys, values, query))
        weights = self.weights(keys.shape[-1])
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(keys.shape[-1])
        ids, out, _, _ = ref.step(keys, values, query, [keys.shape[2]] * keys.shape[0], self.block_size,
                                  self.budget_blocks, self.sink_blocks, self.local_blocks, self.threshold32,
                                  weights["w_q"].double().numpy(), weights["w_k"].double().numpy(), scale)
        return ids, out

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, keys, values, lengths=None, capacity: int | None = None) -> SeerMemory:
        """Build the memory from keys/values [B, H, S, D]; `lengths` [B] gives each
        sequence's valid tokens (default S); `capacity` reserves room for appends."""
        batch, heads, seq, dim = _check_kv(keys, values)
        lengths = _check_lengths(lengths, batch, seq)
        weights = self.weights(dim)
        tokens = _round_up(_capacity(capacity, lengths), self.block_size)
        tail = torch.zeros(batch, heads, 2, dim)
        tail[:, :, 0] = -math.inf  # no partial block yet: the identities of max and sum
        memory = SeerMemory(
            batch, heads, dim, keys.dtype, np.zeros(batch, dtype=np.int64),
            gate_keys=run.run(Step.RELEVANCY, "empty_gate_keys", (batch, heads, tokens // self.block_size,
                                                                   self.gate_dim), keys.dtype, label="prepare"),
            k_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, tokens, dim), keys.dtype, label="prepare"),
            v_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, tokens, dim), keys.dtype, label="prepare"),
            w_q=run.to(run.device(Step.RELEVANCY), weights["w_q"], "w_q"),
            w_k=run.to(run.device(Step.PREPARE), weights["w_k"], "w_k"),
            tail=run.to(run.device(Step.PREPARE), tail, "tail"))
        self._write(run, memory, keys, values, memory.gate_keys, memory.k_cache, memory.v_cache, lengths)
        return memory

    def append(self, run: Run, memory: SeerMemory, keys, values) -> SeerMemory:
        """Extend every sequence by keys/values [B, H, n, D]: the blocks the new tokens touch
        get new gate keys (in place). Everything is checked before anything changes."""
        n = _check_append(memory, keys, values, run.validate)
        if n == 0:
            return memory
        gate_keys, k_cache, v_cache = memory.gate_keys, memory.k_cache, memory.v_cache
        tokens = _grown_capacity(memory, n, self.block_size)
        if tokens:  # grow into new arrays; the old ones stay valid until the end
            gate_keys = run.run(Step.RELEVANCY, "grow_gate_keys", gate_keys, tokens // self.block_size,
                                label="prepare")
            k_cache = run.run(Step.APPLY, "grow_cache", k_cache, tokens, label="prepare")
            v_cache = run.run(Step.APPLY, "grow_cache", v_cache, tokens, label="prepare")
        self._write(run, memory, keys, values, gate_keys, k_cache, v_cache, np.full(memory.batch, n, dtype=np.int64))
        return memory

    def _write(self, run, memory, keys, values, gate_keys, k_cache, v_cache, count):
        blk = self.block_size
        n_local = int(((memory.lengths % blk + count + blk - 1) // blk).max())
        # per-sequence offsets travel as tuples: host metadata, never moved as device values
        start, counts = tuple(memory.lengths.tolist()), tuple(count.tolist())
        delta = run.run(Step.PREPARE, "pool_project", keys, memory.tail, memory.w_k, start, counts, n_local)
        run.run(Step.RELEVANCY, "store_gate_keys", gate_keys, delta, start, counts, memory.head_dim, label="prepare")
        memory.gate_keys = gate_keys
        store_kv(run, memory, keys, values, k_cache, v_cache, start, counts)

    def step(self, run: Run, query, memory: SeerMemory):
        """One decode token's query [B, Hq, D] -> attention output [B, Hq, D] on its device."""
        _check_query(query, memory, scan_values=run.validate)
        n_blocks = -(-memory.max_length // self.block_size)
        self._check_budget(n_blocks, memory.max_length)
        k = min(self.budget_blocks, n_blocks)
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(memory.head_dim)
        threshold = self.threshold32
        if run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            block_ids = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.gate_keys, memory.w_q, query,
                                memory.lengths_for(run, Step.RELEVANCY), n_blocks, k, self.sink_blocks,
                                self.local_blocks, threshold, label="relevancy+retrieval")
        else:
            probs = run.run(Step.RELEVANCY, "relevancy", memory.gate_keys, memory.w_q, query,
                            memory.lengths_for(run, Step.RELEVANCY), n_blocks)
            block_ids = run.run(Step.RETRIEVAL, "retrieval", probs, memory.lengths_for(run, Step.RETRIEVAL), k,
                                self.sink_blocks, self.local_blocks, threshold,
                                (memory.head_dim, memory.dtype == torch.float16))
        run.record.artifacts["selected"] = block_ids  # kept by reference: free unless read
        out = run.run(Step.APPLY, "sparse_attention", memory.k_cache, memory.v_cache, query, block_ids,
                      memory.lengths_for(run, Step.APPLY), scale)
        out = run.to_torch(out, query.device)
        return out if out.dtype == query.dtype else out.to(query.dtype)


def _gate_scale(gate_dim: int) -> float:
    """1/sqrt(gate_dim) in float32, folded into the gate query on every backend."""
    return float(np.float32(1.0 / math.sqrt(gate_dim)))


def _blocks_of(lengths, block_size: int):
    return (lengths.long() + block_size - 1) // block_size


# --- torch ----------------------------------------------------------------------------

class TorchSeer(SharesApply):
    """All four steps with torch ops, on CPU or GPU; the KV cache and apply are page-sparse's."""

    def __init__(self, method: SeerAttention):
        super().__init__(method, "torch")
        self.block_size = method.block_size

    # gate keys: zero-filled, capacity-padded like the KV cache
    def empty_gate_keys(self, dev, shape, dtype):
        return self.attention.empty_cache(dev, shape, dtype)

    def grow_gate_keys(self, dev, gate_keys, blocks):
        return self.attention.grow_cache(dev, gate_keys, blocks)

    def pool_project(self, dev, keys, tail, w_k, start, count, n_local):
        """Gate keys of the blocks the new tokens of each sequence touch (local block j of
        sequence b is absolute block start[b] // block + j): [max | mean] over each block's
        tokens, the earlier ones of a partial first block coming from the running stats
        `tail` [B, H, 2, D] (max, sum), which are updated in place."""
        batch, heads = keys.shape[:2]
        blk = self.block_size
        delta = torch.zeros((batch, heads, n_local, w_k.shape[0]), dtype=keys.dtype, device=keys.device)
        for b in range(batch):
            s, n = int(start[b]), int(count[b])
            if n == 0:
                continue
            x = keys[b, :, :n].float()  # [H, n, D]
            off = s % blk
            head = min(n, blk - off) if off else 0  # tokens completing a partial first block
            maxes, sums, counts = [], [], []
            if head:
                maxes.append(torch.maximum(tail[b, :, 0], x[:, :head].amax(1))[:, None])
                sums.append((tail[b, :, 1] + x[:, :head].sum(1))[:, None])
                counts.append(off + head)
            full = (n - head) // blk
            if full:
                blocks = x[:, head: head + full * blk].unflatten(1, (full, blk))
                maxes.append(blocks.amax(2))
                sums.append(blocks.sum(2))
                counts += [blk] * full
            rest = n - head - full * blk
            if rest:
                maxes.append(x[:, n - rest:].amax(1, keepdim=True))
                sums.append(x[:, n - rest:].sum(1, keepdim=True))
                counts.append(rest)
            mx, sm = torch.cat(maxes, 1), torch.cat(sums, 1)  # [H, used, D]
            counts_t = torch.tensor(counts, dtype=torch.float32, device=x.device)[:, None]
            pooled = torch.cat([mx, sm / counts_t], -1)  # [H, used, 2D]
            delta[b, :, : len(counts)] = pooled @ w_k.T
            if (s + n) % blk:  # the new partial last block's running stats
                tail[b, :, 0], tail[b, :, 1] = mx[:, -1], sm[:, -1]
            else:
                tail[b, :, 0], tail[b, :, 1] = -math.inf, 0.0
        return delta

    def store_gate_keys(self, dev, gate_keys, delta, start, count, head_dim=None):
        blk = self.block_size
        for b in range(gate_keys.shape[0]):
            s, n = int(start[b]), int(count[b])
            if n == 0:
                continue
            first = s // blk
            used = min((s % blk + n + blk - 1) // blk, gate_keys.shape[2] - first, delta.shape[2])
            gate_keys[b, :, first: first + used] = delta[b, :, :used]

    def relevancy(self, dev, gate_keys, w_q, query, lengths, n_blocks):
        """Gate probabilities [B, H, n_blocks] (float32): the gate query (mean of the group's
        query heads through w_q, scaled) against every block's gate key in one batched
        matmul, softmax over each row's blocks; -inf past a sequence's blocks."""
        batch, heads, _, gate_dim = gate_keys.shape
        q = query.float().reshape(batch, heads, -1, query.shape[-1]).mean(2)  # [B, H, D]
        q_gate = (q @ w_q.T) * _gate_scale(gate_dim)  # [B, H, G]
        keys = gate_keys[:, :, :n_blocks]
        logits = torch.matmul(keys.float(), q_gate.unsqueeze(-1)).squeeze(-1)  # [B, H, n]
        valid = (torch.arange(n_blocks, device=logits.device) < _blocks_of(lengths, self.block_size)[:, None])[:, None]
        probs = torch.softmax(logits.masked_fill(~valid, -math.inf), -1)
        return probs.masked_fill_(~valid, -math.inf)

    def retrieval(self, dev, probs, lengths, k, sink_blocks, local_blocks, threshold=None, shape=None):
        """Top-k mode: page-sparse's retrieval (same rule). Threshold mode: non-forced blocks
        below the threshold masked to -inf, the same top-k, then the -inf picks dropped and
        the rest compacted (ascending, -1 padded)."""
        if threshold is None:
            return self.attention.retrieval(dev, probs, lengths, k, sink_blocks, local_blocks)
        n = probs.shape[-1]
        n_blocks = _blocks_of(lengths, self.block_size)[:, None, None]
        block = torch.arange(n, device=probs.device)
        forced = ((block < sink_blocks) | (block >= n_blocks - local_blocks)) & (block < n_blocks)
        masked = probs.masked_fill((probs < threshold) & ~forced, -math.inf)
        ids = self.attention.retrieval(dev, masked, lengths, k, sink_blocks, local_blocks)
        picked = masked.gather(-1, ids.long().clamp(min=0))
        keep = (ids >= 0) & (picked > -math.inf)
        key = torch.where(keep, ids, n).sort(-1).values
        return torch.where(key == n, -1, key).to(torch.int32)


# --- OpenCL ---------------------------------------------------------------------------

class OpenCLSeer(SharesApply):
    """Steps as OpenCL kernels (fpga_kernels/seer.cl), with the fused relevancy+retrieval
    used when both share a device; the KV cache and apply are page-sparse's kernels.
    Storage is half for float16 keys, float otherwise; compute is float32."""

    def __init__(self, method: SeerAttention):
        super().__init__(method, "opencl")

    def _program(self, dev, head_dim: int, half: bool):
        from . import _seer_cl as kernels

        m = self.method
        defines = kernels.defines(head_dim, m.gate_dim, m.block_size, m.budget_blocks, half)
        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, defines), kernels

    def empty_gate_keys(self, dev, shape, dtype):
        return self.attention.empty_cache(dev, shape, dtype)

    def grow_gate_keys(self, dev, gate_keys, blocks):
        return self.attention.grow_cache(dev, gate_keys, blocks)

    def pool_project(self, dev, keys, tail, w_k, start, count, n_local):
        q, prg, kernels = self._program(dev, keys.shape[-1], keys.dtype == np.float16)
        return kernels.pool_project(q, prg, keys, tail, w_k, _ints(q, start), _ints(q, count), n_local)

    def store_gate_keys(self, dev, gate_keys, delta, start, count, head_dim):
        # head_dim names the compiled configuration (on an FPGA one binary holds every kernel)
        q, prg, kernels = self._program(dev, head_dim, gate_keys.dtype == np.float16)
        if delta.dtype != gate_keys.dtype:
            delta = _as(q, delta, gate_keys.dtype)
        return None, kernels.store_gate_keys(q, prg, gate_keys, delta, _ints(q, start), _ints(q, count))

    def relevancy(self, dev, gate_keys, w_q, query, lengths, n_blocks):
        q, prg, kernels = self._program(dev, w_q.shape[1], gate_keys.dtype == np.float16)
        return kernels.relevancy(q, prg, gate_keys, w_q, _as(q, query, np.float32), lengths, n_blocks)

    def retrieval(self, dev, probs, lengths, k, sink_blocks, local_blocks, threshold=None, shape=(1, False)):
        q, prg, kernels = self._program(dev, shape[0], shape[1])
        return kernels.retrieval(q, prg, _as(q, probs, np.float32), lengths, k, sink_blocks, local_blocks, threshold)

    def relevancy_retrieval(self, dev, gate_keys, w_q, query, lengths, n_blocks, k, sink_blocks, local_blocks,
                            threshold=None):
        q, prg, kernels = self._program(dev, w_q.shape[1], gate_keys.dtype == np.float16)
        return kernels.relevancy_retrieval(q, prg, gate_keys, w_q, _as(q, query, np.float32), lengths, n_blocks, k,
                                           sink_blocks, local_blocks, threshold)


def _ints(queue, values) -> "opencl.cla.Array":
    return opencl.cla.to_device(queue, np.ascontiguousarray(values, dtype=np.int32))


def _as(queue, array, dtype):
    """`array` in `dtype`; other dtypes are converted through the host."""
    if array.dtype == dtype:
        return array
    return opencl.cla.to_device(queue, array.get().astype(dtype))


# --- host (C++ shim) ------------------------------------------------------------------

class HostSeer(SharesApply):
    """The CPU through the C++ shim: retrieval's top-k (`topk`), apply's block gather and
    the append scatter run in the shim (page-sparse's host implementation); pooling,
    projection and the gate softmax run as torch ops on zero-copy views of the same host
    arrays (the shim has no GEMM)."""

    def __init__(self, method: SeerAttention):
        super().__init__(method, "host")
        self.block_size = method.block_size
        self.torch = TorchSeer(method)

    def empty_gate_keys(self, dev, shape, dtype):
        return self.attention.empty_cache(dev, shape, dtype)

    def grow_gate_keys(self, dev, gate_keys, blocks):
        return self.attention.grow_cache(dev, gate_keys, blocks)

    def pool_project(self, dev, keys, tail, w_k, start, count, n_local):
        return self.torch.pool_project(None, torch.from_numpy(keys), torch.from_numpy(tail), torch.from_numpy(w_k),
                                       start, count, n_local).numpy()

    def store_gate_keys(self, dev, gate_keys, delta, start, count, head_dim=None):
        self.torch.store_gate_keys(None, torch.from_numpy(gate_keys), torch.from_numpy(delta), start, count)

    def relevancy(self, dev, gate_keys, w_q, query, lengths, n_blocks):
        return self.torch.relevancy(None, torch.from_numpy(gate_keys), torch.from_numpy(w_q), torch.from_numpy(query),
                                    torch.from_numpy(lengths), n_blocks).numpy()

    def retrieval(self, dev, probs, lengths, k, sink_blocks, local_blocks, threshold=None, shape=None):
        """Top-k: page-sparse's host retrieval (the shim's top-k, ties -> lower index).
        Threshold: non-forced blocks below it masked to -inf first, then the -inf picks
        dropped and the rest compacted."""
        probs = np.ascontiguousarray(probs, dtype=np.float32)
        if threshold is None:
            return self.attention.retrieval(dev, probs, lengths, k, sink_blocks, local_blocks)
        n = probs.shape[-1]
        n_blocks = (np.asarray(lengths, dtype=np.int64) + self.block_size - 1) // self.block_size
        block = np.arange(n)
        forced = ((block < sink_blocks) | (block >= (n_blocks - local_blocks)[:, None])) & (block < n_blocks[:, None])
        masked = np.where((probs < np.float32(threshold)) & ~forced[:, None, :], np.float32(-np.inf), probs)
        ids = self.attention.retrieval(dev, masked, lengths, k, sink_blocks, local_blocks)
        picked = np.take_along_axis(masked, np.maximum(ids, 0).astype(np.int64), -1)
        key = np.sort(np.where((ids >= 0) & (picked > -np.inf), ids, n), axis=-1)
        return np.where(key == n, -1, key).astype(np.int32)
