"""BM25Retrieval: tokenizer, parity with bm25s on the stdlib corpus, every backend against the
numpy float64 reference, append == rebuild, edge cases, prompts, cost model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hetero
from hetero import corpus
from hetero.methods import bm25 as bm25_mod
from hetero.methods import bm25_reference as ref
from hetero.methods.bm25 import BM25Retrieval
from hetero.runtime import PlacementError, Step

from conftest import device_ids

OPENCL = device_ids("opencl")
CL = OPENCL[0] if OPENCL else None


def placements():
    """name -> placement: each backend's relevancy and retrieval, fused and not."""
    out = {"host": "host", "torch": "torch:cpu",
           "torch-prepare": {"prepare": "torch:cpu", "relevancy": "host", "retrieval": "torch:cpu", "apply": "host"},
           "host-scores": {"prepare": "host", "relevancy": "host", "retrieval": "torch:cpu", "apply": "torch:cpu"},
           "host-topk": {"prepare": "torch:cpu", "relevancy": "torch:cpu", "retrieval": "host", "apply": "host"}}
    if CL:
        out["opencl"] = {"prepare": "host", "relevancy": CL, "retrieval": CL, "apply": "torch:cpu"}
        out["opencl-scores"] = {"prepare": "host", "relevancy": CL, "retrieval": "host", "apply": "host"}
        out["opencl-topk"] = {"prepare": "host", "relevancy": "host", "retrieval": CL, "apply": "host"}
    return out


PLACEMENTS = placements()


def run(method, placement, documents, queries):
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(documents)
    return pipe, memory, pipe.step(queries, memory)


def check_topk(ids, vals, ref_scores, k):
    """(ids, vals) [B, k] is a correct ranked top-k of the float64 scores [B, N]: right scores,
    ranked (equal float32 scores by ascending id), -1 padding exactly past N, and no document
    left out that beats a chosen one by more than float32 rounding."""
    batch, n = ref_scores.shape
    assert ids.shape == vals.shape == (batch, k)
    width = min(k, n)
    assert (ids[:, width:] == -1).all() and np.isneginf(vals[:, width:]).all()
    ids, vals = ids[:, :width], vals[:, :width].astype(np.float64)
    assert (ids >= 0).all() and (ids < n).all()
    assert all(len(set(row)) == width for row in ids.tolist())
    expect = np.take_along_axis(ref_scores, ids, 1)
    np.testing.assert_allclose(vals, expect, rtol=1e-5, atol=1e-6)
    assert (np.diff(vals, axis=1) <= 0).all()
    same = np.diff(vals, axis=1) == 0
    assert (np.diff(ids, axis=1)[same] > 0).all()
    if width < n and width:
        left = ref_scores.copy()
        np.put_along_axis(left, ids, -np.inf, 1)
        assert (left.max(1) <= expect.min(1) + 1e-5 * np.abs(expect.min(1)) + 1e-6).all()


# --- tokenizer --------------------------------------------------------------------------------

def test_tokenizer_units():
    assert ref.tokenize("The Quick-brown FOX, a x2 y_z 7 is 42!") == ["quick", "brown", "fox", "x2", "y_z", "42"]
    assert ref.tokenize("") == [] and ref.tokenize("the of and a") == []
    assert ref.tokenize("Ünïcode Naïve CAFÉ ß") == ["ünïcode", "naïve", "café"]
    assert ref.tokenize("the cat", stopwords=()) == ["the", "cat"]
    assert BM25Retrieval().tokenize("Hello the World") == ["hello", "world"]
    assert BM25Retrieval(stopwords=None).tokenize("Hello the World") == ["hello", "the", "world"]
    assert len(ref.STOPWORDS) == 33


def test_tokenizer_matches_bm25s():
    bm25s = pytest.importorskip("bm25s")
    texts = list(corpus.stdlib().texts[:600]) + ["Ünïcode Naïve CAFÉ", "K\u212a ﬁne", "x\x00y a_b"]
    theirs = bm25s.tokenize(texts, lower=True, stopwords="en", return_ids=False, show_progress=False)
    assert [ref.tokenize(t) for t in texts] == [list(t) for t in theirs]


def _bulk_tokens(texts):
    vocab = bm25_mod._new_vocabulary(ref.STOPWORDS, True)
    ids, lengths, vocab = bm25_mod.tokenize_documents(texts, vocab, chunk=64)
    terms = vocab.terms()
    ends = np.cumsum(lengths)
    return [[terms[i] for i in ids[e - n:e]] for n, e in zip(lengths.tolist(), ends.tolist())]


