"""BM25 sparse retrieval (Lucene's BM25, scored as Lucene and bm25s's "lucene" method do).

    prepare    tokenize the documents (`tokenize`: lowercase, every run of two or more word
               characters, the English stop words dropped; or the caller's tokenizer), count
               term frequencies into a term-major sparse matrix (CSC over the documents: per
               term its postings, ascending document ids) and weigh every (term, document):
                   w = idf * tf / (tf + k1 * (1 - b + b * dl / avgdl))
                   idf = ln(1 + (N - df + 0.5) / (df + 0.5))
    relevancy  per query, the sum of its tokens' weights per document: float32 [B, N]
    retrieval  the k best documents per query: score descending, equal scores to the lower
               document id, -1 ids (score -inf) padding past the corpus's end
    apply      `Retrieved`: the ids and scores, and per query the augmented prompt (the
               retrieved passages, best first, within a budget of words, then the query)

The math is `bm25_reference` (numpy float64); every implementation is tested against it
and against bm25s. Scores are float32 as in Lucene and bm25s: idf rounded to float32 (as
Lucene and bm25s store it), then w = float32(idf * tf / (...)) with the tf part in float64,
and a document's score summed in float32 in the query's token order, from 0 — the order
bm25s adds them in: every backend's scores equal bm25s's bit for bit (tested).

Memory, and where it lives:
    host              the vocabulary (term -> id; stop words map to -1), the documents'
                      texts (apply builds prompts from them)
    prepare device    the term frequencies as a term-major matrix (indptr int64 [V + 1], docs
                      int32 [nnz], tf int32 [nnz]) and the document lengths (int32 [N])
    relevancy device  the index: (indptr, docs, weights float32 [nnz]), same layout

Append: new documents change N and avgdl and so every weight. `append` tokenizes the new
documents (new terms get the next ids, as a rebuild numbering terms by first appearance
would), merges their postings behind each term's (their ids are higher), recomputes every
weight from the stored term frequencies and lengths on the prepare device and replaces the
index on the relevancy device: O(postings) per append, and the memory equals a rebuild on
the concatenated corpus exactly (every array, bit for bit). Nothing changes until all of it
has succeeded.

Edge cases (the same on every backend):
    empty corpus      allowed (documents=[]); `step` returns -1 ids, -inf scores and prompts
                      that are just the queries; `append` fills it
    k above N         the row is padded with -1 ids and -inf scores
    a query with no vocabulary term (empty, only stop words, or only unknown words)
                      every document scores 0: the k lowest ids with score 0 (the ranking
                      rule's ties); prompts take only documents with a positive score, so
                      its prompt is the query alone
    query             a str (one query) or a non-empty list of str; anything else ValueError
"""

from __future__ import annotations

import bisect
import itertools
import math
import string
import threading
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backends import host, opencl
from ..runtime import Run, Step
from . import bm25_reference as ref
from .base import Method
from .page_sparse import _nonnegative_int, _positive_int
from .retrieved import Retrieved

STOPWORDS = ref.STOPWORDS
TOKEN_PATTERN = ref.TOKEN_PATTERN


def tokenize(text: str, stopwords=STOPWORDS) -> list[str]:
    """The default tokenizer (bm25_reference.tokenize): lowercase `text`, take every run of
    two or more word characters (TOKEN_PATTERN, Unicode-aware), drop `stopwords`. The same
    tokens as `bm25s.tokenize(text, stopwords="en", lower=True, stemmer=None)`."""
    return ref.tokenize(text, stopwords)


# ASCII text (after lowercasing) takes a fast path: every non-word character becomes a space
# and str.split() gives the runs of word characters, 4-5x faster than the regex. One-letter
# runs, which the regex skips, get -1 from the vocabulary, like stop words.
_ASCII_WORD = set(string.ascii_letters + string.digits + "_")
_ASCII_SPLIT = {i: " " for i in range(128) if chr(i) not in _ASCII_WORD}
# many documents at once: joined by a separator token that the vocabulary maps to SEPARATOR_ID
_SEP = "\x00"
_SEP_JOIN = f" {_SEP} "
SEPARATOR_ID = -2
_BULK_SPLIT = {i: c for i, c in _ASCII_SPLIT.items() if chr(i) != _SEP}
_find_tokens = ref._find


class Vocabulary(dict):
    """term -> id (ids 0, 1, ... in order of first appearance). With the default tokenizer
    its dropped tokens (stop words; the ASCII fast path's one-letter runs) map to -1, and
    the separator of its bulk path to SEPARATOR_ID.
    Looking up an unknown term gives it the next id."""

    def __init__(self, *args, n_terms: int = 0, drop_short: bool = False):
        super().__init__(*args)
        self.n_terms = n_terms
        self.drop_short = drop_short

    def __missing__(self, term):
        if self.drop_short and len(term) < 2:  # only the ASCII path yields these
            return -1
        term_id = self[term] = self.n_terms
        self.n_terms += 1
        return term_id

    def copy(self) -> "Vocabulary":
        return Vocabulary(self, n_terms=self.n_terms, drop_short=self.drop_short)

    def terms(self) -> list[str]:
        """The terms in id order."""
        out = [""] * self.n_terms
        for term, i in self.items():
            if i >= 0:
                out[i] = term
        return out


def _new_vocabulary(stopwords, default_tokenizer: bool) -> Vocabulary:
    vocab = Vocabulary(drop_short=default_tokenizer)
    if default_tokenizer:
        for word in stopwords:
            dict.__setitem__(vocab, word, -1)
        dict.__setitem__(vocab, _SEP, SEPARATOR_ID)
    return vocab


