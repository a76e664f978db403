"""Retrieval: queries/second and latency of BM25 against bm25s and of dense flat search
against faiss, 10K to 1M documents, on every hetero placement this machine has.

Corpus: `hetero.corpus.scale_up` of the standard library's docstrings (`corpus.stdlib()`,
~3.6K real documents) to each size (`--sizes`, default 10K, 100K, 1M: all larger than the
real corpus, so all synthetic, with its term statistics). Queries: real ones
(`corpus.queries`); each timed call gets its own batch (`--batches`, default 1 and 32), and
every implementation gets the same batches, in an interleaved order (call r of every
implementation, then call r + 1, the order rotated each round), so machine noise hits all.

BM25 (Lucene idf, k1 = 1.2, b = 0.75, top 10):
  - baseline: bm25s `BM25(method="lucene")` indexing hetero's own token lists of the
    documents (the same tokens, as tests/test_bm25.py feeds it), timed as its `retrieve(query
    tokens, k=10)` with its default numpy backend: sequential (`n_threads=0`, its default)
    and with `n_threads` = the cores; the faster of the two in this run is the baseline;
  - hetero `BM25Retrieval(k=10)` on every placement it can run.
Dense (hetero's default `HashingEmbedder`, dim 384, float32, inner product, top 10):
  - baseline: faiss `IndexFlatIP` over the same embeddings, timed as `index.search(query
    embeddings, 10)`: with faiss' defaults, with one OpenMP thread (`omp_set_num_threads(1)`:
    its batch-1 scan was faster so on this machine), and forced onto its BLAS path
    (`distance_compute_blas_threshold=1`); the fastest in this run is the baseline;
  - hetero `DenseRetrieval(k=10)` on every placement it can run. The documents are embedded
    once per size and handed to every placement's prepare (an embedder that returns that
    matrix for that corpus and hashes anything else, the queries included).

What is timed: hetero's queries/second and latency are from the wall time of the whole
`pipe.step(queries, memory)` (query tokenization or embedding, relevancy, retrieval, and
apply, which also builds each query's augmented prompt): what a user gets. The baselines'
are from their search call alone, on queries tokenized or embedded beforehand, with no
prompts: the comparison is conservative for hetero. Relevancy + retrieval device time
(`pipe.last_run.by_step()`) is reported beside it. Index building (hetero's prepare per
placement, bm25s' index, the embedding) is timed once and reported separately.

Answers: every implementation's top 10 of every timed query is compared with the baseline's
(bm25s sequential; faiss with its defaults), the baseline's list ranked by (score descending,
id ascending) as hetero ranks: "identical" lists, and "same up to ties" (the same scores,
the lists differing only in which of equally scored documents are kept or in their order:
BM25 scores exactly equal (bm25s's own float32 scores), dense within 1e-6 of each other in
float64 over the stored float32 embeddings).

Bandwidth efficiency: the bytes relevancy + retrieval must read (BM25: the postings of the
query tokens, 4 B id + 4 B weight each; dense: N x 384 x 4 B per call), over relevancy +
retrieval device time (the baselines: their call's wall time), as a share of the copy
bandwidth measured in this run on the relevancy device (the baselines: torch:cpu's) via
`hetero.backends.BACKENDS[d.backend].copy_bandwidth(d)`, the best of a measurement at the
start and one at the end. The JSON also has the bytes of the methods' cost models
(`method.workload`).

    python bench/retrieval.py                                  # ~11 min on 2 cores
    python bench/retrieval.py --methods bm25 --sizes 10000 100000 --repeats 5

Writes bench/results/<name>.{json,md} (default name retrieval).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero import corpus  # noqa: E402
from hetero.backends import BACKENDS  # noqa: E402
from hetero.demo import placements_present  # noqa: E402
from hetero.methods import BM25Retrieval, DenseRetrieval  # noqa: E402
from hetero.methods import bm25 as bm25_mod  # noqa: E402
from hetero.methods.dense import HashingEmbedder  # noqa: E402
from hetero.records import MEMORY_STEPS  # noqa: E402
from hetero.runtime import Placement, PlacementError, Step  # noqa: E402

K = 10
DIM = 384
DENSE_TOL = 1e-6  # dense scores closer than this count as tied


# --- machine load ------------------------------------------------------------------------

class CpuMeter:
    """Share of the machine's CPUs used by other processes since the last `take()`: the
    busy time /proc/stat counts, less this process's own CPU time."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1
        self._last = self._now()

    def _busy(self) -> float | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / self.tick

    def _now(self):
        t = os.times()
        return time.perf_counter(), self._busy(), t.user + t.system

    def take(self) -> float | None:
        now = self._now()
        (w0, b0, o0), (w1, b1, o1) = self._last, now
        self._last = now
        if b0 is None or b1 is None or w1 <= w0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / ((w1 - w0) * self.cores))