def test_bulk_tokenizer_equals_the_reference_on_the_corpus():
    texts = corpus.stdlib().texts
    assert _bulk_tokens(texts) == [ref.tokenize(t) for t in texts]


@given(st.lists(st.text(alphabet=st.sampled_from(list("aAbZ_09 .,\n\x00-é\u212aßİ")), max_size=30), max_size=12))
def test_bulk_tokenizer_equals_the_reference(texts):
    assert _bulk_tokens(texts) == [ref.tokenize(t) for t in texts]


def test_caller_supplied_tokenizer():
    docs = ["The cat sat", "the dog", "THE CAT the cat"]
    method = BM25Retrieval(k=3, tokenizer=str.split)
    assert method.tokenize("The cat") == ["The", "cat"]
    inputs = (docs,)
    for name in ("host", "torch"):
        _, memory, out = run(method, PLACEMENTS[name], docs, ["the", "THE cat"])
        assert memory.n_terms == 7  # case kept, no stop words
        check_topk(out.ids.numpy(), out.scores.numpy(), method.reference_scores(inputs, ["the", "THE cat"]), 3)
        assert out.ids[0, 0] in (1, 2)
    bad = BM25Retrieval(tokenizer=lambda text: [1, 2])
    with pytest.raises(ValueError, match="tokens must be str"):
        hetero.Pipeline(bad, "host").prepare(docs)
    with pytest.raises(ValueError, match="tokenizer must be"):
        BM25Retrieval(tokenizer="split")


# --- parity with bm25s ------------------------------------------------------------------------

def test_top10_identical_to_bm25s_on_real_queries():
    """Our token lists go to bm25s (method="lucene", k1=1.2, b=0.75); 250 real queries."""
    bm25s = pytest.importorskip("bm25s")
    docs = corpus.stdlib()
    queries = corpus.queries(docs, 250, seed=11)
    method = BM25Retrieval(k=10)
    pipe, memory, out = run(method, "host", docs.texts, queries)
    retriever = bm25s.BM25(k1=1.2, b=0.75, method="lucene")
    retriever.index([method.tokenize(t) for t in docs.texts], show_progress=False)
    q_tokens = [method.tokenize(q) for q in queries]
    their_ids, their_vals = retriever.retrieve(q_tokens, k=10, show_progress=False)
    ours = method.impl("host").relevancy(None, *memory.index, method.impl("host").encode_query(
        None, queries, memory.vocab, None), memory.n_docs)
    ids, vals = out.ids.numpy(), out.scores.numpy()
    exact = 0
    for q in range(len(queries)):
        full = retriever.get_scores(q_tokens[q])
        np.testing.assert_allclose(ours[q], full, rtol=1e-5, atol=1e-6)  # every document's score
        exact += np.array_equal(ours[q], full)
        np.testing.assert_allclose(vals[q], their_vals[q], rtol=1e-5)
        kth = vals[q, -1]
        clear = vals[q] > kth  # above the 10th score: the same documents; at it: any of the ties
        assert set(ids[q][clear]) == set(their_ids[q][their_vals[q] > kth])
        assert set(their_ids[q]) <= set(np.flatnonzero(full >= kth))
    assert exact == len(queries)  # bit for bit: the same float32 weights, summed in the same order
    check_topk(ids, vals, method.reference_scores((docs.texts,), queries), 10)


# --- every backend against the reference ---------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "the", "Zeta", "eta", "theta", "iota"]


@st.composite
def corpora(draw):
    pool = st.lists(st.sampled_from(WORDS), max_size=9).map(" ".join)
    docs = draw(st.lists(pool, min_size=1, max_size=14))
    dup = draw(st.lists(st.integers(0, len(docs) - 1), max_size=4))
    docs = docs + [docs[i] for i in dup]  # duplicates: exact ties
    queries = draw(st.lists(st.lists(st.sampled_from(WORDS + ["unknown"]), max_size=5).map(" ".join),
                            min_size=1, max_size=4))
    k = draw(st.integers(1, len(docs) + 3))
    return docs, queries, k


