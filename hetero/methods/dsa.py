"""DeepSeek Sparse Attention's lightning indexer (DSA), token-level sparse attention.

    prepare    per token, the index key k_s = RoPE(W_k h_s) (one per token, shared by all
               index heads); and for the query token (the sequence's last), its index
               queries q_j = RoPE(W_q h_t)_j and weights w_j = (W_w h_t)_j / sqrt(H_I d_I)
    relevancy  I(t, s) = sum_j w_j * ReLU(q_j . k_s) over the index heads j, for s <= t
    retrieval  the top_k tokens per sequence, equal scores to the lower index
    apply      exact attention of the query over only the selected tokens' K/V

Memory: the index keys (float32, capacity-padded) and the query token's index queries live
on the relevancy device; the projection weights on the prepare device; the KV cache on the
apply device. Apply and the KV-cache upkeep are page-sparse's with pages of one token (the
same code on every backend). The query token is the last stored one: append a token's K/V
and hidden state, then `step` with its attention query, as a decoder does. The math of every
step is `dsa_reference`; the implementations below are tested against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import host, opencl
from ..runtime import Run, Step
from . import dsa_reference as ref
from .base import Method, weight_matrices
from .page_sparse import (PageSparseAttention, PageSparseMemory, SharesApply, _capacity, _check_append, _check_kv,
                          _check_lengths, _check_query, _check_tensor, _grown_capacity, _nonnegative_int,
                          _positive_int, kv_example_inputs, kv_work, storage_bytes, store_kv)
from .page_sparse_reference import sparse_attention as reference_attention

WEIGHT_NAMES = ("w_k", "w_q", "w_w")


@dataclass(eq=False)
class DSAMemory(PageSparseMemory):
    """Prepared memory of one batch of sequences. `summary` holds the index keys
    [B, 1, capacity, index_dim] (float32) on the relevancy device, `index_query` the last
    token's index queries and weights packed [B, index_heads, index_dim + 1] there too;
    `weights` (W_k^T, packed [W_q | W_w]^T) sit on the prepare device; `k_cache`/`v_cache`
    [B, H, capacity, D] on the apply device."""

    hidden_dim: int = 0
    index_query: object = None
    weights: tuple = ()

    @property
    def nbytes(self) -> dict[str, int]:
        from .page_sparse import _nbytes

        return {"index_keys": _nbytes(self.summary), "kv_cache": _nbytes(self.k_cache) + _nbytes(self.v_cache)}

    def __repr__(self) -> str:
        return (f"DSAMemory(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"hidden_dim={self.hidden_dim}, dtype={self.dtype}, lengths={self.lengths.tolist()}, "
                f"capacity={self.token_capacity})")


class DSAIndexer(Method):
    """DSA's lightning indexer with token-level top-k sparse attention, for one decode token.

    Args:
        index_heads: index heads H_I (DeepSeek-V3.2: 64).
        index_dim: index head dimension d_I (128).
        rope_dim: leading features of each index key and query that get rotary position
            embedding; default half of index_dim (64 of 128, as DeepSeek-V3.2); 0 turns
            RoPE off. Even, at most index_dim.
        top_k: tokens attended per sequence (2048).
        weights: {"w_k": [index_dim, hidden], "w_q": [index_heads * index_dim, hidden],
            "w_w": [index_heads, hidden]} (torch tensors or arrays), or None: drawn from a
            normal distribution with `seed`, scaled by 1/sqrt(hidden), once the hidden size
            is known (at prepare). Nothing is downloaded.
        seed: seed of the drawn weights.
        scale: attention softmax scale; default 1/sqrt(head_dim).
    """

    name = "DSAIndexer"
    memory_type = DSAMemory
    needs = {
        Step.PREPARE: ("project_keys", "project_query"),
        Step.RELEVANCY: ("relevancy", "empty_cache", "grow_cache", "store_tokens"),
        Step.RETRIEVAL: ("retrieval",),
        Step.APPLY: ("sparse_attention", "empty_cache", "grow_cache", "store_tokens"),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}
    TOKEN_AXES = (2, 2, 1)  # keys, values [B, H, S, D], hidden [B, S, hidden]

    def __init__(self, index_heads: int = 64, index_dim: int = 128, rope_dim: int | None = None, top_k: int = 2048,
                 weights: dict | None = None, seed: int = 0, scale: float | None = None):
        super().__init__()
        self.index_heads = _positive_int("index_heads", index_heads)
        self.index_dim = _positive_int("index_dim", index_dim)
        self.rope_dim = _nonnegative_int("rope_dim", index_dim // 4 * 2 if rope_dim is None else rope_dim)
        if self.rope_dim % 2 or self.rope_dim > self.index_dim:
            raise ValueError(f"rope_dim must be even and at most index_dim ({self.index_dim}), got {rope_dim!r}")
        self.top_k = _positive_int("top_k", top_k)
        self.seed = _nonnegative_int("seed", seed)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        self.scale = scale
        self._weights = self._check_weights(weights) if weights is not None else None
        self._drawn: dict[int, dict] = {}  # hidden size -> seeded weights
        # apply and KV upkeep: page-sparse with one-token pages, every selected token kept
        self.attention = PageSparseAttention(page_size=1, budget_pages=self.top_k, sink_pages=0, local_pages=0,
                                             scale=scale)
        self.implementations = {"torch": TorchDSA(self), "opencl": OpenCLDSA(self), "host": HostDSA(self)}

    def __repr__(self) -> str:
        return (f"DSAIndexer(index_heads={self.index_heads}, index_dim={self.index_dim}, rope_dim={self.rope_dim}, "
                f"top_k={self.top_k}, scale={self.scale})")

    # --- weights ------------------------------------------------------------------------

    def _check_weights(self, weights) -> dict:
        out = weight_matrices(weights, WEIGHT_NAMES)
        hidden = out["w_k"].shape[1]
        expected = {"w_k": (self.index_dim, hidden), "w_q": (self.index_heads * self.index_dim, hidden),
                    "w_w": (self.index_heads, hidden)}
        for name, shape in expected.items():
            if tuple(out[name].shape) != shape:
                raise ValueError(f"weights[{name!r}] must be {list(shape)} ([rows, hidden] for index_heads="
                                 f"{self.index_heads}, index_dim={self.index_dim}, hidden={hidden}), "
                                 f"got {list(out[name].shape)}")
        return out

    def weights(self, hidden_dim: int) -> dict:
        """The projection weights for hidden states of `hidden_dim` features (float32, CPU)."""
        if self._weights is not None:
            have = self._weights["w_k"].shape[1]
            if have != hidden_dim:
                raise ValueError(f"hidden has {hidden_dim} features but the given weights expect {have}")
            return self._weights
        if hidden_dim not in self._drawn:
            gen = torch.Generator().manual_seed(self.seed)
            rows = {"w_k": self.index_dim, "w_q": self.index_heads * self.index_dim, "w_w": self.index_heads}
            self._drawn[hidden_dim] = {n: torch.randn(r, hidden_dim, generator=gen) / math.sqrt(hidden_dim)
                                       for n, r in rows.items()}
        return self._drawn[hidden_dim]

    def _packed_weights(self, hidden_dim: int):
        """(W_k^T [hidden, d_I], W_qw^T [hidden, H_I * (d_I + 1)]): per index head its d_I query
        rows then its weight row, the weight pre-scaled by 1/sqrt(H_I d_I), so one projection
        gives the packed index queries."""
        w = self.weights(hidden_dim)
        hi, di = self.index_heads, self.index_dim
        w_q = w["w_q"].view(hi, di, hidden_dim)
        w_w = (w["w_w"] / math.sqrt(hi * di)).view(hi, 1, hidden_dim)
        return w["w_k"].t().contiguous(), torch.cat([w_q, w_w], 1).reshape(hi * (di + 1), hidden_dim).t().contiguous()

    # --- cost ---------------------------------------------------------------------------

    SHAPES = {"batch": 1, "kv_heads": 8, "q_heads": 32, "head_dim": 128, "hidden": 1024, "context": 32768,
              "dtype": "float16", "layers": 1}

    def shapes(self, **given) -> dict:
        """Shapes for the cost model, defaults filled in: batch, kv_heads, q_heads, head_dim,
        hidden (features of a hidden state), context, dtype (KV storage), layers."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, **given}
        base = {k: v for k, v in out.items() if k != "hidden"}
        self.attention.shapes(**base)  # the shared checks
        _positive_int("shapes['hidden']", out["hidden"])
        if self.top_k > out["context"]:
            raise ValueError(f"top_k ({self.top_k}) is above the context ({out['context']} tokens); "
                             f"give a smaller top_k or a longer context")
        return out

    def shapes_of(self, memory: DSAMemory, query=None) -> dict:
        q_heads = query.shape[1] if query is not None else memory.kv_heads
        return self.shapes(batch=memory.batch, kv_heads=memory.kv_heads, q_heads=q_heads, head_dim=memory.head_dim,
                           hidden=memory.hidden_dim, context=max(memory.max_length, self.top_k),
                           dtype=str(memory.dtype).removeprefix("torch."))

    def input_shapes(self, keys, values=None, hidden=None, lengths=None, capacity=None) -> dict:
        shapes = self.attention.input_shapes(keys)
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            shapes["hidden"] = hidden.shape[-1]
        shapes["context"] = max(shapes["context"], self.top_k)
        return shapes

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """The tasks of one call (see PageSparseAttention.workload): `appended` new tokens per
        sequence projected and stored, then with `query` relevancy -> retrieval -> apply.
        The relevancy GEMM is [context x d_I] x [d_I x H_I] per sequence: compute-bound on a
        CPU (64 FLOP per byte of index key), memory-bound on an FPGA's or GPU's HBM."""
        from ..cost.model import Access, Task, Workload, safe_log2

        s = self.shapes(**shapes)
        b, h, ctx, hid = s["batch"], s["kv_heads"], s["context"], s["hidden"]
        hi, di, layers = self.index_heads, self.index_dim, s["layers"]
        k = min(self.top_k, ctx)
        in_size = storage_bytes(s["dtype"], "torch")
        index = b * ctx * di * 4
        packed = b * hi * (di + 1) * 4
        ids_bytes = b * h * k * 4
        kvw = kv_work(s, backends, appended, k, "ids")
        weights = 4 * hid * (di + hi * (di + 1))
        tasks: list[Task] = []

        def launches(step, per_backend):
            return per_backend[backends[step]]

        if allocate:
            tasks += [Task(Step.RELEVANCY, "empty_cache", 0, "float32", "stream",
                           (Access("index_keys", index, index * layers),), launches=1), *kvw.allocate]
        if appended:
            new_hidden = b * appended * hid * in_size
            new_index = b * appended * di * 4
            tasks += [
                Task(Step.PREPARE, "project_keys", 2 * b * appended * hid * di, "float32", "stream",
                     (Access("hidden", new_hidden, new_hidden), Access("weights", 4 * hid * di, weights),
                      Access("new_index", new_index, new_index)), ("hidden",), (("new_index", new_index),),
                     launches(Step.PREPARE, {"torch": 4, "host": 4, "opencl": 2})),
                Task(Step.PREPARE, "project_query", 2 * b * hid * hi * (di + 1), "float32", "stream",
                     (Access("weights", weights - 4 * hid * di, weights),), ("hidden",), (("index_query", packed),),
                     launches(Step.PREPARE, {"torch": 4, "host": 4, "opencl": 2})),
                Task(Step.RELEVANCY, "store_tokens", 0, "float32", "stream",
                     (Access("index_keys", 2 * new_index, index * layers),), ("new_index",),
                     launches=launches(Step.RELEVANCY, {"torch": b, "host": 1, "opencl": 1})), *kvw.store]
        if query:
            scan_flops = 2 * b * ctx * hi * (di + 1)
            keys_read = Access("index_keys", index, index * layers)
            query_read = Access("index_query", packed, packed)
            scores = b * ctx * 4
            if fused:
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", scan_flops + b * ctx * 4, "float32", "scan",
                                  (keys_read, query_read, Access("scores", 5 * scores, scores),
                                   Access("ids", ids_bytes, ids_bytes)),
                                  ("index_query", "lengths"), (("ids", ids_bytes),),
                                  launches(Step.RELEVANCY, {"opencl": 2})))
            else:
                tasks.append(Task(Step.RELEVANCY, "relevancy", scan_flops, "float32", "scan",
                                  (keys_read, query_read, Access("scores", scores, scores)),
                                  ("index_query", "lengths"), (("scores", scores),),
                                  launches(Step.RELEVANCY, {"torch": 6, "host": 6, "opencl": 1})))
                passes = {"torch": 6, "host": 3, "opencl": 4}[backends[Step.RETRIEVAL]]
                tasks.append(Task(Step.RETRIEVAL, "retrieval", b * ctx * safe_log2(k), "float32", "select",
                                  (Access("scores", passes * scores + ids_bytes, scores),),
                                  ("scores", "lengths"), (("ids", ids_bytes),),
                                  launches(Step.RETRIEVAL, {"torch": 12, "host": 6, "opencl": 1})))
            tasks.append(kvw.apply)
        inputs = kvw.inputs(b, bool(appended), query)
        if appended:
            inputs["hidden"] = b * appended * hid * in_size
        resident = {Step.PREPARE: {"weights": weights}, Step.RELEVANCY: {"index_keys": index * layers},
                    Step.APPLY: {"kv_cache": kvw.resident}}
        return Workload(tasks, inputs, ("output",) if query else (), resident, layers)

    # --- inputs and reference -------------------------------------------------------------

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """Synthetic ((keys, values, hidden), query) at `shapes`: random K/V and query
        (page_sparse.synthetic_cache) and random hidden states."""
        s = self.shapes(**(shapes or {}))
        (keys, values), query = kv_example_inputs(s, seed)
        hidden = torch.randn(s["batch"], s["context"], s["hidden"], generator=torch.Generator().manual_seed(seed + 1))
        return (keys, values, hidden.to(getattr(torch, s["dtype"]))), query

    def reference_step(self, inputs, query):
        """(selected token ids [B, H, width], output [B, Hq, D]) from `dsa_reference`, in float64."""
        keys, values, hidden = (x.float().cpu().numpy() for x in inputs[:3])
        batch, heads, seq, dim = keys.shape
        lengths = [seq] * batch
        w = self.weights(hidden.shape[-1])
        index = ref.index_keys(hidden, w["w_k"].numpy(), self.rope_dim)
        q, weights = ref.index_query(hidden[:, -1], [seq - 1] * batch, w["w_q"].numpy(), w["w_w"].numpy(),
                                     self.index_heads, self.rope_dim)
        ids = ref.retrieval(ref.relevancy(index, q, weights, lengths), lengths, self.top_k)
        ids = np.repeat(ids[:, None, :], heads, 1)
        scale = self.scale or 1 / math.sqrt(dim)
        out = reference_attention(keys, values, query.float().cpu().numpy(), ids, lengths, 1, scale)
        return ids, out

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, keys, values, hidden, lengths=None, capacity: int | None = None) -> DSAMemory:
        """Build the memory from keys/values [B, H, S, D] and the tokens' hidden states
        [B, S, hidden]; `lengths` [B] gives each sequence's valid tokens (default S; the
        last valid token is the query token); `capacity` reserves room for appends."""
        batch, heads, seq, dim = _check_kv(keys, values)
        _check_hidden(hidden, keys)
        lengths = _check_lengths(lengths, batch, seq)
        capacity = _capacity(capacity, lengths)
        hidden_dim = hidden.shape[-1]
        w_k, w_qw = self._packed_weights(hidden_dim)
        prep = run.device(Step.PREPARE)
        memory = DSAMemory(
            batch, heads, dim, keys.dtype, np.zeros(batch, dtype=np.int64),
            summary=run.run(Step.RELEVANCY, "empty_cache", (batch, 1, capacity, self.index_dim), torch.float32,
                            label="prepare"),
            k_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, capacity, dim), keys.dtype, label="prepare"),
            v_cache=run.run(Step.APPLY, "empty_cache", (batch, heads, capacity, dim), keys.dtype, label="prepare"),
            hidden_dim=hidden_dim, weights=(run.to(prep, w_k, "W_k"), run.to(prep, w_qw, "W_q|W_w")))
        self._write(run, memory, keys, values, hidden, memory.summary, memory.k_cache, memory.v_cache, lengths)
        return memory

    def append(self, run: Run, memory: DSAMemory, keys, values, hidden) -> DSAMemory:
        """Extend every sequence by keys/values [B, H, n, D] and hidden states [B, n, hidden];
        the last new token becomes the query token. Everything is checked before anything
        changes."""
        n = _check_append(memory, keys, values, run.validate)
        _check_hidden(hidden, keys, scan_values=run.validate)
        if hidden.shape[-1] != memory.hidden_dim:
            raise ValueError(f"hidden must have {memory.hidden_dim} features like the memory's, got {hidden.shape[-1]}")
        if n == 0:
            return memory
        index, k_cache, v_cache = memory.summary, memory.k_cache, memory.v_cache
        tokens = _grown_capacity(memory, n, 1)
        if tokens:  # grow into new arrays; the old ones stay valid until the end
            index = run.run(Step.RELEVANCY, "grow_cache", index, tokens, label="prepare")
            k_cache = run.run(Step.APPLY, "grow_cache", k_cache, tokens, label="prepare")
            v_cache = run.run(Step.APPLY, "grow_cache", v_cache, tokens, label="prepare")
        self._write(run, memory, keys, values, hidden, index, k_cache, v_cache, np.full(memory.batch, n, dtype=np.int64))
        return memory

    def _write(self, run, memory, keys, values, hidden, index, k_cache, v_cache, count):
        start, counts = tuple(memory.lengths.tolist()), tuple(count.tolist())
        last = torch.as_tensor(count - 1, device=hidden.device)
        hidden_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].contiguous()
        positions = tuple((memory.lengths + count - 1).tolist())
        w_k, w_qw = memory.weights
        new_index = run.run(Step.PREPARE, "project_keys", hidden, w_k, start, self.rope_dim)
        index_query = run.run(Step.PREPARE, "project_query", hidden_last, w_qw, positions, self.index_heads,
                              self.rope_dim)
        run.run(Step.RELEVANCY, "store_tokens", index, new_index, start, counts, label="prepare")
        memory.summary = index
        memory.index_query = run.to(run.device(Step.RELEVANCY), index_query, "index query")
        store_kv(run, memory, keys, values, k_cache, v_cache, start, counts)

    def step(self, run: Run, query, memory: DSAMemory):
        """The query token's attention query [B, Hq, D] -> attention output [B, Hq, D] on its device."""
        _check_query(query, memory, scan_values=run.validate)
        if self.top_k > memory.max_length:
            raise ValueError(f"top_k ({self.top_k}) is above the context ({memory.max_length} tokens): every token "
                             f"would be selected; give a smaller top_k or use dense attention")
        n = memory.max_length
        k = self.top_k
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(memory.head_dim)
        if run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            ids = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.summary, memory.index_query,
                          memory.lengths_for(run, Step.RELEVANCY), n, k, memory.kv_heads,
                          label="relevancy+retrieval")
        else:
            scores = run.run(Step.RELEVANCY, "relevancy", memory.summary, memory.index_query,
                             memory.lengths_for(run, Step.RELEVANCY), n)
            ids = run.run(Step.RETRIEVAL, "retrieval", scores, memory.lengths_for(run, Step.RETRIEVAL), k,
                          memory.kv_heads)
        run.record.artifacts["selected"] = ids
        out = run.run(Step.APPLY, "sparse_attention", memory.k_cache, memory.v_cache, query, ids,
                      memory.lengths_for(run, Step.APPLY), scale)
        out = run.to_torch(out, query.device)
        return out if out.dtype == query.dtype else out.to(query.dtype)


