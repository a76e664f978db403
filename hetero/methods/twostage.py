"""Two-stage retrieval: BM25 picks candidates, dense embeddings re-score only those.

    prepare    both indexes: BM25's postings (on the relevancy device) and the documents'
               embeddings (on the retrieval device)
    relevancy  stage 1: BM25 scores and its top `candidates` documents per query
    retrieval  stage 2: the query's embedding against only the candidates' embeddings,
               the top k of them (score descending, equal scores to the lower id)
    apply      the augmented prompt (DenseRetrieval's: the passages best first, then the query)

Each stage is a step, so each is placed on its own device. The stages run
`BM25Retrieval`'s and `DenseRetrieval`'s own operations (named `bm25_<op>` and
`dense_<op>` here) and flows (prepare/append through `_StageRun`, which maps their steps
onto this method's), plus one operation of its own, `rescore`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import opencl
from ..runtime import Run, Step
from . import bm25 as bm25_module
from . import dense as dense_module
from .base import Method
from .bm25 import BM25Retrieval
from .dense import DenseRetrieval, topk_ranked
from .page_sparse import _positive_int
from .retrieved import Retrieved


@dataclass(eq=False)
class TwoStageMemory:
    bm25: object  # BM25Memory, its index on the relevancy device
    dense: object  # DenseMemory, its embeddings on the retrieval device
    placement: object = None

    @property
    def max_length(self) -> int:
        return int(self.bm25.n_docs)

    def __repr__(self) -> str:
        return f"TwoStageMemory(documents={self.max_length}, dim={self.dense.dim})"


class _StageRun:
    """A stage method's view of this method's run: its steps mapped onto ours (`steps`), its
    operations prefixed (`prefix`), so its own flows record into our run."""

    def __init__(self, run: Run, prefix: str, steps: dict):
        self._run, self._prefix, self._steps = run, prefix, steps
        self.record, self.validate = run.record, run.validate

    def device(self, step: Step):
        return self._run.device(self._steps.get(step, step))

    def fused(self, first: Step, second: Step, op: str) -> bool:
        return False

    def run(self, step: Step, op: str, *args, label: str | None = None):
        return self._run.run(self._steps.get(step, step), self._prefix + op, *args, label=label)

    def to(self, dev, value, what: str = "", *, output: bool = False):
        return self._run.to(dev, value, what, output=output)


class TwoStageRetrieval(Method):
    """BM25 top-`candidates`, then dense re-scoring of only those, top `k`.

    Args:
        k: documents retrieved per query (after re-scoring).
        candidates: documents BM25 hands to the second stage per query (>= k).
        bm25: options of the first stage's `BM25Retrieval` (its k is `candidates`).
        dense: options of the second stage's `DenseRetrieval` (flat index; its k is `k`).
    """

    name = "TwoStageRetrieval"
    family = "retrieval"
    STEP_APPENDS = 0
    CONTEXT_SHAPE = "documents"
    memory_type = TwoStageMemory
    needs = {
        Step.PREPARE: ("bm25_tokenize", "bm25_build_postings", "bm25_weigh", "bm25_encode_query", "dense_embed",
                       "dense_embed_query"),
        Step.RELEVANCY: ("bm25_load_index", "bm25_relevancy", "bm25_retrieval"),
        Step.RETRIEVAL: ("dense_empty_store", "dense_grow_store", "dense_store_embeddings", "rescore"),
        Step.APPLY: ("dense_augment",),
    }
    fusions = {}

    def __init__(self, k: int = 10, candidates: int = 100, bm25: dict | None = None, dense: dict | None = None):
        super().__init__()
        self.k = _positive_int("k", k)
        self.candidates = _positive_int("candidates", candidates)
        if self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be >= k ({self.k}): the second stage picks k of them")
        dense = dict(dense or {})
        if dense.get("index", "flat") != "flat":
            raise ValueError("dense['index'] must be 'flat': the second stage re-scores given candidates")
        self.bm25 = BM25Retrieval(k=self.candidates, **(bm25 or {}))
        self.dense = DenseRetrieval(k=self.k, **dense)
        self.implementations = {"torch": TorchStages(self), "host": HostStages(self), "opencl": OpenCLStages(self)}

    def __repr__(self) -> str:
        return f"TwoStageRetrieval(k={self.k}, candidates={self.candidates}, {self.bm25!r}, {self.dense!r})"

    # --- cost ---------------------------------------------------------------------------

    @property
    def SHAPES(self) -> dict:  # noqa: N802  (the class attribute other methods have)
        return {**self.bm25.SHAPES, **self.dense.SHAPES, "k": self.k,
                "candidates": self.candidates}

    def _split(self, s: dict) -> tuple[dict, dict]:
        bm25 = {k: s[k] for k in self.bm25.SHAPES if k in s}
        bm25["k"] = s["candidates"]
        dense = {k: s[k] for k in self.dense.SHAPES if k in s}
        return bm25, dense

    def shapes(self, **given) -> dict:
        """BM25's shapes and DenseRetrieval's (batch and documents shared), k, candidates."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, **{k: v for k, v in given.items() if v is not None}}
        _positive_int("shapes['candidates']", out["candidates"])
        bm25, dense = self._split(out)
        return {**self.bm25.shapes(**bm25), **self.dense.shapes(**dense), "k": out["k"], "candidates": out["candidates"]}

    def shapes_of(self, memory: TwoStageMemory, query=None) -> dict:
        return {**self.bm25.shapes_of(memory.bm25, query), **self.dense.shapes_of(memory.dense, query),
                "k": self.k, "candidates": self.candidates}

    def input_shapes(self, documents, **options) -> dict:
        return {**self.bm25.input_shapes(documents), **self.dense.input_shapes(documents), "k": self.k,
                "candidates": self.candidates}

    def describe_call(self, call: str, args, result):
        return self.bm25.describe_call(call, args, result.bm25 if call == "prepare" else result)

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """BM25's tasks (its retrieval on the relevancy step), DenseRetrieval's prepare tasks
        (its store on the retrieval step), the query's embedding, the re-scoring of
        batch x candidates embeddings, and the prompt."""
        from ..cost.model import Access, Task, Workload, safe_log2

        s = self.shapes(**shapes)
        b1, b2 = self._split(s)
        stage1 = {Step.PREPARE: backends[Step.PREPARE], Step.RELEVANCY: backends[Step.RELEVANCY],
                  Step.RETRIEVAL: backends[Step.RELEVANCY], Step.APPLY: backends[Step.APPLY]}
        stage2 = {Step.PREPARE: backends[Step.PREPARE], Step.RELEVANCY: backends[Step.RETRIEVAL],
                  Step.RETRIEVAL: backends[Step.RETRIEVAL], Step.APPLY: backends[Step.APPLY]}
        first_fused = hasattr(self.bm25.implementations[backends[Step.RELEVANCY]], "relevancy_retrieval")
        w1 = self.bm25.workload(b1, stage1, first_fused, appended, query, allocate)
        w2 = self.dense.workload(b2, stage2, False, appended, query, allocate)

        def moved(task, prefix, steps):
            return dataclasses.replace(task, op=prefix + task.op, step=steps.get(task.step, task.step))

        first = [moved(t, "bm25_", {Step.RETRIEVAL: Step.RELEVANCY}) for t in w1.tasks if t.op != "augment"]
        second = [moved(t, "dense_", {Step.RELEVANCY: Step.RETRIEVAL}) for t in w2.tasks]
        index_ops = ("bm25_tokenize", "bm25_build_postings", "bm25_weigh", "bm25_load_index")
        store_ops = ("dense_embed", "dense_empty_store", "dense_grow_store", "dense_store_embeddings")
        tasks = [t for t in first if t.op in index_ops] + [t for t in second if t.op in store_ops]  # the flow's order
        if query:
            bsz, n_cand, dim, k = s["batch"], s["candidates"], s["dim"], s["k"]
            gathered, out = bsz * n_cand * dim * 4, bsz * k * 8
            tasks += [t for t in first if t.op not in index_ops] + [t for t in second if t.op == "dense_embed_query"]
            tasks.append(Task(Step.RETRIEVAL, "rescore", 2 * bsz * n_cand * dim + bsz * n_cand * safe_log2(k),
                              "float32", "gather",
                              (Access("embeddings", gathered, s["documents"] * dim * 4), Access("ids", out, out)),
                              ("query", "candidates"), (("ids", out),),
                              {"torch": 8, "host": 8, "opencl": 5}[backends[Step.RETRIEVAL]]))
            tasks += [t for t in second if t.op == "dense_augment"]
        resident: dict = {}
        for work, steps in ((w1, {Step.RETRIEVAL: Step.RELEVANCY}), (w2, {Step.RELEVANCY: Step.RETRIEVAL})):
            for step, parts in work.resident.items():
                resident.setdefault(steps.get(step, step), {}).update(parts)
        return Workload(tasks, {**w2.inputs, **w1.inputs}, w1.outputs, resident, w1.repeat)

    # --- inputs and reference -------------------------------------------------------------

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        s = self.shapes(**(shapes or {}))
        return self.bm25.example_inputs({k: s[k] for k in ("batch", "documents")}, seed)

    def reference_scores(self, inputs, query) -> np.ndarray:
        """float64 [B, N]: the dense score of every document (the second stage's), -inf for
        those BM25 does not hand on."""
        first, _ = self.bm25.reference_step(inputs, query)
        dense = self.dense.reference_scores(inputs, query)
        out = np.full_like(dense, -np.inf)
        for b, row in enumerate(first[:, 0]):
            ids = row[row >= 0]
            out[b, ids] = dense[b, ids]
        return out

    def reference_step(self, inputs, query):
        from . import dense_reference

        ids, top = dense_reference.retrieval(self.reference_scores(inputs, query), self.k)
        ids = np.where(np.isfinite(top), ids, -1)
        return ids[:, None, :], top

    # --- flows ------------------------------------------------------------------------

    def _stage_runs(self, run: Run):
        return (_StageRun(run, "bm25_", {Step.RETRIEVAL: Step.RELEVANCY}),
                _StageRun(run, "dense_", {Step.RELEVANCY: Step.RETRIEVAL}))

    def prepare(self, run: Run, documents) -> TwoStageMemory:
        """Both indexes of `documents` (a sequence of str)."""
        bm25_module._check_documents(documents)
        dense_module._check_documents(documents, self.dense.embed_dim)
        first, second = self._stage_runs(run)
        return TwoStageMemory(self.bm25.prepare(first, documents), self.dense.prepare(second, documents))

    def append(self, run: Run, memory: TwoStageMemory, documents) -> TwoStageMemory:
        """Add documents to both indexes (checked by both before either changes)."""
        bm25_module._check_documents(documents)
        dense_module._check_documents(documents, self.dense.embed_dim)
        first, second = self._stage_runs(run)
        self.bm25.append(first, memory.bm25, documents)
        self.dense.append(second, memory.dense, documents)
        return memory

    def step(self, run: Run, query, memory: TwoStageMemory) -> Retrieved:
        """query: a str or a list of str -> `Retrieved` (ids [B, k], dense scores [B, k], prompts)."""
        queries = bm25_module._check_query(query)
        bm, dm = memory.bm25, memory.dense
        terms = run.run(Step.PREPARE, "bm25_encode_query", queries, bm.vocab, self.bm25.tokenizer)
        indptr, docs, weights = bm.index
        if run.fused(Step.RELEVANCY, Step.RELEVANCY, "bm25_relevancy_retrieval"):
            candidates, _ = run.run(Step.RELEVANCY, "bm25_relevancy_retrieval", indptr, docs, weights, terms,
                                    bm.n_docs, self.candidates, label="relevancy")
        else:
            scores = run.run(Step.RELEVANCY, "bm25_relevancy", indptr, docs, weights, terms, bm.n_docs)
            candidates, _ = run.run(Step.RELEVANCY, "bm25_retrieval", scores, self.candidates, label="relevancy")
        q = run.run(Step.PREPARE, "dense_embed_query", dense_module._as_input(queries))
        ids, top = run.run(Step.RETRIEVAL, "rescore", dm.embeddings, q, candidates, self.k)
        run.record.artifacts["selected"] = ids
        return run.run(Step.APPLY, "dense_augment", ids, top, queries, dm.texts, self.dense.prompt_budget,
                       self.dense.separator)


