"""Memory-as-Context (HMT / Titans-style memory bank): long context as a bank of segment
embeddings, read by attention and prepended to the next segment.

    prepare    per memory entry (one per processed segment), the key k_j = W_k m_j; the
               entries m_j themselves are the values
    relevancy  scores_j = (W_q mean(next segment)) . k_j / sqrt(key_dim)
    retrieval  the softmax-weighted sum of the entries (default), or of the top-k ones
    apply      that vector prepended to the next segment's input embeddings: [B, L + 1, dim]

Memory: keys on the relevancy device, entries on the retrieval device (the readout reads
them), both capacity-padded caches kept by page-sparse's cache ops; W_k on the prepare
device, W_q on the relevancy device. A sequence may have no entries yet (its first
segment): its readout is zeros. The math of every step is `mac_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..backends import opencl
from ..runtime import Run, Step
from . import mac_reference as ref
from .base import Method, weight_matrices
from .page_sparse import (DeviceLengths, PageSparseAttention, SharesApply, _capacity, _check_finite, _check_tensor,
                          _grown_capacity, _nbytes, _nonnegative_int, _positive_int)

WEIGHT_NAMES = ("w_q", "w_k")


@dataclass(eq=False)
class MACMemory(DeviceLengths):
    """Memory banks of a batch of sequences: `keys` [B, 1, capacity, key_dim] (relevancy
    device), `values` [B, 1, capacity, dim] (retrieval device), `lengths` entries per
    sequence (host), the projections W_k^T (prepare device) and W_q^T (relevancy device)."""

    batch: int
    dim: int
    key_dim: int
    lengths: np.ndarray
    keys: object
    values: object
    w_k: object
    w_q: object
    placement: object = None
    max_length: int = 0
    _lengths_on: dict = field(default_factory=dict, repr=False)

    @property
    def token_capacity(self) -> int:
        return int(self.keys.shape[2])

    @property
    def nbytes(self) -> dict[str, int]:
        return {"keys": _nbytes(self.keys), "values": _nbytes(self.values)}

    def __repr__(self) -> str:
        return (f"MACMemory(batch={self.batch}, dim={self.dim}, key_dim={self.key_dim}, "
                f"lengths={self.lengths.tolist()}, capacity={self.token_capacity})")


class MemoryAsContext(Method):
    """A memory bank of segment embeddings read by the next segment (HMT-style).

    Args:
        key_dim: dimension of the keys and of the projected query (default 128).
        top_k: 0 (default) reads every entry (softmax-weighted sum); k > 0 reads only the
            k highest-scoring entries (equal scores to the lower index).
        weights: {"w_q": [key_dim, dim], "w_k": [key_dim, dim]} (tensors or arrays), or None:
            drawn with `seed`, scaled by 1/sqrt(dim), once dim is known (at prepare).
        seed: seed of the drawn weights.
        scale: score scale; default 1/sqrt(key_dim).
    """

    name = "MemoryAsContext"
    family = "memory"
    CONTEXT_SHAPE = "entries"
    memory_type = MACMemory
    needs = {
        Step.PREPARE: ("project_keys",),
        Step.RELEVANCY: ("relevancy", "empty_cache", "grow_cache", "store_tokens"),
        Step.RETRIEVAL: ("retrieval", "empty_cache", "grow_cache", "store_tokens"),
        Step.APPLY: ("prepend",),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}
    TOKEN_AXES = (1,)  # segments [B, S, dim]: one entry per processed segment

    def __init__(self, key_dim: int = 128, top_k: int = 0, weights: dict | None = None, seed: int = 0,
                 scale: float | None = None):
        super().__init__()
        self.key_dim = _positive_int("key_dim", key_dim)
        self.top_k = _nonnegative_int("top_k", top_k)
        self.seed = _nonnegative_int("seed", seed)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        self.scale = scale if scale is not None else 1 / math.sqrt(self.key_dim)
        self._weights = self._check_weights(weights) if weights is not None else None
        self._drawn: dict[int, dict] = {}
        # the caches: page-sparse's cache ops, one "head" per sequence
        self.attention = PageSparseAttention(page_size=1, budget_pages=1, sink_pages=0, local_pages=0)
        self.implementations = {"torch": TorchMAC(self), "opencl": OpenCLMAC(self), "host": HostMAC(self)}

    def __repr__(self) -> str:
        return f"MemoryAsContext(key_dim={self.key_dim}, top_k={self.top_k}, scale={self.scale:.4g})"

    def _check_weights(self, weights) -> dict:
        out = weight_matrices(weights, WEIGHT_NAMES)
        for name, w in out.items():
            if w.shape[0] != self.key_dim:
                raise ValueError(f"weights[{name!r}] must be a float [key_dim={self.key_dim}, dim] matrix, "
                                 f"got {w.dtype} {list(w.shape)}")
        if out["w_q"].shape != out["w_k"].shape:
            raise ValueError(f"weights['w_q'] {list(out['w_q'].shape)} and weights['w_k'] {list(out['w_k'].shape)} "
                             f"must have the same shape")
        return out

    def weights(self, dim: int) -> dict:
        """The projections for embeddings of `dim` features (float32, CPU)."""
        if self._weights is not None:
            if self._weights["w_k"].shape[1] != dim:
                raise ValueError(f"embeddings have {dim} features but the given weights expect "
                                 f"{self._weights['w_k'].shape[1]}")
            return self._weights
        if dim not in self._drawn:
            gen = torch.Generator().manual_seed(self.seed)
            self._drawn[dim] = {n: torch.randn(self.key_dim, dim, generator=gen) / math.sqrt(dim) for n in WEIGHT_NAMES}
        return self._drawn[dim]

    # --- cost ---------------------------------------------------------------------------

    SHAPES = {"batch": 1, "entries": 4096, "dim": 1024, "segment": 512, "layers": 1}

    def shapes(self, **given) -> dict:
        """Shapes for the cost model: batch, entries (memory bank size), dim (embedding
        features), segment (embeddings in the next segment), layers."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, **given}
        for key in ("batch", "dim", "segment", "layers"):
            _positive_int(f"shapes[{key!r}]", out[key])
        _nonnegative_int("shapes['entries']", out["entries"])
        return out

    def shapes_of(self, memory: MACMemory, query=None) -> dict:
        return self.shapes(batch=memory.batch, entries=memory.max_length, dim=memory.dim,
                           segment=query.shape[1] if query is not None else self.SHAPES["segment"])

    def input_shapes(self, segments, lengths=None, capacity=None) -> dict:
        _check_tensor("segments", segments, 3, "[batch, entries, dim]")
        return dict(batch=segments.shape[0], entries=segments.shape[1], dim=segments.shape[2])

    def describe_call(self, call: str, args, result):
        from ..backends import torch_backend

        if call == "prepare":
            memory, query, appended, allocate, given = result, None, result.max_length, True, args[0]
        elif call == "append":
            memory, query, appended, allocate, given = args[0], None, int(args[1].shape[1]), False, args[1]
        else:
            memory, query, appended, allocate, given = args[1], args[0], 0, False, args[0]
        return memory, query, appended, allocate, torch_backend.id_of(given.device)

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """Tasks of one call: `appended` entries projected and stored, then with `query` the
        readout of the next segment."""
        from ..cost.model import Access, Task, Workload

        s = self.shapes(**shapes)
        b, n, d, seg, layers, kd = s["batch"], max(s["entries"], 1), s["dim"], s["segment"], s["layers"], self.key_dim
        keys, values = b * n * kd * 4, b * n * d * 4
        segment_bytes, out_bytes, readout = b * seg * d * 4, b * (seg + 1) * d * 4, b * d * 4
        tasks: list[Task] = []
        if allocate:
            tasks += [Task(Step.RELEVANCY, "empty_cache", 0, "float32", "stream", (Access("keys", keys, keys * layers),)),
                      Task(Step.RETRIEVAL, "empty_cache", 0, "float32", "stream",
                           (Access("values", values, values * layers),))]
        if appended:
            new_k, new_v = b * appended * kd * 4, b * appended * d * 4
            tasks += [Task(Step.PREPARE, "project_keys", 2 * b * appended * d * kd, "float32", "stream",
                           (Access("new_entries", new_v, new_v), Access("w_k", kd * d * 4, kd * d * 4),
                            Access("new_keys", new_k, new_k)), ("new_entries",), (("new_keys", new_k),)),
                      Task(Step.RELEVANCY, "store_tokens", 0, "float32", "stream",
                           (Access("keys", 2 * new_k, keys * layers),), ("new_keys",)),
                      Task(Step.RETRIEVAL, "store_tokens", 0, "float32", "stream",
                           (Access("values", 2 * new_v, values * layers),), ("new_entries",))]
        if query:
            score_flops = b * seg * d + 2 * b * d * kd + 2 * b * n * kd
            read_flops = 4 * b * n * d
            scores = b * n * 4
            seg_read = Access("segment", segment_bytes, segment_bytes)
            if fused:
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", score_flops + read_flops, "float32", "scan",
                                  (Access("keys", keys, keys * layers), Access("values", values, values * layers),
                                   seg_read, Access("readout", readout, readout)),
                                  ("segment", "lengths"), (("readout", readout),),
                                  {"opencl": 4 + (2 if self.top_k else 0)}[backends[Step.RELEVANCY]]))
            else:
                tasks.append(Task(Step.RELEVANCY, "relevancy", score_flops, "float32", "scan",
                                  (Access("keys", keys, keys * layers), seg_read, Access("scores", scores, scores)),
                                  ("segment", "lengths"), (("scores", scores),),
                                  {"torch": 6, "host": 6, "opencl": 3}[backends[Step.RELEVANCY]]))
                tasks.append(Task(Step.RETRIEVAL, "retrieval", read_flops, "float32", "scan",
                                  (Access("scores", 3 * scores, scores), Access("values", values, values * layers),
                                   Access("readout", readout, readout)),
                                  ("scores", "lengths"), (("readout", readout),),
                                  {"torch": 6, "host": 6, "opencl": 1 + (1 if self.top_k else 0)}[
                                      backends[Step.RETRIEVAL]]))
            tasks.append(Task(Step.APPLY, "prepend", 0, "float32", "stream",
                              (Access("output", segment_bytes + out_bytes, out_bytes),),
                              ("segment", "readout"), (("output", out_bytes),), 2))
        inputs = {"lengths": b * 4}
        if appended:
            inputs["new_entries"] = b * appended * d * 4
        if query:
            inputs["segment"] = segment_bytes
        resident = {Step.PREPARE: {"w_k": kd * d * 4}, Step.RELEVANCY: {"keys": keys * layers, "w_q": kd * d * 4},
                    Step.RETRIEVAL: {"values": values * layers}}
        return Workload(tasks, inputs, ("output",) if query else (), resident, layers)

    # --- inputs and reference -------------------------------------------------------------

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """((segments [B, entries, dim],), next segment [B, segment, dim]): random embeddings."""
        s = self.shapes(**(shapes or {}))
        gen = torch.Generator().manual_seed(seed)
        memory = torch.randn(s["batch"], s["entries"], s["dim"], generator=gen)
        return (memory,), torch.randn(s["batch"], s["segment"], s["dim"], generator=gen)

    def reference_step(self, inputs, query):
        """(the entries read [B, 1, n] (every valid one, or the top-k), the output [B, L + 1, dim])."""
        memory = inputs[0].double().numpy()
        lengths = [memory.shape[1]] * memory.shape[0]
        w = self.weights(memory.shape[2])
        scores = ref.relevancy(ref.memory_keys(memory, w["w_k"].numpy()), query.double().numpy(), w["w_q"].numpy(),
                               lengths, self.scale)
        n = memory.shape[1]
        width = self.top_k if 0 < self.top_k < n else n
        read = np.array([sorted(sorted(range(n), key=lambda j: (-row[j], j))[:width]) for row in scores])[:, None]
        return read, ref.prepend(ref.retrieval(scores, memory, lengths, self.top_k), query.double().numpy())

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, segments, lengths=None, capacity: int | None = None) -> MACMemory:
        """Build the memory banks from segment embeddings [B, S, dim] (S may be 0: no
        segment processed yet); `lengths` [B] gives each sequence's entries (default S)."""
        _check_segments("segments", segments, allow_empty=True)
        batch, seq, dim = segments.shape
        if lengths is None:
            lengths = np.full(batch, seq, dtype=np.int64)
        else:
            lengths = np.asarray(lengths.cpu() if isinstance(lengths, torch.Tensor) else lengths)
            if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer) or (lengths < 0).any() \
                    or (lengths > seq).any():
                raise ValueError(f"lengths must be {batch} integers in [0, {seq}], got {lengths.tolist()!r}")
            lengths = lengths.astype(np.int64)
        w = self.weights(dim)
        cap = _capacity(capacity, np.maximum(lengths, 1))
        memory = MACMemory(
            batch, dim, self.key_dim, np.zeros(batch, dtype=np.int64),
            keys=run.run(Step.RELEVANCY, "empty_cache", (batch, 1, cap, self.key_dim), torch.float32, label="prepare"),
            values=run.run(Step.RETRIEVAL, "empty_cache", (batch, 1, cap, dim), torch.float32, label="prepare"),
            w_k=run.to(run.device(Step.PREPARE), w["w_k"].t().contiguous(), "W_k"),
            w_q=run.to(run.device(Step.RELEVANCY), w["w_q"].t().contiguous(), "W_q"))
        if seq:
            self._write(run, memory, segments, memory.keys, memory.values, lengths)
        return memory

    def append(self, run: Run, memory: MACMemory, segments) -> MACMemory:
        """Add one entry per sequence for each of segments [B, n, dim] (a processed segment's
        embedding). Everything is checked before anything changes."""
        _check_segments("segments", segments, allow_empty=True, scan=run.validate)
        if segments.shape[0] != memory.batch or segments.shape[2] != memory.dim:
            raise ValueError(f"segments must be [{memory.batch}, n, {memory.dim}] like the memory, "
                             f"got {list(segments.shape)}")
        n = segments.shape[1]
        if n == 0:
            return memory
        keys, values = memory.keys, memory.values
        tokens = _grown_capacity(memory, n, 1)
        if tokens:
            keys = run.run(Step.RELEVANCY, "grow_cache", keys, tokens, label="prepare")
            values = run.run(Step.RETRIEVAL, "grow_cache", values, tokens, label="prepare")
        self._write(run, memory, segments, keys, values, np.full(memory.batch, n, dtype=np.int64))
        return memory

    def _write(self, run, memory, segments, keys, values, count):
        start, counts = tuple(memory.lengths.tolist()), tuple(count.tolist())
        entries = segments.float()
        new_keys = run.run(Step.PREPARE, "project_keys", entries, memory.w_k)
        run.run(Step.RELEVANCY, "store_tokens", keys, new_keys, start, counts, label="prepare")
        run.run(Step.RETRIEVAL, "store_tokens", values, entries[:, None], start, counts, label="prepare")
        memory.keys, memory.values = keys, values
        memory.lengths = memory.lengths + count
        memory.max_length = int(memory.lengths.max())
        memory._lengths_on.clear()

    def step(self, run: Run, query, memory: MACMemory):
        """The next segment's input embeddings [B, L, dim] -> [B, L + 1, dim]: the memory's
        readout first."""
        _check_segments("query", query, scan=run.validate)
        if query.shape[0] != memory.batch or query.shape[2] != memory.dim:
            raise ValueError(f"query must be [{memory.batch}, segment length, {memory.dim}] like the memory, "
                             f"got {list(query.shape)}")
        n = memory.max_length
        if n == 0:  # no entry anywhere yet: nothing to read
            readout = torch.zeros(memory.batch, memory.dim, device=query.device)
        elif run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            readout = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.keys, memory.values, memory.w_q,
                              query.float(), memory.lengths_for(run, Step.RELEVANCY), n, self.scale, self.top_k,
                              label="relevancy+retrieval")
        else:
            scores = run.run(Step.RELEVANCY, "relevancy", memory.keys, memory.w_q, query.float(),
                             memory.lengths_for(run, Step.RELEVANCY), n, self.scale)
            run.record.artifacts["scores"] = scores
            readout = run.run(Step.RETRIEVAL, "retrieval", scores, memory.values, memory.lengths_for(run, Step.RETRIEVAL),
                              self.top_k)
        out = run.run(Step.APPLY, "prepend", readout, query)
        out = run.to_torch(out, query.device)
        return out if out.dtype == query.dtype else out.to(query.dtype)