# --- implementations and their timing ------------------------------------------------------

@dataclass
class Impl:
    """One thing timed: `call(i)` runs batch i (0: the warm-up) and returns (wall seconds,
    ids [B, k], scores [B, k], per-step device seconds or None)."""

    name: str
    kind: str  # "baseline" or "hetero"
    call: object
    info: dict = field(default_factory=dict)
    walls: list = field(default_factory=list)
    rr: list = field(default_factory=list)  # relevancy + retrieval seconds per call (hetero)
    per_step: dict = field(default_factory=dict)
    outputs: list = field(default_factory=list)  # (ids, scores) per timed call
    error: str | None = None


def hetero_impl(name, pipe, memory, batches, info) -> Impl:
    def call(i):
        start = time.perf_counter()
        out = pipe.step(batches[i], memory)
        wall = time.perf_counter() - start
        return wall, out.ids.numpy(), out.scores.numpy(), pipe.last_run.by_step()
    return Impl(name, "hetero", call, {"placement": repr(pipe.placement), **info})


def time_interleaved(impls: list[Impl], repeats: int, log) -> None:
    """A warm-up call each, then `repeats` rounds of one call each, the order rotated."""
    for impl in impls:
        try:
            impl.call(0)
        except Exception as exc:  # a broken implementation is reported, the others go on
            impl.error = f"{type(exc).__name__}: {exc}"
            log(f"    {impl.name}: FAILED {impl.error}")
    live = [m for m in impls if m.error is None]
    for r in range(repeats):
        for impl in live[r % len(live):] + live[:r % len(live)]:
            if impl.error is not None:
                continue
            try:
                wall, ids, vals, steps = impl.call(r + 1)
            except Exception as exc:
                impl.error = f"{type(exc).__name__}: {exc}"
                log(f"    {impl.name}: FAILED {impl.error}")
                continue
            impl.walls.append(wall)
            impl.outputs.append((np.asarray(ids), np.asarray(vals)))
            if steps is not None:
                impl.rr.append(sum(s for k, s in steps.items() if k in MEMORY_STEPS))
                for k, s in steps.items():
                    impl.per_step.setdefault(k, []).append(s)


def _ranked(ids, vals):
    """One query's list ranked as hetero ranks: score descending, equal scores by id."""
    order = np.lexsort((ids, -vals.astype(np.float64)))
    return ids[order], vals[order]


def compare(ours, theirs, score_of, tol: float) -> tuple[str, bool]:
    """('identical' | 'ties' | 'differs', whether the float32 scores are bit-equal) for one
    query's top-k, both lists ranked by (score descending, id ascending): 'ties' when the
    exact scores (score_of) of the two lists are the same multiset within `tol`, so they
    differ only in which of equally scored documents they keep, or in their order."""
    a_ids, a_vals = _ranked(*ours)
    b_ids, b_vals = _ranked(*theirs)
    same_scores = bool(np.array_equal(a_vals, b_vals))
    if np.array_equal(a_ids, b_ids):
        return "identical", same_scores
    sa = np.sort(score_of(a_ids))
    sb = np.sort(score_of(b_ids))
    tied = sa.shape == sb.shape and bool(np.all(np.abs(sa - sb) <= tol))
    return ("ties" if tied else "differs"), same_scores


def agreement(impl: Impl, reference: Impl, score_of, tol: float) -> dict:
    """Counts of compare() over every timed query (score_of(call, row, ids) -> exact scores)."""
    counts = {"identical": 0, "ties": 0, "differs": 0, "scores_bit_equal": 0, "queries": 0}
    for r, ((a_ids, a_vals), (b_ids, b_vals)) in enumerate(zip(impl.outputs, reference.outputs)):
        for row in range(len(a_ids)):
            verdict, same = compare((a_ids[row], a_vals[row]), (b_ids[row], b_vals[row]),
                                    lambda ids: score_of(r, row, ids), tol)
            counts[verdict] += 1
            counts["scores_bit_equal"] += same
            counts["queries"] += 1
    return counts