def _check_hidden(hidden, keys, scan_values: bool = True) -> None:
    from .page_sparse import _check_finite

    _check_tensor("hidden", hidden, 3, "[batch, seq, hidden_dim]")
    if hidden.shape[:2] != (keys.shape[0], keys.shape[2]) or hidden.shape[2] == 0:
        raise ValueError(f"hidden must be [{keys.shape[0]}, {keys.shape[2]}, hidden_dim] (batch and tokens of the "
                         f"keys), got {list(hidden.shape)}")
    if hidden.device != keys.device:
        raise ValueError(f"hidden is on {hidden.device} but keys on {keys.device}; put them on one device")
    if scan_values:
        _check_finite("hidden", hidden)


# --- torch ----------------------------------------------------------------------------

# Relevancy runs over the context in chunks of this many tokens, so the [chunk, H_I]
# intermediate stays in cache instead of a context-sized buffer going through DRAM.
SCORE_CHUNK = 8192


def rope_(x: torch.Tensor, positions: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """In place: rotary embedding on the first rope_dim features of x [..., rope_dim+] at
    `positions` (broadcast against x[..., 0]); see dsa_reference.rope."""
    if rope_dim == 0:
        return x
    half = rope_dim // 2
    freq = ref.ROPE_BASE ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angle = positions.to(torch.float64)[..., None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    a, b = x[..., :half].clone(), x[..., half:rope_dim].clone()
    x[..., :half] = a * cos - b * sin
    x[..., half:rope_dim] = b * cos + a * sin
    return x


class TorchDSA(SharesApply):
    """All four steps with torch ops, on CPU or GPU; apply is page-sparse's with one-token pages."""

    def __init__(self, method: DSAIndexer):
        super().__init__(method, "torch")

    def project_keys(self, dev, hidden, w_k, start, rope_dim):
        """Index keys of the new tokens, [B, 1, n, d_I] float32, roped at start[b] + i."""
        keys = torch.matmul(hidden.float(), w_k)
        pos = torch.as_tensor(start, device=keys.device)[:, None] + torch.arange(keys.shape[1], device=keys.device)
        return rope_(keys, pos, rope_dim)[:, None]

    def project_query(self, dev, hidden_last, w_qw, positions, index_heads, rope_dim):
        """Packed [B, H_I, d_I + 1]: the roped index queries, then each head's weight."""
        packed = torch.matmul(hidden_last.float(), w_qw).view(hidden_last.shape[0], index_heads, -1)
        pos = torch.as_tensor(positions, device=packed.device)[:, None]
        rope_(packed[..., :-1], pos, rope_dim)
        return packed

    def relevancy(self, dev, index_keys, index_query, lengths, n):
        """I = ReLU(K Q^T) w per sequence: one GEMM per chunk of tokens, then ReLU and a GEMV."""
        batch = index_keys.shape[0]
        qt = index_query[..., :-1].transpose(1, 2).contiguous()  # [B, d_I, H_I]
        w = index_query[..., -1:].contiguous()  # [B, H_I, 1]
        scores = torch.empty(batch, n, dtype=torch.float32, device=index_keys.device)
        chunk = SCORE_CHUNK if index_keys.device.type == "cpu" else n
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            scores[:, s:e] = torch.bmm(torch.bmm(index_keys[:, 0, s:e], qt).relu_(), w)[..., 0]
        valid = torch.arange(n, device=scores.device) < lengths.long()[:, None]
        return scores.masked_fill_(~valid, -math.inf)

    def retrieval(self, dev, scores, lengths, k, kv_heads):
        """Exactly min(k, n) per row: every score above the k-th largest and the lowest-index
        ones equal to it; tokens past a sequence's end become -1. Ids per KV head (a view)."""
        batch, n = scores.shape
        k = min(k, n)
        kth = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        above = scores > kth
        tied = scores == kth
        take_tied = tied & (torch.cumsum(tied, -1, dtype=torch.int32) <= k - above.sum(-1, keepdim=True))
        ids = (above | take_tied).nonzero()[:, 1].view(batch, k)  # row-major: ascending
        ids = torch.where(ids < lengths.long()[:, None], ids, -1).to(torch.int32)
        return ids[:, None, :].expand(batch, kv_heads, k).contiguous()


# --- host (C++ shim) --------------------------------------------------------------------

class HostDSA(SharesApply):
    """The CPU through the C++ shim: its top-k selects the tokens and its page gather (one-
    token pages) feeds apply; the projections and the relevancy GEMM are torch ops on
    zero-copy views of the same host arrays."""

    def __init__(self, method: DSAIndexer):
        super().__init__(method, "host")
        self.torch = TorchDSA(method)

    def project_keys(self, dev, hidden, w_k, start, rope_dim):
        return self.torch.project_keys(dev, torch.from_numpy(hidden), torch.from_numpy(w_k), start, rope_dim).numpy()

    def project_query(self, dev, hidden_last, w_qw, positions, index_heads, rope_dim):
        return self.torch.project_query(dev, torch.from_numpy(hidden_last), torch.from_numpy(w_qw), positions,
                                        index_heads, rope_dim).numpy()

    def relevancy(self, dev, index_keys, index_query, lengths, n):
        return self.torch.relevancy(dev, torch.from_numpy(index_keys), torch.from_numpy(index_query),
                                    torch.from_numpy(lengths), n).numpy()

    def retrieval(self, dev, scores, lengths, k, kv_heads):
        """The shim's top-k per row (equal scores to the lower index), then ascending with
        tokens past a sequence's end as -1 padding."""
        batch, n = scores.shape
        k = min(k, n)
        ids = np.sort(host._host.topk(np.ascontiguousarray(scores, np.float32), k)[1], axis=-1)
        ids = np.where(ids < lengths[:, None], ids, -1).astype(np.int32)
        return np.repeat(ids[:, None, :], kv_heads, 1)


# --- OpenCL ---------------------------------------------------------------------------

class OpenCLDSA(SharesApply):
    """Steps as OpenCL kernels (fpga_kernels/dsa.cl): a projection + RoPE kernel for
    prepare, a register-tiled relevancy kernel, an exact radix-select top-k, and their
    fusion; apply and the caches are page-sparse's kernels with one-token pages."""

    def __init__(self, method: DSAIndexer):
        super().__init__(method, "opencl")

    def _program(self, dev):
        from . import _dsa_cl as kernels

        m = self.method
        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, kernels.defines(m.index_heads, m.index_dim)), kernels

    def project_keys(self, dev, hidden, w_k, start, rope_dim):
        q, prg, kernels = self._program(dev)
        return kernels.project_keys(q, prg, _f32(hidden), w_k, start, rope_dim)

    def project_query(self, dev, hidden_last, w_qw, positions, index_heads, rope_dim):
        q, prg, kernels = self._program(dev)
        return kernels.project_query(q, prg, _f32(hidden_last), w_qw, positions, index_heads, rope_dim)

    def relevancy(self, dev, index_keys, index_query, lengths, n):
        q, prg, kernels = self._program(dev)
        return kernels.relevancy(q, prg, index_keys, index_query, lengths, n)

    def retrieval(self, dev, scores, lengths, k, kv_heads):
        q, prg, kernels = self._program(dev)
        return kernels.retrieval(q, prg, scores, lengths, k, kv_heads)

    def relevancy_retrieval(self, dev, index_keys, index_query, lengths, n, k, kv_heads):
        q, prg, kernels = self._program(dev)
        return kernels.relevancy_retrieval(q, prg, index_keys, index_query, lengths, n, k, kv_heads)


def _f32(array):
    if array.dtype == np.float32:
        return array
    return opencl.cla.to_device(array.queue, array.get().astype(np.float32))