class _Texts(Sequence):
    """The documents' texts: the sequences given to prepare and each append, unchanged
    (lists are copied: a caller may change theirs)."""

    def __init__(self, parts: tuple = ()):
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts], dtype=np.int64).tolist()

    def extended(self, part) -> "_Texts":
        return _Texts(self.parts + (part,)) if len(part) else self

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        p = bisect.bisect_right(self.ends, i)
        return self.parts[p][i - (self.ends[p - 1] if p else 0)]


@dataclass(eq=False)
class BM25Memory:
    """A prepared BM25 index (see the module docstring for what lives where)."""

    vocab: Vocabulary
    texts: _Texts
    n_docs: int
    doc_len: object  # int32 [N], prepare device
    postings: tuple  # (indptr int64 [V+1], docs int32 [nnz], tf int32 [nnz]), prepare device
    index: tuple  # (indptr, docs, weights float32 [nnz]), relevancy device
    doc_freq: np.ndarray  # int64 [V], host: documents holding each term
    total_tokens: int = 0
    placement: object = None

    @property
    def n_terms(self) -> int:
        return self.vocab.n_terms

    @property
    def nnz(self) -> int:
        return int(self.doc_freq.sum())

    @property
    def avgdl(self) -> float:
        return self.total_tokens / self.n_docs if self.n_docs else 0.0

    @property
    def max_length(self) -> int:  # what KV-cache code paths read as "entries held"
        return self.n_docs

    @property
    def nbytes(self) -> dict[str, int]:
        return {"index": sum(_nbytes(a) for a in self.index),
                "postings": sum(_nbytes(a) for a in self.postings) + _nbytes(self.doc_len)}

    def __repr__(self) -> str:
        return (f"BM25Memory(documents={self.n_docs}, terms={self.n_terms}, postings={self.nnz}, "
                f"avgdl={self.avgdl:.2f})")


def _nbytes(value) -> int:
    if value is None:
        return 0
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else int(value.nbytes)


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if opencl.holds(value):
        return value.get()
    return np.asarray(value)