def summarize(impl: Impl, batch: int, bytes_per_call: list[float], model_bytes: float | None,
              copy_device: str, agree: dict | None) -> dict:
    """The row of one implementation at one batch size (bandwidth efficiencies are filled in
    at the end of the run, against the run's best copy bandwidth of `copy_device`)."""
    if impl.error is not None and not impl.walls:
        return {"implementation": impl.name, "kind": impl.kind, "error": impl.error, **impl.info}
    median = statistics.median(impl.walls)
    times = impl.rr if impl.rr else impl.walls  # what relevancy + retrieval took
    rates = [b / t for b, t in zip(bytes_per_call, times) if t > 0]
    row = {
        "implementation": impl.name, "kind": impl.kind, **impl.info,
        "median_ms": 1e3 * median, "qps": batch / median, "samples_ms": [1e3 * w for w in impl.walls],
        "min_ms": 1e3 * min(impl.walls), "max_ms": 1e3 * max(impl.walls),
        "relevancy_retrieval_ms": 1e3 * statistics.median(times) if impl.rr else None,
        "per_step_ms": {k: 1e3 * statistics.median(v) for k, v in impl.per_step.items()},
        "bytes_read_per_call": statistics.mean(bytes_per_call),
        "GBps": statistics.median(rates) / 1e9 if rates else None,
        "copy_device": copy_device,
        "model_bytes_per_call": model_bytes,
        "model_GBps": model_bytes / statistics.median(times) / 1e9 if model_bytes is not None and impl.rr else None,
        "agreement": agree,
    }
    if impl.error is not None:
        row["error"] = impl.error
    return row


def model_bytes(method, memory, queries, placement) -> float:
    """Bytes relevancy + retrieval move in one call by the method's cost model."""
    shapes = method.shapes_of(memory, queries)
    backends = {s: placement[s].backend for s in hetero.STEPS}
    work = method.workload(shapes, backends, method.fused(placement), appended=0)
    return float(sum(a.nbytes for t in work.tasks if t.step in (Step.RELEVANCY, Step.RETRIEVAL) for a in t.accesses))


def placements_for(method) -> tuple[dict, dict]:
    """(name -> placement the method can run, name -> why not): the placements present
    (each device alone, and `mixed`: prepare/apply on torch, relevancy+retrieval on OpenCL)
    plus relevancy+retrieval on OpenCL with prepare/apply on the host shim, and for dense
    torch scoring with the shim's top-k."""
    ids = [d.id for d in hetero.devices()]
    cl = next((d.id for d in hetero.devices() if d.backend == "opencl"), None)
    candidates = dict(placements_present())
    if cl and "host" in ids:
        candidates["opencl+host"] = {"prepare": "host", "relevancy": cl, "retrieval": cl, "apply": "host"}
    if isinstance(method, DenseRetrieval) and "host" in ids:
        candidates["torch+host-topk"] = {"prepare": "torch:cpu", "relevancy": "torch:cpu", "retrieval": "host",
                                         "apply": "torch:cpu"}
    ok, skipped = {}, {}
    for name, placement in candidates.items():
        try:
            Placement.resolve(method, placement)
            ok[name] = placement
        except PlacementError as exc:
            skipped[name] = str(exc)
    return ok, skipped


def query_batches(queries: list[str], batch: int, repeats: int) -> list[list[str]]:
    """repeats + 1 disjoint batches (the first is the warm-up)."""
    return [queries[i * batch:(i + 1) * batch] for i in range(repeats + 1)]


# --- BM25 -----------------------------------------------------------------------------------

def bm25s_tokens(method: BM25Retrieval, texts) -> list[list[str]]:
    """Every document's tokens by hetero's tokenizer (its bulk path: the same tokens as
    `method.tokenize`, tested), as lists of str for bm25s."""
    vocab = bm25_mod._new_vocabulary(method.stopwords, True)
    ids, lengths, vocab = bm25_mod.tokenize_documents(texts, vocab)
    words = np.array(vocab.terms(), dtype=object)
    flat = words[ids].tolist()
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    return [flat[e - n:e] for n, e in zip(lengths.tolist(), ends)]