@settings(max_examples=20)
@given(corpora())
def test_backends_agree_with_the_reference(case):
    docs, queries, k = case
    method = BM25Retrieval(k=k)
    expected = method.reference_scores((docs,), queries)
    results = {}
    for name, placement in PLACEMENTS.items():
        _, memory, out = run(method, placement, docs, queries)
        check_topk(out.ids.numpy(), out.scores.numpy(), expected, k)
        results[name] = (out.ids.numpy(), out.scores.numpy())
    first = results["host"]
    for name, (ids, vals) in results.items():  # float32, one summation order: identical
        np.testing.assert_array_equal(ids, first[0], err_msg=name)
        np.testing.assert_array_equal(vals, first[1], err_msg=name)


def test_reference_step_and_example_inputs():
    method = BM25Retrieval(k=5)
    inputs, query = method.example_inputs(method.shapes(batch=3, documents=500), seed=2)
    assert len(inputs) == 1 and len(inputs[0]) == 500 and len(query) == 3
    ids, vals = method.reference_step(inputs, query)
    assert ids.shape == (3, 1, 5) and vals.shape == (3, 5)
    full = method.reference_scores(inputs, query)
    assert full.shape == (3, 500)
    _, _, out = run(method, "host", *inputs, query)
    np.testing.assert_array_equal(out.ids.numpy(), ids[:, 0])
    np.testing.assert_allclose(out.scores.numpy(), vals, rtol=1e-6)
    (big,), _ = method.example_inputs(method.shapes(documents=5000))
    assert len(big) == 5000 and isinstance(big, corpus.ScaledCorpus)
    (appended,), = method.decode_inputs(inputs, 1)
    assert len(appended) == 1 and isinstance(appended[0], str)


@pytest.mark.skipif(CL is None, reason="no OpenCL device")
def test_opencl_many_blocks_and_large_k(monkeypatch):
    """Several document blocks per query (block lists merged), and k above K_LIMIT (radix
    select + rank_selected), against the host."""
    from hetero.methods import _bm25_cl

    docs = corpus.stdlib().texts
    queries = corpus.queries(corpus.stdlib(), 6, seed=5) + ["zzz unknown", ""]
    monkeypatch.setattr(_bm25_cl, "_MIN_BLOCK", 97)
    for k in (10, 2100):
        method = BM25Retrieval(k=k)
        want = run(method, "host", docs, queries)[2]
        for name in ("opencl", "opencl-topk"):
            got = run(method, PLACEMENTS[name], docs, queries)[2]
            np.testing.assert_array_equal(got.ids.numpy(), want.ids.numpy(), err_msg=f"{name} k={k}")
            np.testing.assert_array_equal(got.scores.numpy(), want.scores.numpy(), err_msg=f"{name} k={k}")


# --- edge cases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_out_of_vocabulary_and_empty_queries_score_zero(name):
    docs = ["alpha beta", "beta gamma", "gamma delta", "alpha"]
    method = BM25Retrieval(k=3)
    queries = ["", "the of and", "unknown words", "Alpha"]
    _, _, out = run(method, PLACEMENTS[name], docs, queries)
    ids, vals = out.ids.numpy(), out.scores.numpy()
    for q in range(3):  # every document scores 0: the lowest ids, prompt = the query alone
        assert ids[q].tolist() == [0, 1, 2] and (vals[q] == 0).all()
        assert out.prompts[q] == queries[q]
    assert ids[3, :2].tolist() == [3, 0] and vals[3, 2] == 0  # shorter document first; then a zero
    assert out.prompts[3] == "alpha\n\nalpha beta\n\nAlpha"


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_empty_corpus_and_k_above_the_corpus(name):
    method = BM25Retrieval(k=4)
    pipe = hetero.Pipeline(method, PLACEMENTS[name])
    memory = pipe.prepare([])
    out = pipe.step(["alpha", "beta gamma"], memory)
    assert (out.ids == -1).all() and torch.isneginf(out.scores).all() and out.ids.shape == (2, 4)
    assert out.prompts == ["alpha", "beta gamma"]
    pipe.append(memory, ["beta", "alpha beta"])
    out = pipe.step("alpha", memory)
    assert out.ids.tolist() == [[1, 0, -1, -1]] and out.scores[0, 1] == 0 and torch.isneginf(out.scores[0, 2:]).all()


