"""TwoStageRetrieval: BM25 candidates re-scored by dense embeddings, each stage placeable,
against the reference composed of BM25's and DenseRetrieval's references."""

import numpy as np
import pytest

import hetero
from hetero import Step
from hetero.methods import TwoStageRetrieval, get_method
from hetero.runtime import PlacementError

from conftest import device_ids

CPU = "torch:cpu"


def placements():
    out = [pytest.param(d, id=d) for d in device_ids() if not d.startswith("opencl")]
    for cl in device_ids("opencl")[:1]:
        out += [pytest.param({"prepare": "host", "relevancy": cl, "retrieval": cl, "apply": "host"}, id="cl-both"),
                pytest.param({"prepare": CPU, "relevancy": "host", "retrieval": cl, "apply": CPU}, id="host-cl"),
                pytest.param({"prepare": "host", "relevancy": cl, "retrieval": CPU, "apply": "host"}, id="cl-torch")]
    return out


@pytest.fixture(scope="module")
def corpus():
    method = TwoStageRetrieval(k=5, candidates=30)
    return method.example_inputs(dict(documents=2500, batch=1))[0]


@pytest.mark.parametrize("placement", placements())
def test_matches_reference_on_real_queries(placement, corpus):
    from hetero.corpus import queries, stdlib

    method = TwoStageRetrieval(k=5, candidates=30)
    qs = queries(stdlib(), 24, seed=3)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(*corpus)
    out = pipe.step(qs, memory)
    ids, top = method.reference_step(corpus, qs)
    np.testing.assert_array_equal(out.ids.numpy(), ids[:, 0])
    np.testing.assert_allclose(out.scores.numpy(), top, rtol=1e-5, atol=1e-6)
    assert len(out.prompts) == len(qs) and all(p.endswith(q) for p, q in zip(out.prompts, qs))
    stage = {r.step for r in pipe.last_run.steps if r.op == "rescore"}
    assert stage == {"retrieval"}


@pytest.mark.parametrize("placement", placements())
def test_ties_and_padding(placement):
    """Duplicated documents tie in both stages (the lower id wins); fewer candidates than k
    (a tiny corpus) pads with -1 / -inf; a query of unknown words hands BM25's first
    documents (all scoring 0) to the second stage."""
    docs = ["alpha beta gamma", "alpha beta gamma", "delta epsilon", "alpha zeta", "alpha beta gamma"]
    method = TwoStageRetrieval(k=4, candidates=6)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(docs)
    out = pipe.step(["alpha beta gamma", "qqqq zzzz"], memory)
    ids, top = method.reference_step((docs,), ["alpha beta gamma", "qqqq zzzz"])
    np.testing.assert_array_equal(out.ids.numpy(), ids[:, 0])
    assert out.ids[0, :3].tolist() == [0, 1, 4]  # the three copies, lowest ids first
    np.testing.assert_allclose(out.scores.numpy(), top, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement", placements()[:2])
def test_append_equals_rebuild(placement, corpus):
    method = TwoStageRetrieval(k=5, candidates=20)
    pipe = hetero.Pipeline(method, placement)
    qs = ["return the value", "socket address family", "parse a date string"]
    memory = pipe.prepare(corpus[0][:1000])
    pipe.append(memory, corpus[0][1000:1700])
    pipe.append(memory, corpus[0][1700:2500])
    grown = pipe.step(qs, memory)
    fresh = pipe.step(qs, pipe.prepare(corpus[0][:2500]))
    np.testing.assert_array_equal(grown.ids.numpy(), fresh.ids.numpy())
    np.testing.assert_allclose(grown.scores.numpy(), fresh.scores.numpy(), rtol=1e-6)


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match=r"candidates \(3\) must be >= k \(5\)"):
        TwoStageRetrieval(k=5, candidates=3)
    with pytest.raises(ValueError, match="dense\\['index'\\] must be 'flat'"):
        TwoStageRetrieval(dense={"index": "ivf"})
    pipe = hetero.Pipeline(TwoStageRetrieval(k=2, candidates=4), CPU)
    with pytest.raises(ValueError, match="documents"):
        pipe.prepare("one string")
    memory = pipe.prepare(["a b", "c d"])
    with pytest.raises(ValueError, match="query"):
        pipe.step([], memory)
    with pytest.raises(ValueError, match="documents"):
        pipe.append(memory, [1, 2])
    assert memory.max_length == 2 and memory.dense.length == 2


def test_placement_reasons():
    if not device_ids("opencl"):
        pytest.skip("no OpenCL device")
    with pytest.raises(PlacementError, match="prepare on opencl"):
        hetero.Pipeline(TwoStageRetrieval(), device_ids("opencl")[0])


def test_placer_and_workload_follow_the_flow(corpus):
    method = get_method("twostage", k=5, candidates=40)
    plan = hetero.place(method, dict(documents=1_000_000, batch=1))
    assert set(plan.placement) == set(hetero.STEPS) and "rescore" in plan.explain()
    for placement in placements():
        pipe = hetero.Pipeline(method, placement.values[0])
        memory = pipe.prepare(*corpus)
        prepared = [r.op for r in pipe.last_run.steps]
        pipe.step(["a query", "another"], memory)
        stepped = [r.op for r in pipe.last_run.steps]
        backends = {s: pipe.placement[s].backend for s in hetero.STEPS}
        shapes = method.shapes_of(memory, ["a query", "another"])
        assert [t.op for t in method.workload(shapes, backends, False, appended=len(corpus[0]), query=False,
                                              allocate=True).tasks] == prepared
        assert [t.op for t in method.workload(shapes, backends, False, appended=0).tasks] == stepped
        assert {t.step for t in method.workload(shapes, backends, False, appended=0).tasks
                if t.op == "rescore"} == {Step.RETRIEVAL}