def run_bm25(n, docs, queries, args, log) -> tuple[dict, list[dict]]:
    import bm25s

    method = BM25Retrieval(k=K)
    placements, skipped = placements_for(method)
    info = {"method": "bm25", "documents": n, "repr": repr(method), "skipped": skipped, "build_s": {}}
    pipes = {}
    for name, placement in placements.items():
        pipe = hetero.Pipeline(method, placement)
        start = time.perf_counter()
        memory = pipe.prepare(docs)
        info["build_s"][f"hetero {name} prepare"] = time.perf_counter() - start
        pipes[name] = (pipe, memory)
        log(f"  bm25 {n:>9,} hetero {name} prepare {info['build_s'][f'hetero {name} prepare']:.1f} s")
    start = time.perf_counter()
    tokens = bm25s_tokens(method, docs)
    info["build_s"]["tokenize for bm25s (hetero tokenizer)"] = time.perf_counter() - start
    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    start = time.perf_counter()
    retriever.index(tokens, show_progress=False)
    info["build_s"]["bm25s index"] = time.perf_counter() - start
    del tokens
    gc.collect()
    log(f"  bm25 {n:>9,} bm25s tokens {info['build_s']['tokenize for bm25s (hetero tokenizer)']:.1f} s, "
        f"index {info['build_s']['bm25s index']:.1f} s")
    first_memory = next(iter(pipes.values()))[1]
    info["memory"] = repr(first_memory)
    rows = []
    cores = os.cpu_count() or 1
    for batch in args.batches:
        batches = query_batches(queries, batch, args.repeats)
        q_tokens = [[method.tokenize(q) for q in qs] for qs in batches]

        def bm25s_call(threads):
            def call(i):
                start = time.perf_counter()
                ids, vals = retriever.retrieve(q_tokens[i], k=K, show_progress=False, n_threads=threads)
                return time.perf_counter() - start, ids, vals, None
            return call

        impls = [Impl("bm25s (n_threads=0, default)", "baseline", bm25s_call(0)),
                 Impl(f"bm25s (n_threads={cores})", "baseline", bm25s_call(cores))]
        impls += [hetero_impl(name, pipe, memory, batches, {"fused": method.fused(pipe.placement)})
                  for name, (pipe, memory) in pipes.items()]
        time_interleaved(impls, args.repeats, log)
        # the postings the timed queries' tokens read: 4 B id + 4 B weight each
        vocab, df = first_memory.vocab, first_memory.doc_freq
        read = [8.0 * sum(int(df[vocab[t]]) for toks in q_tokens[i + 1] for t in toks if vocab.get(t, -1) >= 0)
                for i in range(args.repeats)]
        full_scores = {}

        def score_of(r, row, ids):
            key = (r, row)
            if key not in full_scores:
                full_scores[key] = retriever.get_scores(q_tokens[r + 1][row])
            return full_scores[key][ids].astype(np.float64)

        reference = impls[0]
        for impl in impls:
            placement = pipes[impl.name][0].placement if impl.kind == "hetero" else None
            dev = placement[Step.RELEVANCY].id if placement is not None else "torch:cpu"
            mb = statistics.mean(model_bytes(method, pipes[impl.name][1], batches[i + 1], placement)
                                 for i in range(args.repeats)) if placement is not None else None
            agree = agreement(impl, reference, score_of, 0.0) if impl.outputs and reference.outputs else None
            rows.append({"method": "bm25", "documents": n, "batch": batch,
                         **summarize(impl, batch, read, mb, dev, agree)})
        log_rows(rows[-len(impls):], log)
    return info, rows


# --- dense ----------------------------------------------------------------------------------

class PreEmbedded(HashingEmbedder):
    """The hashing embedder, returning the matrix computed once for one corpus when given
    that corpus (so each placement's prepare does not embed 1M documents again) and hashing
    anything else (the queries)."""

    def __init__(self, dim: int, documents, matrix: np.ndarray):
        super().__init__(dim)
        self.documents, self.matrix = documents, matrix

    def __call__(self, texts) -> np.ndarray:
        if self.documents is not None and texts is self.documents:
            return self.matrix
        return super().__call__(texts)

    def forget(self) -> None:
        self.documents = self.matrix = None