def test_bad_inputs():
    pipe = hetero.Pipeline(BM25Retrieval(), "host")
    with pytest.raises(ValueError, match="documents must be a sequence of str"):
        pipe.prepare("one document")
    with pytest.raises(ValueError, match=r"documents\[1\] must be a str"):
        pipe.prepare(["ok", 3])
    with pytest.raises(ValueError, match="documents must be"):
        pipe.prepare(torch.zeros(3))
    memory = pipe.prepare(["alpha beta", "gamma"])
    for query in ([], [1], 5, None):
        with pytest.raises(ValueError, match="query must be a str or a non-empty list of str"):
            pipe.step(query, memory)
    for kwargs, match in ((dict(k=0), "k must"), (dict(k1=-1), "k1 must"), (dict(b=2), "b must"),
                          (dict(prompt_budget=-1), "prompt_budget"), (dict(stopwords="the"), "stopwords")):
        with pytest.raises(ValueError, match=match):
            BM25Retrieval(**kwargs)
    assert pipe.step(("alpha", "gamma"), memory).ids[:, 0].tolist() == [0, 1]  # a tuple of str is a batch


def test_prepare_and_apply_are_not_opencl_work():
    if CL is None:
        pytest.skip("no OpenCL device")
    with pytest.raises(PlacementError, match="prepare on .*lacks tokenize"):
        hetero.Pipeline(BM25Retrieval(), CL)


# --- append -----------------------------------------------------------------------------------------

def _arrays(memory):
    from hetero.methods.bm25 import _numpy

    return [_numpy(a) for a in (*memory.postings, memory.doc_len, *memory.index)]