class BM25Retrieval(Method):
    """BM25 retrieval over a corpus of texts, for one batch of queries per step.

    Args:
        k: documents retrieved per query.
        k1, b: BM25's term-frequency saturation and length normalisation (1.2, 0.75).
        tokenizer: None for `tokenize` (lowercase, runs of >= 2 word characters, `stopwords`
            dropped), or a callable text -> iterable of str tokens used as is, for documents
            and queries alike (then `stopwords` is not applied).
        stopwords: the default tokenizer's stop words (default: English, STOPWORDS).
        prompt_budget: words (whitespace-separated) of retrieved passages a prompt may hold;
            passages are taken best first, the last one cut to fit; 0: the query alone.
        separator: what joins the passages and the query in a prompt.

    prepare(documents) takes a sequence of str (e.g. `hetero.corpus.stdlib().texts`);
    append(memory, documents) adds more; step(query, memory) takes a str or a list of str
    and returns a `Retrieved`.
    """

    name = "BM25Retrieval"
    family = "retrieval"
    STEP_APPENDS = 0  # queries over a fixed corpus
    memory_type = BM25Memory
    needs = {
        Step.PREPARE: ("tokenize", "build_postings", "weigh", "encode_query"),
        Step.RELEVANCY: ("load_index", "relevancy"),
        Step.RETRIEVAL: ("retrieval",),
        Step.APPLY: ("augment",),
    }
    fusions = {(Step.RELEVANCY, Step.RETRIEVAL): "relevancy_retrieval"}
    CONTEXT_SHAPE = "documents"

    def __init__(self, k: int = 10, k1: float = ref.K1, b: float = ref.B, tokenizer=None, stopwords=STOPWORDS,
                 prompt_budget: int = 512, separator: str = "\n\n"):
        super().__init__()
        self.k = _positive_int("k", k)
        if isinstance(k1, bool) or not isinstance(k1, (int, float)) or not math.isfinite(k1) or k1 < 0:
            raise ValueError(f"k1 must be a finite number >= 0, got {k1!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b <= 1:
            raise ValueError(f"b must be a number in [0, 1], got {b!r}")
        self.k1, self.b = float(k1), float(b)
        if tokenizer is not None and not callable(tokenizer):
            raise ValueError(f"tokenizer must be None or a callable text -> tokens, got {type(tokenizer).__name__}")
        self.tokenizer = tokenizer
        if isinstance(stopwords, str) or not all(isinstance(w, str) for w in (stopwords or ())):
            raise ValueError("stopwords must be a collection of str (e.g. a set of words), or None")
        self.stopwords = frozenset(stopwords or ())
        self.prompt_budget = _nonnegative_int("prompt_budget", prompt_budget)
        if not isinstance(separator, str):
            raise ValueError(f"separator must be a str, got {type(separator).__name__}")
        self.separator = separator
        self.implementations = {"torch": TorchBM25(self), "opencl": OpenCLBM25(self), "host": HostBM25(self)}
        self._reference_cache: tuple | None = None

    def __repr__(self) -> str:
        tok = "default" if self.tokenizer is None else getattr(self.tokenizer, "__name__", "custom")
        return f"BM25Retrieval(k={self.k}, k1={self.k1}, b={self.b}, tokenizer={tok})"

    def tokenize(self, text: str) -> list[str]:
        """The tokens of `text`, as documents and queries are tokenized."""
        if self.tokenizer is None:
            return ref.tokenize(text, self.stopwords)
        return _custom_tokens(self.tokenizer, text, "text")

    # --- cost ---------------------------------------------------------------------------

    # documents: corpus size; vocabulary: distinct terms; terms_per_doc: distinct terms per
    # document (postings per document); doc_bytes: text per document; query_terms: tokens
    # per query; df: documents holding a query token, as a fraction of the corpus (postings
    # read per query token / documents). Defaults: the scale-up of the stdlib corpus
    # (hetero.corpus) with its real queries.
    SHAPES = {"batch": 1, "documents": 100_000, "k": 10, "vocabulary": 100_000, "terms_per_doc": 15.0,
              "doc_bytes": 200, "query_terms": 3.0, "df": 0.025, "layers": 1}

    def shapes(self, **given) -> dict:
        """Shapes for the cost model, defaults filled in (k defaults to this method's k)."""
        unknown = sorted(set(given) - set(self.SHAPES))
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; {self.name} takes {sorted(self.SHAPES)}")
        out = {**self.SHAPES, "k": self.k, **given}
        for key in ("batch", "documents", "k", "vocabulary", "doc_bytes", "layers"):
            _positive_int(f"shapes[{key!r}]", out[key])
        for key in ("terms_per_doc", "query_terms"):
            value = out[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"shapes[{key!r}] must be a positive number, got {value!r}")
        df = out["df"]
        if isinstance(df, bool) or not isinstance(df, (int, float)) or not 0 < df <= 1:
            raise ValueError(f"shapes['df'] must be a fraction in (0, 1], got {df!r}")
        return out

    def shapes_of(self, memory: BM25Memory, query=None) -> dict:
        """The shapes of a prepared memory (and of `query`, a str or list of str, when given:
        its batch, tokens per query and the postings they read)."""
        n = max(memory.n_docs, 1)
        given = dict(documents=n, k=self.k, vocabulary=max(memory.n_terms, 1),
                     terms_per_doc=max(memory.nnz / n, 1e-3),
                     doc_bytes=max(1, round(sum(len(memory.texts[i]) for i in range(min(len(memory.texts), 256)))
                                            / max(min(len(memory.texts), 256), 1))))
        if query is not None:
            queries = [query] if isinstance(query, str) else list(query)
            tokens = [self.tokenize(q) for q in queries]
            count = sum(len(t) for t in tokens)
            ids = [memory.vocab.get(t, -1) for ts in tokens for t in ts]
            postings = sum(int(memory.doc_freq[i]) for i in ids if i >= 0)
            given.update(batch=max(len(queries), 1), query_terms=max(count / max(len(queries), 1), 1e-3),
                         df=min(max(postings / max(count, 1) / n, 1e-9), 1.0))
        return self.shapes(**given)

    def input_shapes(self, documents, **options) -> dict:
        """The shapes `prepare(documents)` builds, estimated from up to 1000 documents."""
        texts = _check_documents(documents)
        n = len(texts)
        sample = [texts[i] for i in range(0, n, max(1, n // 1000))][:1000]
        out = dict(documents=max(n, 1), k=self.k)
        if sample:
            tokens = [self.tokenize(t) for t in sample]
            out["terms_per_doc"] = max(sum(len(set(t)) for t in tokens) / len(sample), 1e-3)
            out["doc_bytes"] = max(1, round(sum(len(t) for t in sample) / len(sample)))
            if n <= len(sample):
                out["vocabulary"] = max(len({t for ts in tokens for t in ts}), 1)
        return self.shapes(**out)

    def workload(self, shapes: dict, backends: dict, fused: bool, appended: int = 1, query: bool = True,
                 allocate: bool = False):
        """The tasks of one call: `appended` documents tokenized, merged into the postings and
        every weight recomputed (then the index replaced on the relevancy device), and with
        `query` a batch of queries encoded, scored, ranked and turned into prompts. Relevancy
        reads each query token's postings (df x documents entries of doc id + weight), adds
        each into a float32 score per document (a random read-modify-write: one cache line)
        and zeroes the scores first; retrieval (or the fused op) scans them. Retrieval
        methods query without appending: a step is appended=0."""
        from ..cost.model import Access, Task, Workload

        s = self.shapes(**shapes)
        bsz, n, k, vocab = s["batch"], s["documents"], s["k"], s["vocabulary"]
        qt, df, tpd, doc_bytes = s["query_terms"], s["df"], s["terms_per_doc"], s["doc_bytes"]
        nnz = n * tpd
        index = nnz * 8 + (vocab + 1) * 8  # docs + weights, indptr
        postings = nnz * 8 + (vocab + 1) * 8 + n * 4  # docs + tf, indptr, lengths
        terms = bsz * max(qt, 1.0) * 4
        read = bsz * qt * df * n  # postings read per call
        scores = bsz * n * 4
        ids_bytes = bsz * k * 8
        tasks: list[Task] = []

        def launches(step, per_backend):
            return int(math.ceil(per_backend[backends[step]]))

        if appended:
            a = appended
            text = a * doc_bytes
            tokens = a * tpd * 2 * 4
            tasks += [
                Task(Step.PREPARE, "tokenize", 10 * text, "float32", "stream",
                     (Access("documents", text, text), Access("tokens", tokens, tokens)),
                     ("documents",), (("tokens", tokens),), launches(Step.PREPARE, {"host": a, "torch": a})),
                Task(Step.PREPARE, "build_postings", 4 * nnz, "float32", "stream",
                     (Access("postings", 2 * postings + tokens, postings),), ("tokens",), (("postings", postings),),
                     launches(Step.PREPARE, {"host": 30, "torch": 32})),
                Task(Step.PREPARE, "weigh", 8 * nnz, "float32", "stream",
                     (Access("postings", postings, postings), Access("weights", nnz * 4, nnz * 4)),
                     ("postings",), (("index", index),), launches(Step.PREPARE, {"host": 15, "torch": 20})),
                Task(Step.RELEVANCY, "load_index", 0, "float32", "stream", (Access("index", 0, index),),
                     ("index",), (), 1),
            ]
        if query:
            tasks.append(Task(Step.PREPARE, "encode_query", 50 * bsz * qt, "float32", "stream",
                              (Access("terms", terms, terms),), ("queries",), (("terms", terms),),
                              launches(Step.PREPARE, {"host": bsz, "torch": bsz + 1})))
            postings_read = Access("index", read * 8 + bsz * qt * 16 * math.log2(max(read / max(bsz * qt, 1), 2)),
                                   index)
            scatter = 64 * read  # each posting read-modify-writes a score: a cache line, in no order
            if fused:
                tasks.append(Task(Step.RELEVANCY, "relevancy_retrieval", 2 * read + bsz * n, "float32", "gather",
                                  (postings_read, Access("scores", 2 * scores + scatter, scores),
                                   Access("ids", ids_bytes, ids_bytes)),
                                  ("terms",), (("ids", ids_bytes),),
                                  launches(Step.RELEVANCY, {"opencl": 2, "host": 2 * bsz * qt + bsz / 8 + 1})))
            else:
                tasks.append(Task(Step.RELEVANCY, "relevancy", 2 * read, "float32", "gather",
                                  (postings_read, Access("scores", scores + scatter, scores)),
                                  ("terms",), (("scores", scores),),
                                  launches(Step.RELEVANCY, {"opencl": 1, "host": 1 + bsz * qt, "torch": 14})))
                passes = {"torch": 5, "host": 1, "opencl": 1}[backends[Step.RETRIEVAL]]
                tasks.append(Task(Step.RETRIEVAL, "retrieval", bsz * n, "float32", "select",
                                  (Access("scores", passes * scores + ids_bytes, scores),),
                                  ("scores",), (("ids", ids_bytes),),
                                  launches(Step.RETRIEVAL, {"torch": 14, "host": 2, "opencl": 2})))
            passages = bsz * k * doc_bytes
            tasks.append(Task(Step.APPLY, "augment", passages, "float32", "stream",
                              (Access("texts", passages, n * doc_bytes),), ("ids",), (("retrieved", passages),),
                              launches(Step.APPLY, {"host": bsz, "torch": bsz})))
        inputs = {}
        if appended:
            inputs["documents"] = appended * doc_bytes
        if query:
            inputs["queries"] = bsz * 64
        resident = {Step.PREPARE: {"postings": postings}, Step.RELEVANCY: {"index": index}}
        return Workload(tasks, inputs, ("retrieved",) if query else (), resident, s["layers"])

    def describe_call(self, call: str, args, result):
        """(memory, query or None, documents appended, whether the memory was built, home):
        prepare(documents), append(memory, documents), step(query, memory)."""
        if call == "prepare":
            return result, None, result.n_docs, True, "torch:cpu"
        if call == "append":
            return args[0], None, len(args[1]), False, "torch:cpu"
        return args[1], args[0], 0, False, "torch:cpu"

    # --- inputs and reference -------------------------------------------------------------

    def example_inputs(self, shapes: dict | None = None, seed: int = 0):
        """((documents,), queries): `documents` texts of the standard library's docstrings
        (hetero.corpus.stdlib: a seeded sample, in corpus order, when fewer are asked for;
        its synthetic scale-up when more) and `batch` real queries made from that corpus."""
        from .. import corpus

        s = self.shapes(**(shapes or {}))
        real = corpus.stdlib()
        n = s["documents"]
        if n <= len(real):
            pick = np.sort(np.random.default_rng(seed).choice(len(real), n, replace=False))
            documents = tuple(real.texts[i] for i in pick.tolist())
        else:
            documents = corpus.scale_up(real, n, seed)
        return (documents,), corpus.queries(real, s["batch"], seed)

    def decode_inputs(self, inputs, count: int, seed: int = 0) -> list[tuple]:
        """`count` one-document appends: documents of the stdlib corpus drawn with `seed`."""
        from .. import corpus

        real = corpus.stdlib()
        rng = np.random.default_rng(seed)
        return [([real.texts[int(i)]],) for i in rng.integers(len(real), size=count)]

    def _reference_index(self, documents):
        texts = _check_documents(documents)
        cached = self._reference_cache
        if cached is not None and cached[0] is documents:
            return cached[1]
        if self.tokenizer is None:  # the bulk tokenizer: the same tokens (tested), ~5x faster
            vocab = _new_vocabulary(self.stopwords, True)
            ids, lengths, vocab = tokenize_documents(texts, vocab)
            words = np.array(vocab.terms(), dtype=object)
            ends = np.cumsum(lengths, dtype=np.int64).tolist()
            flat = words[ids].tolist()
            tokens = [flat[e - n:e] for n, e in zip(lengths.tolist(), ends)]
        else:
            tokens = [self.tokenize(t) for t in texts]
        idx = ref.index(tokens, self.k1, self.b)
        self._reference_cache = (documents, idx)
        return idx

    def reference_scores(self, inputs, query) -> np.ndarray:
        """float64 [B, N]: every document's score for each query, from `bm25_reference`."""
        idx = self._reference_index(inputs[0])
        return ref.scores(idx, [self.tokenize(q) for q in _check_query(query)])

    def reference_step(self, inputs, query):
        """(ids int64 [B, 1, k] ranked, -1 padded; scores float64 [B, k]) from `bm25_reference`."""
        ids, vals = ref.topk(self.reference_scores(inputs, query), self.k)
        return ids[:, None, :], vals

    # --- flows ------------------------------------------------------------------------

    def prepare(self, run: Run, documents) -> BM25Memory:
        """Index `documents` (a sequence of str; may be empty)."""
        texts = _check_documents(documents)
        vocab = _new_vocabulary(self.stopwords, self.tokenizer is None)
        return self._add(run, None, texts, vocab)

    def append(self, run: Run, memory: BM25Memory, documents) -> BM25Memory:
        """Add `documents` (a sequence of str): the memory then equals a rebuild on all the
        documents. Nothing changes unless every step succeeds."""
        texts = _check_documents(documents)
        if len(texts) == 0:
            return memory
        new = self._add(run, memory, texts, memory.vocab)
        for name in ("vocab", "texts", "n_docs", "doc_len", "postings", "index", "doc_freq", "total_tokens"):
            setattr(memory, name, getattr(new, name))
        return memory

    def _add(self, run: Run, memory: BM25Memory | None, texts, vocab: Vocabulary) -> BM25Memory:
        ids, lengths, vocab = run.run(Step.PREPARE, "tokenize", texts, vocab, self.tokenizer)
        old = (None, None, None, None) if memory is None else (*memory.postings, memory.doc_len)
        indptr, docs, tf, doc_len = run.run(Step.PREPARE, "build_postings", *old, ids, lengths, vocab.n_terms)
        weights = run.run(Step.PREPARE, "weigh", indptr, docs, tf, doc_len, self.k1, self.b)
        index = run.run(Step.RELEVANCY, "load_index", indptr, docs, weights, label="prepare")
        doc_freq = np.diff(_numpy(indptr)).astype(np.int64)
        n_docs = (0 if memory is None else memory.n_docs) + len(texts)
        stored = tuple(texts) if isinstance(texts, MutableSequence) else texts
        old_texts = _Texts() if memory is None else memory.texts
        total = (0 if memory is None else memory.total_tokens) + int(_numpy(lengths).sum(dtype=np.int64))
        return BM25Memory(vocab, old_texts.extended(stored), n_docs, doc_len, (indptr, docs, tf), tuple(index),
                          doc_freq, total)

    def step(self, run: Run, query, memory: BM25Memory) -> Retrieved:
        """query: a str or a list of str -> `Retrieved` (ids [B, k], scores [B, k], prompts)."""
        queries = _check_query(query)
        terms = run.run(Step.PREPARE, "encode_query", queries, memory.vocab, self.tokenizer)
        indptr, docs, weights = memory.index
        n, k = memory.n_docs, self.k
        if run.fused(Step.RELEVANCY, Step.RETRIEVAL, self.fusions[Step.RELEVANCY, Step.RETRIEVAL]):
            ids, scores = run.run(Step.RELEVANCY, "relevancy_retrieval", indptr, docs, weights, terms, n, k,
                                  label="relevancy+retrieval")
        else:
            all_scores = run.run(Step.RELEVANCY, "relevancy", indptr, docs, weights, terms, n)
            ids, scores = run.run(Step.RETRIEVAL, "retrieval", all_scores, k)
        run.record.artifacts["selected"] = ids
        return run.run(Step.APPLY, "augment", ids, scores, queries, memory.texts, self.prompt_budget, self.separator)


# --- argument checks ------------------------------------------------------------------------

def _check_documents(documents) -> Sequence:
    if isinstance(documents, (str, bytes)):
        raise ValueError("documents must be a sequence of str (one per document), got a single "
                         f"{type(documents).__name__}")
    if isinstance(documents, (torch.Tensor, np.ndarray)) or not hasattr(documents, "__iter__"):
        raise ValueError(f"documents must be a sequence of str (one per document), got {type(documents).__name__}")
    if not isinstance(documents, Sequence):
        documents = tuple(documents)
    return documents


def _check_query(query) -> list[str]:
    if isinstance(query, str):
        return [query]
    if isinstance(query, (list, tuple)) and query and all(isinstance(q, str) for q in query):
        return list(query)
    if isinstance(query, (list, tuple)) and not query:
        raise ValueError("query must be a str or a non-empty list of str, got an empty list")
    raise ValueError(f"query must be a str or a non-empty list of str, got {type(query).__name__}"
                     + (" with non-str items" if isinstance(query, (list, tuple)) else ""))


def _custom_tokens(tokenizer, text, what: str) -> list[str]:
    tokens = list(tokenizer(text))
    for t in tokens:
        if type(t) is not str:
            raise ValueError(f"the tokenizer returned a {type(t).__name__} token for {what}; tokens must be str")
    return tokens


# --- the numpy core of prepare (host memory) ---------------------------------------------------

def tokenize_documents(texts: Sequence, vocab: Vocabulary, tokenizer=None, chunk: int = 8192):
    """(term ids int32 [tokens] of every document in order, lengths int32 [n], the vocabulary
    extended by the new terms — a copy; `vocab` is unchanged).

    The default tokenizer runs over runs of consecutive ASCII documents at once: joined with
    a separator token, lowercased, split and looked up in one pass each (C loops), ~5x
    faster than one document at a time; other documents go one by one (the regex)."""
    vocab = vocab.copy()
    get = vocab.__getitem__
    n = len(texts)
    lengths = np.empty(n, np.int32)
    parts: list[np.ndarray] = []
    it = iter(texts)
    for lo in range(0, n, chunk):
        docs = list(itertools.islice(it, chunk))
        for j, text in enumerate(docs):
            if type(text) is not str:
                raise ValueError(f"documents[{lo + j}] must be a str, got {type(text).__name__}")
        if tokenizer is not None:
            for j, text in enumerate(docs):
                ids = list(map(get, _custom_tokens(tokenizer, text, f"documents[{lo + j}]")))
                lengths[lo + j] = len(ids)
                parts.append(np.array(ids, np.int32))
            continue
        bulk = [t.isascii() and _SEP not in t for t in docs]
        j = 0
        while j < len(docs):
            e = j
            while e < len(docs) and bulk[e]:
                e += 1
            if e > j:  # documents j..e-1 at once
                tokens = _SEP_JOIN.join(docs[j:e]).lower().translate(_BULK_SPLIT).split()
                ids = np.fromiter(map(get, tokens), np.int32, len(tokens))
                seps = np.flatnonzero(ids == SEPARATOR_ID)
                kept = ids >= 0
                counted = np.zeros(len(ids) + 1, np.int64)
                np.cumsum(kept, out=counted[1:])
                lengths[lo + j:lo + e] = counted[np.append(seps, len(ids))] - counted[np.insert(seps + 1, 0, 0)]
                parts.append(ids[kept])
                j = e
            else:  # one document: non-ASCII, or holding the separator
                s = docs[j].lower()
                ids = np.fromiter(map(get, s.translate(_ASCII_SPLIT).split() if s.isascii() else _find_tokens(s)),
                                  np.int32)
                ids = ids[ids >= 0]
                lengths[lo + j] = len(ids)
                parts.append(ids)
                j += 1
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), lengths, vocab


def build_postings(indptr, docs, tf, doc_len, ids, lengths, n_terms: int):
    """The term-major term frequencies of the old documents (indptr, docs, tf, doc_len; None
    for none) with the new ones' (their term ids, lengths) behind each term's postings."""
    import scipy.sparse as sp

    n_new = len(lengths)
    owner = np.repeat(np.arange(n_new, dtype=np.int32), lengths)
    new = sp.coo_matrix((np.ones(len(ids), np.int32), (owner, ids)), shape=(n_new, n_terms)).tocsc()
    new.sum_duplicates()  # canonical: ascending document ids per term, tf summed
    new_ptr = new.indptr.astype(np.int64)
    new_docs, new_tf = new.indices.astype(np.int32), new.data.astype(np.int32)
    if indptr is None:
        return new_ptr, new_docs, new_tf, lengths.astype(np.int32)
    n_old = len(doc_len)
    old_len = np.zeros(n_terms, np.int64)
    old_len[:len(indptr) - 1] = np.diff(indptr)
    new_len = np.diff(new_ptr)
    out_ptr = np.zeros(n_terms + 1, np.int64)
    np.cumsum(old_len + new_len, out=out_ptr[1:])
    nnz = int(out_ptr[-1])
    out_docs = np.empty(nnz, np.int32)
    out_tf = np.empty(nnz, np.int32)
    # old postings of term t move by out_ptr[t] - indptr[t]; new ones land after them
    v_old = len(indptr) - 1
    old_at = np.arange(len(docs), dtype=np.int64) + np.repeat(out_ptr[:v_old] - indptr[:-1], old_len[:v_old])
    new_at = np.arange(len(new_docs), dtype=np.int64) + np.repeat(out_ptr[:-1] + old_len - new_ptr[:-1], new_len)
    out_docs[old_at], out_tf[old_at] = docs, tf
    out_docs[new_at], out_tf[new_at] = new_docs + np.int32(n_old), new_tf
    return out_ptr, out_docs, out_tf, np.concatenate([doc_len, lengths]).astype(np.int32)


def idf32(doc_freq: np.ndarray, n: int) -> np.ndarray:
    """Lucene's idf per term, rounded to float32 (as Lucene and bm25s store it)."""
    df = doc_freq.astype(np.float64)
    return np.log(1.0 + (n - df + 0.5) / (df + 0.5)).astype(np.float32)


def weigh(indptr, docs, tf, doc_len, k1: float, b: float) -> np.ndarray:
    """float32 [nnz]: w = float32(idf32 * tf / (k1 * ((1 - b) + b * dl / avgdl) + tf)), the
    tf part in float64."""
    n = len(doc_len)
    if len(docs) == 0:
        return np.zeros(0, np.float32)
    doc_freq = np.diff(indptr)
    avgdl = float(doc_len.sum(dtype=np.int64)) / n
    idf = np.repeat(idf32(doc_freq, n).astype(np.float64), doc_freq)
    tf64 = tf.astype(np.float64)
    dl = doc_len.astype(np.float64)[docs]
    return (idf * (tf64 / (k1 * ((1.0 - b) + b * dl / avgdl) + tf64))).astype(np.float32)


def encode_queries(queries: list[str], vocab: Vocabulary, tokenizer=None) -> np.ndarray:
    """int32 [B, T]: each query's term ids in order (repeats kept, unknown terms and stop
    words dropped), -1 padded; T >= 1."""
    rows = []
    for i, q in enumerate(queries):
        tokens = ref.tokenize(q, ()) if tokenizer is None else _custom_tokens(tokenizer, q, f"query[{i}]")
        ids = [vocab.get(t, -1) for t in tokens]
        rows.append([t for t in ids if t >= 0])
    width = max([1, *map(len, rows)])
    out = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def augment(ids: np.ndarray, scores: np.ndarray, queries: list[str], texts, budget: int, separator: str):
    """`Retrieved` with each query's prompt: its retrieved passages with a positive score,
    best first, within `budget` words (bm25_reference.prompt), then the query."""
    prompts = []
    for q, row, vals in zip(queries, ids.tolist(), scores.tolist()):
        passages = [texts[i] for i, s in zip(row, vals) if i >= 0 and s > 0]
        prompts.append(ref.prompt(passages, q, budget, separator))
    return Retrieved.build(ids, scores, prompts)


def _pad(ids: np.ndarray, vals: np.ndarray, batch: int, k: int):
    out_ids = np.full((batch, k), -1, np.int64)
    out_vals = np.full((batch, k), -np.inf, np.float32)
    out_ids[:, :ids.shape[1]] = ids
    out_vals[:, :vals.shape[1]] = vals
    return out_ids, out_vals


# --- host (numpy + the C++ shim's top-k) ------------------------------------------------------

class HostBM25:
    """The CPU with numpy: tokenization in Python, postings with scipy, scoring as one
    fancy-indexed `scores[docs] += weights` per query token (a term's postings hold each
    document once, so no np.add.at), top-k by the C++ shim's `topk` (ranked, equal scores to
    the lower id). The fused op scores a few queries into a reused zeroed buffer, selects,
    and zeroes back only the entries it touched."""

    ROWS = 8  # queries scored per fused pass (the shim's top-k runs over their rows in parallel)

    def __init__(self, method: BM25Retrieval):
        self.method = method
        self._local = threading.local()  # per thread: the fused op's zeroed score buffer

    def tokenize(self, dev, texts, vocab, tokenizer):
        return tokenize_documents(texts, vocab, tokenizer)

    def build_postings(self, dev, indptr, docs, tf, doc_len, ids, lengths, n_terms):
        return build_postings(indptr, docs, tf, doc_len, ids, lengths, n_terms)

    def weigh(self, dev, indptr, docs, tf, doc_len, k1, b):
        return weigh(indptr, docs, tf, doc_len, k1, b)

    def encode_query(self, dev, queries, vocab, tokenizer):
        return encode_queries(queries, vocab, tokenizer)

    def load_index(self, dev, indptr, docs, weights):
        return indptr, docs, weights

    @staticmethod
    def _accumulate(row, indptr, docs, weights, terms) -> int:
        touched = 0
        for t in terms:
            if t < 0:
                continue
            a, e = indptr[t], indptr[t + 1]
            row[docs[a:e]] += weights[a:e]
            touched += e - a
        return touched

    def relevancy(self, dev, indptr, docs, weights, terms, n):
        batch = terms.shape[0]
        scores = host.staging((batch, n), np.float32)
        scores.fill(0.0)
        for q, row_terms in enumerate(terms.tolist()):
            self._accumulate(scores[q], indptr, docs, weights, row_terms)
        return scores

    def retrieval(self, dev, scores, k):
        batch, n = scores.shape
        if n == 0 or batch == 0:
            return _pad(np.zeros((batch, 0), np.int64), np.zeros((batch, 0), np.float32), batch, k)
        vals, ids = host._host.topk(np.ascontiguousarray(scores, np.float32), min(k, n))
        return _pad(ids, vals, batch, k)

    def relevancy_retrieval(self, dev, indptr, docs, weights, terms, n, k):
        batch = terms.shape[0]
        if n == 0 or batch == 0:
            return _pad(np.zeros((batch, 0), np.int64), np.zeros((batch, 0), np.float32), batch, k)
        rows = min(batch, self.ROWS)
        buf = getattr(self._local, "buffer", None)  # all zeros between calls
        if buf is None or buf.shape != (rows, n):
            buf = self._local.buffer = np.zeros((rows, n), np.float32)
        out_ids, out_vals = [], []
        term_rows = terms.tolist()
        try:
            for lo in range(0, batch, rows):
                chunk = term_rows[lo:lo + rows]
                touched = sum(self._accumulate(buf[r], indptr, docs, weights, ts) for r, ts in enumerate(chunk))
                vals, ids = host._host.topk(buf[:len(chunk)], min(k, n))
                out_ids.append(ids)
                out_vals.append(vals)
                if touched > buf.size // 4:
                    buf.fill(0.0)
                else:
                    for r, ts in enumerate(chunk):
                        for t in ts:
                            if t >= 0:
                                buf[r, docs[indptr[t]:indptr[t + 1]]] = 0.0
        except BaseException:
            buf.fill(0.0)
            raise
        return _pad(np.concatenate(out_ids), np.concatenate(out_vals), batch, k)

    def augment(self, dev, ids, scores, queries, texts, budget, separator):
        return augment(np.asarray(ids), np.asarray(scores), queries, texts, budget, separator)


# --- torch ---------------------------------------------------------------------------------------

class TorchBM25:
    """torch on CPU or GPU: prepare's tokenization and postings are the host's (Python and
    scipy) moved to the device, weights are computed on it; relevancy gathers every query
    token's postings and adds them with one index_add_; retrieval is an exact top-k with the
    tie rule (torch.topk, then, in rows with ties at the k-th score, the lowest tied ids),
    ranked by id and then by a stable sort on the score."""

    def __init__(self, method: BM25Retrieval):
        self.method = method

    @staticmethod
    def _to(dev, *arrays):
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(dev.handle) for a in arrays)

    def tokenize(self, dev, texts, vocab, tokenizer):
        ids, lengths, vocab = tokenize_documents(texts, vocab, tokenizer)
        return (*self._to(dev, ids, lengths), vocab)

    def build_postings(self, dev, indptr, docs, tf, doc_len, ids, lengths, n_terms):
        old = (None,) * 4 if indptr is None else tuple(_numpy(a) for a in (indptr, docs, tf, doc_len))
        return self._to(dev, *build_postings(*old, _numpy(ids), _numpy(lengths), n_terms))

    def weigh(self, dev, indptr, docs, tf, doc_len, k1, b):
        """weigh() in torch float64 on the device (the same IEEE operations, so the same
        float32 weights); idf on the host, as float32."""
        n = doc_len.shape[0]
        if docs.numel() == 0:
            return torch.zeros(0, dtype=torch.float32, device=docs.device)
        doc_freq = torch.diff(indptr)
        idf = torch.from_numpy(idf32(_numpy(doc_freq), n)).to(docs.device, torch.float64)
        avgdl = float(doc_len.sum(dtype=torch.int64)) / n
        tf64 = tf.to(torch.float64)
        dl = doc_len.to(torch.float64)[docs.long()]
        idf = torch.repeat_interleave(idf, doc_freq)
        return (idf * (tf64 / (k1 * ((1.0 - b) + b * dl / avgdl) + tf64))).to(torch.float32)

    def encode_query(self, dev, queries, vocab, tokenizer):
        return self._to(dev, encode_queries(queries, vocab, tokenizer))[0]

    def load_index(self, dev, indptr, docs, weights):
        return indptr, docs, weights

    def relevancy(self, dev, indptr, docs, weights, terms, n):
        """One index_add_ over the query tokens' postings, in (query, token, posting) order:
        on the CPU each document's sum is formed in query-token order, as on the host."""
        batch = terms.shape[0]
        device = weights.device
        scores = torch.zeros(batch, n, dtype=torch.float32, device=device)
        t = terms.long()
        q_idx, j_idx = (t >= 0).nonzero(as_tuple=True)
        if n == 0 or q_idx.numel() == 0:
            return scores
        tt = t[q_idx, j_idx]
        starts = indptr[tt]
        counts = indptr[tt + 1] - starts
        total = int(counts.sum())
        if total == 0:
            return scores
        pair = torch.repeat_interleave(torch.arange(tt.numel(), device=device), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = starts[pair] + torch.arange(total, device=device) - first[pair]
        target = q_idx[pair] * n + docs[pos].long()
        scores.view(-1).index_add_(0, target, weights[pos])
        return scores

    def retrieval(self, dev, scores, k):
        """(ids int64 [B, k], scores float32 [B, k]), ranked, -1 / -inf padded."""
        batch, n = scores.shape
        kk = min(k, n)
        ids = torch.full((batch, k), -1, dtype=torch.int64, device=scores.device)
        vals = torch.full((batch, k), -math.inf, dtype=torch.float32, device=scores.device)
        if kk == 0 or batch == 0:
            return ids, vals
        # one more than k: the row has ties at the k-th score iff the (k+1)-th equals it
        top_vals, top_ids = torch.topk(scores, min(kk + 1, n), dim=1)
        kth = top_vals[:, kk - 1:kk]
        if kk < n:
            tied_rows = (top_vals[:, kk] == kth[:, 0]).nonzero()[:, 0]
        else:
            tied_rows = torch.zeros(0, dtype=torch.long, device=scores.device)
        top_vals, top_ids = top_vals[:, :kk].contiguous(), top_ids[:, :kk].contiguous()
        if tied_rows.numel():  # ties at the k-th score: torch.topk's pick among them is arbitrary
            sub, sub_kth = scores[tied_rows], kth[tied_rows]
            above = sub > sub_kth
            tied = sub == sub_kth
            take = above | (tied & (torch.cumsum(tied, 1, dtype=torch.int32) <= kk - above.sum(1, keepdim=True)))
            top_ids[tied_rows] = take.nonzero()[:, 1].view(-1, kk)  # the lowest ids among the ties
            top_vals[tied_rows] = sub.gather(1, top_ids[tied_rows])
        # rank: by id, then stably by descending score (equal scores stay in ascending id order)
        by_id = torch.argsort(top_ids, dim=1)
        top_ids, top_vals = top_ids.gather(1, by_id), top_vals.gather(1, by_id)
        order = torch.sort(top_vals, dim=1, descending=True, stable=True).indices
        ids[:, :kk] = top_ids.gather(1, order)
        vals[:, :kk] = top_vals.gather(1, order)
        return ids, vals

    def augment(self, dev, ids, scores, queries, texts, budget, separator):
        return augment(ids.cpu().numpy(), scores.cpu().numpy(), queries, texts, budget, separator)


# --- OpenCL ----------------------------------------------------------------------------------------

class OpenCLBM25:
    """Relevancy and retrieval as OpenCL kernels (fpga_kernels/bm25.cl): document-blocked
    scoring without atomics, per-block private top-k lists merged per query, and their fusion.
    Prepare (string processing) and apply (prompts) are not OpenCL work."""

    def __init__(self, method: BM25Retrieval):
        self.method = method

    def _program(self, dev):
        from . import _bm25_cl as kernels

        defines = kernels.defines(self.method.k)
        return opencl.queue(dev), opencl.program(dev, kernels.KERNEL_FILE, defines), kernels, defines["K_MAX"]

    def load_index(self, dev, indptr, docs, weights):
        return (indptr, docs, weights), []

    def relevancy(self, dev, indptr, docs, weights, terms, n):
        q, prg, kernels, _ = self._program(dev)
        return kernels.relevancy(q, prg, indptr, docs, weights, terms, n)

    def retrieval(self, dev, scores, k):
        q, prg, kernels, k_max = self._program(dev)
        return kernels.retrieval(q, prg, scores, k, k_max)

    def relevancy_retrieval(self, dev, indptr, docs, weights, terms, n, k):
        q, prg, kernels, k_max = self._program(dev)
        return kernels.relevancy_retrieval(q, prg, indptr, docs, weights, terms, n, k, k_max)