def run_dense(n, docs, queries, args, log) -> tuple[dict, list[dict]]:
    import faiss

    embedder = HashingEmbedder(DIM)
    start = time.perf_counter()
    matrix = embedder(docs)
    info = {"method": "dense", "documents": n, "build_s": {"hashing embedding of the documents":
                                                           time.perf_counter() - start}}
    log(f"  dense {n:>8,} embedding {info['build_s']['hashing embedding of the documents']:.1f} s")
    start = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(matrix)
    info["build_s"]["faiss IndexFlatIP add"] = time.perf_counter() - start
    stored = faiss.rev_swig_ptr(index.get_xb(), n * DIM).reshape(n, DIM)  # faiss' own copy, for checks
    pre = PreEmbedded(DIM, docs, matrix)
    method = DenseRetrieval(k=K, embed=pre)
    info["repr"] = repr(method).replace("PreEmbedded", "HashingEmbedder")
    placements, skipped = placements_for(method)
    info["skipped"] = skipped
    pipes = {}
    for name, placement in placements.items():
        pipe = hetero.Pipeline(method, placement)
        start = time.perf_counter()
        memory = pipe.prepare(docs)
        info["build_s"][f"hetero {name} prepare (embedding reused)"] = time.perf_counter() - start
        pipes[name] = (pipe, memory)
        log(f"  dense {n:>8,} hetero {name} prepare {time.perf_counter() - start:.1f} s (embedding reused)")
    pre.forget()
    del matrix
    gc.collect()
    rows = []
    default_threshold = faiss.cvar.distance_compute_blas_threshold
    default_threads = faiss.omp_get_max_threads()
    for batch in args.batches:
        batches = query_batches(queries, batch, args.repeats)
        embedded = [np.ascontiguousarray(embedder(qs), dtype=np.float32) for qs in batches]

        def faiss_call(threshold, threads):
            def call(i):
                faiss.cvar.distance_compute_blas_threshold = threshold
                faiss.omp_set_num_threads(threads)
                try:
                    start = time.perf_counter()
                    vals, ids = index.search(embedded[i], K)
                    wall = time.perf_counter() - start
                finally:
                    faiss.cvar.distance_compute_blas_threshold = default_threshold
                    faiss.omp_set_num_threads(default_threads)
                return wall, ids, vals, None
            return call

        impls = [Impl(f"faiss IndexFlatIP (defaults: {default_threads} OpenMP threads, BLAS from "
                      f"{default_threshold:,} queries)", "baseline", faiss_call(default_threshold, default_threads)),
                 Impl("faiss IndexFlatIP (1 OpenMP thread)", "baseline", faiss_call(default_threshold, 1)),
                 Impl("faiss IndexFlatIP (BLAS path: distance_compute_blas_threshold=1)", "baseline",
                      faiss_call(1, default_threads))]
        impls += [hetero_impl(name, pipe, memory, batches, {"fused": method.fused(pipe.placement)})
                  for name, (pipe, memory) in pipes.items()]
        time_interleaved(impls, args.repeats, log)
        read = [float(n * DIM * 4)] * args.repeats

        def score_of(r, row, ids):
            return stored[ids].astype(np.float64) @ embedded[r + 1][row].astype(np.float64)

        reference = impls[0]
        for impl in impls:
            placement = pipes[impl.name][0].placement if impl.kind == "hetero" else None
            dev = placement[Step.RELEVANCY].id if placement is not None else "torch:cpu"
            mb = model_bytes(method, pipes[impl.name][1], batches[1], placement) if placement is not None else None
            agree = agreement(impl, reference, score_of, DENSE_TOL) if impl.outputs and reference.outputs else None
            rows.append({"method": "dense", "documents": n, "batch": batch,
                         **summarize(impl, batch, read, mb, dev, agree)})
        log_rows(rows[-len(impls):], log)
    return info, rows


# --- report ---------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _agree(a: dict | None) -> str:
    """'96/96 (88 identical; scores bit-equal 96)': same up to ties / queries."""
    if not a:
        return "-"
    q, same = a["queries"], a["identical"] + a["ties"]
    text = f"{same}/{q} ({a['identical']} identical; scores bit-equal {a['scores_bit_equal']})"
    return text + (f", **{a['differs']} DIFFER**" if a["differs"] else "")


def log_rows(rows, log) -> None:
    for r in rows:
        if "qps" not in r:
            log(f"    {r['implementation']:<66} FAILED {r.get('error')}")
            continue
        log(f"    {r['method']:<5} {r['documents']:>9,} b{r['batch']:<3} {r['implementation']:<66} "
            f"{r['qps']:9.1f} q/s {r['median_ms']:9.2f} ms  rel+ret {_fmt(r['relevancy_retrieval_ms'], '.2f')} ms  "
            f"{_fmt(r['GBps'], '.2f')} GB/s  {_agree(r['agreement'])}")