@pytest.mark.parametrize("name", ["host", "torch", "opencl"])
def test_append_equals_rebuild(name):
    if name not in PLACEMENTS:
        pytest.skip("no OpenCL device")
    docs = list(corpus.stdlib().texts[:900]) + ["", "the of", "brand newterm alpha", "Ünïcode café"]
    queries = corpus.queries(corpus.stdlib(), 20, seed=1) + ["brand newterm", "café"]
    method = BM25Retrieval(k=7)
    pipe = hetero.Pipeline(method, PLACEMENTS[name])
    whole = pipe.prepare(docs)
    grown = pipe.prepare(docs[:300])
    assert pipe.append(grown, docs[300:302]) is grown
    pipe.append(grown, tuple(docs[302:800]))
    pipe.append(grown, [])
    pipe.append(grown, docs[800:])
    assert (grown.n_docs, grown.n_terms, grown.total_tokens) == (whole.n_docs, whole.n_terms, whole.total_tokens)
    assert dict(grown.vocab) == dict(whole.vocab)
    for a, b in zip(_arrays(grown), _arrays(whole)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(grown.doc_freq, whole.doc_freq)
    assert [grown.texts[i] for i in range(len(docs))] == docs
    a, b = pipe.step(queries, grown), pipe.step(queries, whole)
    np.testing.assert_array_equal(a.ids.numpy(), b.ids.numpy())
    np.testing.assert_array_equal(a.scores.numpy(), b.scores.numpy())
    assert a.prompts == b.prompts


def test_failed_append_changes_nothing():
    pipe = hetero.Pipeline(BM25Retrieval(k=2), "host")
    docs = ["alpha beta", "gamma"]
    memory = pipe.prepare(docs)
    before = [a.copy() for a in _arrays(memory)], dict(memory.vocab), memory.n_docs, memory.n_terms
    with pytest.raises(ValueError, match=r"documents\[1\] must be a str"):
        pipe.append(memory, ["delta newword", None])
    after = _arrays(memory), dict(memory.vocab), memory.n_docs, memory.n_terms
    for x, y in zip(before[0], after[0]):
        np.testing.assert_array_equal(x, y)
    assert before[1:] == after[1:] and "newword" not in memory.vocab and len(memory.texts) == 2
    docs.append("changed later")  # the memory keeps its own copy of a list
    assert len(memory.texts) == 2


# --- apply ------------------------------------------------------------------------------------------

def test_prompt_budget():
    docs = ["alpha " + "word " * 30, "alpha alpha beta", "gamma " * 5, "alpha beta " * 10]
    method = BM25Retrieval(k=4, prompt_budget=25, separator=" | ")
    _, _, out = run(method, "host", docs, ["alpha beta", "zzz"])
    ranked = out.ids[0].tolist()
    passages = out.prompts[0].split(" | ")
    assert passages[-1] == "alpha beta"
    assert sum(len(p.split()) for p in passages[:-1]) == 25  # budget used, the last passage cut
    assert passages[0] == docs[ranked[0]].strip() or docs[ranked[0]].startswith(passages[0])
    assert 2 not in ranked[:3] and out.scores[0, 3] == 0  # "gamma" shares no term: score 0, not in the prompt
    assert out.prompts[1] == "zzz"
    _, _, out = run(BM25Retrieval(k=2, prompt_budget=0), "host", docs, ["alpha"])
    assert out.prompts == ["alpha"]
    assert ref.prompt(["a b c", "d e"], "q", 4) == "a b c\n\nd\n\nq"


# --- cost model and placement -----------------------------------------------------------------------

def test_shapes_and_workload():
    method = BM25Retrieval(k=10)
    s = method.shapes(documents=1_000_000)
    assert s["k"] == 10 and s["batch"] == 1
    with pytest.raises(ValueError, match="unknown shape"):
        method.shapes(context=5)
    with pytest.raises(ValueError, match="df"):
        method.shapes(df=2)
    for backend, fusions in (("torch", (False,)), ("host", (False, True)), ("opencl", (False, True))):
        backends = {st_: backend for st_ in hetero.STEPS}
        backends[Step.PREPARE] = backends[Step.APPLY] = "host" if backend == "opencl" else backend
        for fused in fusions:
            work = method.workload(s, backends, fused, appended=0)
            ops = [t.op for t in work.tasks]
            assert ("relevancy_retrieval" in ops) == fused and ops[-1] == "augment"
            read = sum(a.nbytes for t in work.tasks for a in t.accesses if a.what == "index")
            assert read >= 8 * 3 * 0.025 * 1_000_000  # postings of the query tokens
    work = method.workload(s, {st_: "host" for st_ in hetero.STEPS}, True, appended=5, query=False)
    assert [t.op for t in work.tasks] == ["tokenize", "build_postings", "weigh", "load_index"]


@pytest.mark.parametrize("name", ["host", "torch", "opencl", "opencl-scores"])
def test_workload_lists_the_recorded_ops(name):
    if name not in PLACEMENTS:
        pytest.skip("no OpenCL device")
    method = BM25Retrieval(k=3)
    pipe = hetero.Pipeline(method, PLACEMENTS[name])
    memory = pipe.prepare(["alpha beta", "beta"])
    backends = {st_: pipe.placement[st_].backend for st_ in hetero.STEPS}
    fused = method.fused(pipe.placement)
    prepared = [r.op for r in pipe.last_run.steps]
    assert prepared == [t.op for t in method.workload(method.shapes_of(memory), backends, fused, appended=2,
                                                        query=False).tasks]
    pipe.append(memory, ["gamma"])
    pipe.step(["alpha", "beta gamma"], memory)
    stepped = [r.op for r in pipe.last_run.steps]
    assert stepped == [t.op for t in method.workload(method.shapes_of(memory, ["alpha", "beta"]), backends, fused,
                                                       appended=0).tasks]
    shape = method.describe_call("step", (["alpha", "beta"], memory), None)
    assert shape[1] == ["alpha", "beta"] and shape[2] == 0
    assert method.shapes_of(memory, ["alpha", "beta"])["batch"] == 2


def test_place_and_pipeline():
    method = BM25Retrieval()
    plan = hetero.place(method, dict(documents=1_000_000, batch=32))
    assert set(plan.placement) == set(hetero.STEPS)
    assert plan.placement["prepare"] in ("host", "torch:cpu") and plan.placement["apply"] in ("host", "torch:cpu")
    assert "relevancy" in plan.explain()
    if CL:
        pipe = hetero.Pipeline(method, {"prepare": "host", "relevancy": CL, "retrieval": CL, "apply": "torch:cpu"})
        memory = pipe.prepare(corpus.stdlib().texts)
        out = pipe.step(["JSONDecoder decode", "ordered dictionary"], memory)
        assert out.ids.shape == (2, 10) and len(out.prompts) == 2
        assert pipe.last_run.artifacts["selected"] is not None
        assert corpus.stdlib().titles.index("json.decoder.JSONDecoder.decode") in out.ids[0].tolist()
    auto = hetero.Pipeline(method, "auto")
    memory = auto.prepare(corpus.stdlib().texts[:200])
    assert auto.step("json", memory).ids.shape == (1, 10)