def _check_segments(name: str, value, allow_empty: bool = False, scan: bool = True) -> None:
    _check_tensor(name, value, 3, "[batch, n, dim]")
    if value.shape[0] == 0 or value.shape[2] == 0 or (value.shape[1] == 0 and not allow_empty):
        raise ValueError(f"{name} must have batch, {'n, ' if not allow_empty else ''}dim >= 1, "
                         f"got {list(value.shape)}")
    if scan:
        _check_finite(name, value)


# --- torch ----------------------------------------------------------------------------

class TorchMAC(SharesApply):
    """All four steps with torch ops, on CPU or GPU."""

    def __init__(self, method: MemoryAsContext):
        super().__init__(method, "torch")

    def project_keys(self, dev, entries, w_k):
        return torch.matmul(entries.float(), w_k)[:, None]

    def relevancy(self, dev, keys, w_q, segment, lengths, n, scale):
        q = torch.matmul(segment.float().mean(1), w_q)  # [B, key_dim]
        scores = torch.bmm(keys[:, 0, :n], q[:, :, None])[..., 0] * scale
        valid = torch.arange(n, device=scores.device) < lengths.long()[:, None]
        return scores.masked_fill_(~valid, -math.inf)

    def retrieval(self, dev, scores, values, lengths, k):
        """Softmax over the valid entries (or the top k: exactly k, the lowest index among
        equal scores), then the weighted sum of their values; zeros for an empty row."""
        batch, n = scores.shape
        if 0 < k < n:
            kth = torch.topk(scores, k, dim=-1, sorted=False).values.amin(-1, keepdim=True)
            above, tied = scores > kth, scores == kth
            keep = above | (tied & (torch.cumsum(tied, -1) <= k - above.sum(-1, keepdim=True)))
            scores = scores.masked_fill(~keep, -math.inf)
        weights = torch.softmax(scores, -1).nan_to_num_(0.0)  # an all -inf (empty) row reads nothing
        return torch.bmm(weights[:, None], values[:, 0, :n])[:, 0]

    def prepend(self, dev, readout, segment):
        return torch.cat([readout[:, None].to(segment.dtype), segment], 1)