def add_ratios(rows) -> list[dict]:
    """Each row's QPS over the best baseline's of its (method, documents, batch); the
    summary: best hetero vs best baseline per cell."""
    summary = []
    cells = sorted({(r["method"], r["documents"], r["batch"]) for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    for cell in cells:
        mine = [r for r in rows if (r["method"], r["documents"], r["batch"]) == cell and "qps" in r]
        base = [r for r in mine if r["kind"] == "baseline"]
        ours = [r for r in mine if r["kind"] == "hetero"]
        if not base:
            continue
        best_base = max(base, key=lambda r: r["qps"])
        for r in mine:
            r["vs_baseline"] = r["qps"] / best_base["qps"]
            r["baseline"] = best_base["implementation"]
        if ours:
            best = max(ours, key=lambda r: r["qps"])
            summary.append({"method": cell[0], "documents": cell[1], "batch": cell[2],
                            "hetero_best": best["implementation"], "hetero_qps": best["qps"],
                            "hetero_median_ms": best["median_ms"], "baseline": best_base["implementation"],
                            "baseline_qps": best_base["qps"], "baseline_median_ms": best_base["median_ms"],
                            "ratio": best["qps"] / best_base["qps"], "agreement": best["agreement"]})
    return summary


def judged(summary, sizes) -> list[dict]:
    """The issue's bar at the largest size (>= 1M): BM25 >= 1x bm25s, dense batch 1 >= 0.8x faiss."""
    top = max(sizes)
    out = []
    for s in summary:
        if s["documents"] != top:
            continue
        if s["method"] == "bm25":
            out.append({**s, "target": 1.0, "met": s["ratio"] >= 1.0})
        elif s["method"] == "dense" and s["batch"] == 1:
            out.append({**s, "target": 0.8, "met": s["ratio"] >= 0.8})
    return out


PLACEMENT_NOTES = {
    "torch:cpu": "every step on torch:cpu",
    "host": "every step on the C++ host shim (dense: faiss inside)",
    "mixed": "prepare/apply torch:cpu, relevancy+retrieval on OpenCL",
    "opencl+host": "prepare/apply host shim, relevancy+retrieval on OpenCL",
    "torch+host-topk": "relevancy on torch:cpu, retrieval (top-k) on the host shim",
}


def markdown(info, args, payload) -> str:
    cores = info["cores"]
    load = payload["load"]
    vers = info["versions"]
    text = (f"# Retrieval: queries/second and latency, hetero vs bm25s (BM25) and faiss (dense flat)\n\n"
            f"{info['date']} on {info['cpu']} ({cores} cores, {info['torch_threads']} torch threads), "
            f"torch {vers['torch']}, numpy {vers['numpy']}, pyopencl {vers['pyopencl']}, PoCL "
            f"{vers['pocl-binary-distribution']}, bm25s {payload['versions']['bm25s']}, faiss-cpu "
            f"{payload['versions']['faiss-cpu']}, hetero {vers['hetero']}. Median of {args.repeats} interleaved calls "
            f"per implementation and batch size (each call its own batch of real queries), after one warm-up call. "
            f"Run took {payload['total_s'] / 60:.1f} min.\n\n"
            f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load['before'])}; after: "
            f"{', '.join(f'{x:.2f}' for x in load['after'])} (after includes this benchmark's own load)\n"
            f"- other processes' share of the {cores} CPUs while each size ran: "
            + ", ".join(f"{c['method']} {c['documents']:,}: {_fmt(c['others_cpu_share'], '.0%')}" for c in payload["cells"])
            + "\n" + "\n".join(f"- copy bandwidth on {k} (read + write, best of start/end of run): {v:.1f} GB/s"
                               for k, v in payload["copy_GBps"].items()) + "\n")
    busy = [c["others_cpu_share"] for c in payload["cells"] if c["others_cpu_share"] is not None]
    if max(busy, default=0) > 0.25:
        text += ("\n**The machine was shared and loaded during this run** (other processes: see the figures "
                 "above); absolute numbers are lower than on an idle machine. Every implementation was timed "
                 "interleaved with the others, so the ratios hold better than the absolute figures.\n")
    elif max(busy, default=0) > 0.03:
        text += (f"\nThe machine was shared: other processes took up to {max(busy):.0%} of the CPUs while a size "
                 f"ran (figures above). Every implementation was timed interleaved with the others, so that load "
                 f"hit all of them alike.\n")
    text += ("\nHow to read it:\n"
             "- hetero's QPS is from the wall time of the whole `pipe.step(queries, memory)`: query encoding "
             "(BM25 tokens; dense: the hashing embedding), relevancy, retrieval and apply, which also builds every "
             "query's augmented prompt. The baselines' is their search call alone (bm25s `retrieve` on token "
             "lists; faiss `search` on query embeddings), no prompts. QPS = batch / median latency.\n"
             "- x baseline: QPS over the best baseline's in the same cell.\n"
             "- rel+ret ms: relevancy + retrieval device time inside hetero's step (`last_run.by_step()`).\n"
             "- agreement: of the timed queries, how many top-10 lists equal the reference baseline's (bm25s "
             "sequential; faiss defaults) up to ties, and how many are identical (the baseline's list ranked by "
             "score descending, id ascending). BM25 ties: bit-equal scores; dense: within 1e-6 (documents whose "
             "word counts are proportional, e.g. 'a b' and 'a b a b', embed to one direction up to float32 rounding, "
             "which faiss and torch round differently). The synthetic corpus resamples 3.6K real documents, so such "
             "ties are common at the top of a list, and which of them a list keeps (hetero: the lowest ids; faiss "
             "and bm25s: any) is what 'identical' misses.\n"
             "- bytes: what relevancy + retrieval must read per call (BM25: the query tokens' postings x (4 B id "
             "+ 4 B weight); dense: N x 384 x 4 B); GB/s over rel+ret time (baselines: their call's time); of "
             "copy BW: that over the relevancy device's copy bandwidth (baselines: torch:cpu's). BM25's time is "
             "mostly the per-document score array (N x 4 B written, then scanned for the top 10) and scattered "
             "adds, which this count leaves out, so its share is small by construction.\n"
             "- placements: " + "; ".join(f"`{k}`: {v}" for k, v in PLACEMENT_NOTES.items())
             + ". The OpenCL device alone cannot run prepare (string processing / embedding): skipped. Dense `host` "
               "is faiss's search made exact in its ties: each row whose 10th and 11th scores tie is searched "
               "again, alone and wider, to keep the lowest ids, so on this corpus it is slow.\n")
    summary = payload["summary"]
    if summary:
        text += "\n## Summary: best hetero placement vs the best baseline\n\n"
        text += md_table(["method", "documents", "batch", "hetero best (placement)", "hetero QPS", "hetero ms",
                          "baseline", "baseline QPS", "baseline ms", "ratio", "agreement"],
                         [[s["method"], f"{s['documents']:,}", s["batch"], s["hetero_best"], f"{s['hetero_qps']:.1f}",
                           f"{s['hetero_median_ms']:.2f}", s["baseline"], f"{s['baseline_qps']:.1f}",
                           f"{s['baseline_median_ms']:.2f}", f"{s['ratio']:.2f}x", _agree(s["agreement"])]
                          for s in summary])
    if payload["judged"]:
        text += "\nThe issue's bar at " + f"{max(args.sizes):,} documents:\n\n"
        for j in payload["judged"]:
            what = "at least match bm25s" if j["method"] == "bm25" else "reach 80% of faiss flat"
            text += (f"- {j['method']} batch {j['batch']}: {what}: {j['ratio']:.2f}x "
                     f"({j['hetero_best']}) -> **{'met' if j['met'] else 'NOT met'}**\n")
    headers = ["batch", "implementation", "QPS", "median ms (min-max)", "x baseline", "rel+ret ms",
               "agreement (top-10)", "MB read / call", "GB/s", "of copy BW"]
    for cell in payload["methods"]:
        method, n = cell["method"], cell["documents"]
        builds = ", ".join(f"{k} {v:.1f} s" for k, v in cell["build_s"].items())
        text += f"\n## {method}, {n:,} documents\n\n{cell['repr']}"
        if cell.get("memory"):
            text += f"; {cell['memory']}"
        text += f".\n\nIndex building (not in QPS): {builds}.\n"
        for name, why in cell.get("skipped", {}).items():
            text += f"Skipped placement `{name}`: {why}\n"
        if cell.get("error"):
            text += f"\nnot run: {cell['error']}\n"
            continue
        table = []
        for r in (r for r in payload["results"] if r["method"] == method and r["documents"] == n):
            if "qps" not in r:
                table.append([r["batch"], r["implementation"], f"FAILED: {r.get('error')}"] + [""] * 7)
                continue
            name = r["implementation"] if r["kind"] == "baseline" else f"hetero `{r['implementation']}`" + (
                " (fused)" if r.get("fused") else "")
            table.append([r["batch"], name, f"{r['qps']:.1f}", f"{r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f})",
                          _fmt(r.get("vs_baseline"), ".2f"), _fmt(r["relevancy_retrieval_ms"], ".2f"),
                          _agree(r["agreement"]), f"{r['bytes_read_per_call'] / 1e6:.2f}", _fmt(r["GBps"], ".2f"),
                          _fmt(r["bandwidth_efficiency"], ".1%")])
        text += "\n" + md_table(headers, table)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["bm25", "dense"], choices=["bm25", "dense"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="corpus sizes in documents (default 10K 100K 1M)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="queries per call (default 1 32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per implementation and batch (default 10)")
    parser.add_argument("--name", default="retrieval", help="results file stem")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.batches) < 1 or min(args.sizes) < K:
        parser.error(f"--repeats and --batches must be >= 1, --sizes >= {K}")

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    meter = CpuMeter()

    def log(msg):
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    info = machine()
    log(f"load average {load_before}; measuring copy bandwidth")
    devices = hetero.devices()
    copy_start = {d.id: BACKENDS[d.backend].copy_bandwidth(d) for d in devices}
    real = corpus.stdlib()
    queries = corpus.queries(real, (args.repeats + 1) * max(args.batches))
    log(f"real corpus {len(real):,} documents; {len(queries)} real queries; copy bandwidth "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in copy_start.items()))
    results, methods, cells = [], [], []
    runners = {"bm25": run_bm25, "dense": run_dense}
    for n in args.sizes:
        start = time.perf_counter()
        docs = corpus.scale_up(real, n)
        log(f"scale_up to {n:,} documents: {time.perf_counter() - start:.1f} s, {docs.nbytes / 1e6:.0f} MB")
        for name in args.methods:
            meter.take()
            try:
                cell, rows = runners[name](n, docs, queries, args, log)
            except Exception as exc:  # e.g. out of memory at one size: the others still run
                cell, rows = {"method": name, "documents": n, "build_s": {}, "repr": name,
                              "error": f"{type(exc).__name__}: {exc}"}, []
                log(f"  {name} {n:,}: FAILED {cell['error']}")
            cell["others_cpu_share"] = meter.take()
            cell["loadavg_after"] = os.getloadavg()
            methods.append(cell)
            results += rows
            cells.append({"method": name, "documents": n, "others_cpu_share": cell["others_cpu_share"]})
            gc.collect()
        del docs
        gc.collect()
    with warnings.catch_warnings():  # pyopencl's note on a kernel looked up twice
        warnings.simplefilter("ignore")
        copy_end = {d.id: BACKENDS[d.backend].copy_bandwidth(d) for d in devices}
    best_bw = {k: max(copy_start[k], copy_end[k]) for k in copy_start}
    for r in results:  # bandwidth efficiencies against the run's best copy bandwidth of the device
        if "qps" in r:
            bw = best_bw[r["copy_device"]]
            r["copy_GBps"] = bw / 1e9
            r["bandwidth_efficiency"] = r["GBps"] * 1e9 / bw if r["GBps"] is not None else None
            r["model_bandwidth_efficiency"] = r["model_GBps"] * 1e9 / bw if r["model_GBps"] is not None else None
    summary = add_ratios(results)
    versions = {}
    for pkg in ("bm25s", "faiss-cpu", "scipy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    payload = {
        "benchmark": "retrieval", "machine": info, "versions": versions, "k": K, "dim": DIM,
        "sizes": args.sizes, "batches": args.batches, "repeats": args.repeats, "methods_run": args.methods,
        "copy_GBps": {k: v / 1e9 for k, v in best_bw.items()},
        "copy_GBps_start": {k: v / 1e9 for k, v in copy_start.items()},
        "copy_GBps_end": {k: v / 1e9 for k, v in copy_end.items()},
        "load": {"before": load_before, "after": os.getloadavg()}, "cells": cells,
        "total_s": time.perf_counter() - t0, "summary": summary, "judged": judged(summary, args.sizes),
        "methods": methods, "results": results,
    }
    json_path, md_path = write_results(args.name, payload, markdown(info, args, payload))
    log(f"wrote {json_path} and {md_path}")
    for s in summary:
        log(f"{s['method']:<5} {s['documents']:>9,} batch {s['batch']:<3} hetero {s['hetero_best']:<16} "
            f"{s['hetero_qps']:9.1f} q/s vs {s['baseline_qps']:9.1f} q/s ({s['baseline']}): {s['ratio']:.2f}x")
    failed = [f"{m['method']} {m['documents']}" for m in methods if m.get("error")] + [
        f"{r['method']} {r['documents']} b{r['batch']} {r['implementation']}" for r in results if "error" in r]
    bad = [f"{r['method']} {r['documents']} b{r['batch']} {r['implementation']}" for r in results
           if r.get("agreement") and r["agreement"]["differs"]]
    if failed:
        print("FAILED: " + "; ".join(failed))
    if bad:
        print("DISAGREE with the baseline: " + "; ".join(bad))
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