# --- implementations: each backend's two stage implementations, plus `rescore` -------------

class _Stages:
    """One backend's operations of both stages: `bm25_<op>` is BM25Retrieval's `<op>`,
    `dense_<op>` DenseRetrieval's."""

    def __init__(self, method: TwoStageRetrieval, backend: str):
        self.method = method
        self._parts = {"bm25": method.bm25.implementations[backend], "dense": method.dense.implementations[backend]}

    def __getattr__(self, name):
        prefix, _, op = name.partition("_")
        part = self.__dict__.get("_parts", {}).get(prefix)
        if part is None or not op:
            raise AttributeError(name)
        return getattr(part, op)


def _rescore_torch(embeddings: torch.Tensor, query: torch.Tensor, candidates: torch.Tensor, k: int):
    """(ids int64 [B, k], top float32 [B, k]): the candidates (ids [B, n], -1 padded, any
    order) ranked by query . embedding, equal scores to the lower id."""
    cand = candidates.long()
    big = torch.iinfo(torch.int64).max
    cand = torch.where(cand >= 0, cand, big).sort(-1).values  # positions order like ids; -1 last
    valid = cand != big
    rows = embeddings[cand.masked_fill(~valid, 0)]  # [B, n, dim]
    scores = torch.bmm(rows, query.float()[:, :, None])[..., 0].masked_fill_(~valid, -torch.inf)
    pos, top = topk_ranked(scores, k)
    ids = cand.gather(1, pos.clamp(min=0))
    return torch.where((pos >= 0) & torch.isfinite(top), ids, -1), top


class TorchStages(_Stages):
    def __init__(self, method):
        super().__init__(method, "torch")

    def rescore(self, dev, embeddings, query, candidates, k):
        return _rescore_torch(embeddings, query, candidates, k)


class HostStages(_Stages):
    def __init__(self, method):
        super().__init__(method, "host")

    def rescore(self, dev, store, query, candidates, k):
        """The candidates' rows of the faiss index's own storage, scored with torch on views."""
        emb = torch.from_numpy(store.embeddings(store.ntotal))
        ids, top = _rescore_torch(emb, torch.from_numpy(np.ascontiguousarray(query)), torch.from_numpy(candidates), k)
        return ids.numpy(), top.numpy()


class OpenCLStages(_Stages):
    def __init__(self, method):
        super().__init__(method, "opencl")

    def rescore(self, dev, embeddings, query, candidates, k):
        from . import _dense_cl as kernels

        q = opencl.queue(dev)
        prg = opencl.program(dev, kernels.KERNEL_FILE, kernels.defines(embeddings.shape[1]))
        if candidates.dtype != np.int32:  # ids from a host or torch first stage are int64
            candidates = opencl.cla.to_device(q, candidates.get().astype(np.int32))
        return kernels.rescore(q, prg, embeddings, query, candidates, k)