class HostMAC(SharesApply):
    """The CPU: torch ops on zero-copy views of the host arrays (the shim has no GEMM)."""

    def __init__(self, method: MemoryAsContext):
        super().__init__(method, "host")
        self.torch = TorchMAC(method)

    def project_keys(self, dev, entries, w_k):
        return self.torch.project_keys(dev, torch.from_numpy(entries), torch.from_numpy(w_k)).numpy()

    def relevancy(self, dev, keys, w_q, segment, lengths, n, scale):
        return self.torch.relevancy(dev, torch.from_numpy(keys), torch.from_numpy(w_q), torch.from_numpy(segment),
                                    torch.from_numpy(lengths), n, scale).numpy()

    def retrieval(self, dev, scores, values, lengths, k):
        return self.torch.retrieval(dev, torch.from_numpy(scores), torch.from_numpy(values),
                                    torch.from_numpy(lengths), k).numpy()

    def prepend(self, dev, readout, segment):
        return np.concatenate([readout[:, None].astype(segment.dtype), segment], 1)


class OpenCLMAC(SharesApply):
    """Relevancy and readout as OpenCL kernels (fpga_kernels/mac.cl), fused when both sit on
    one device; the caches are page-sparse's kernels. Apply (a concatenation feeding the
    model) stays with torch or the host."""

    def __init__(self, method: MemoryAsContext):
        super().__init__(method, "opencl")

    def _program(self, dev):
        from . import _mac_cl as kernels

        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, {}), kernels

    def project_keys(self, dev, entries, w_k):
        from ._dsa_cl import project

        q, prg, _ = self._program(dev)
        batch, n, dim = entries.shape
        y, evt = project(q, prg, entries, w_k, batch * n, entries.events)
        y = y.reshape(batch, 1, n, w_k.shape[1])
        y.add_event(evt)
        return y, [evt]

    def relevancy(self, dev, keys, w_q, segment, lengths, n, scale):
        q, prg, kernels = self._program(dev)
        return kernels.relevancy(q, prg, keys, w_q, segment, lengths, n, scale)

    def retrieval(self, dev, scores, values, lengths, k):
        q, prg, kernels = self._program(dev)
        return kernels.retrieval(q, prg, scores, values, lengths, k)

    def relevancy_retrieval(self, dev, keys, values, w_q, segment, lengths, n, scale, k):
        q, prg, kernels = self._program(dev)
        return kernels.relevancy_retrieval(q, prg, keys, values, w_q, segment, lengths, n, scale, k)
