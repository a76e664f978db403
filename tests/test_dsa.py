"""Conformance: every implementation of every DSAIndexer step equals the reference
(hetero/methods/dsa_reference.py), on every device present and on mixed placements.

Exact cases use dyadic hidden states and weights with RoPE off: every projection, dot product
and weighted sum is then exact in float32, so every backend computes the reference's scores
bit for bit, ties are real ties, and the selected tokens must be identical."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hetero
from hetero import Step
from hetero.methods import DSAIndexer, get_method
from hetero.methods import dsa_reference as ref
from hetero.methods import page_sparse_reference as page_ref
from hetero.runtime import Run

from conftest import device_ids, dyadic

CPU = "torch:cpu"
HEADS, DIM = 16, 16  # index heads and dim: sqrt(16 * 16) = 16 keeps the weight scale exact


def placements():
    out = [pytest.param(d, id=d) for d in device_ids()]
    for cl in device_ids("opencl")[:1]:
        out += [pytest.param({"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU}, id="cl-fused"),
                pytest.param({"prepare": cl, "relevancy": CPU, "retrieval": cl, "apply": "host"}, id="cl-torch-host"),
                pytest.param({"prepare": CPU, "relevancy": cl, "retrieval": CPU, "apply": cl}, id="cl-split")]
    if "host" in device_ids():
        out.append(pytest.param({"prepare": "host", "relevancy": "host", "retrieval": "host", "apply": CPU},
                                id="host-torch"))
    return out


def exact_method(rng, hidden_dim, top_k, rope_dim=0):
    weights = {"w_k": dyadic(rng, (DIM, hidden_dim)), "w_q": dyadic(rng, (HEADS * DIM, hidden_dim)),
               "w_w": dyadic(rng, (HEADS, hidden_dim))}
    return DSAIndexer(index_heads=HEADS, index_dim=DIM, rope_dim=rope_dim, top_k=top_k, weights=weights)


def make_inputs(rng, batch, kv_heads, group, seq, head_dim=16, hidden_dim=8):
    keys = torch.from_numpy(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    values = torch.from_numpy(rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32))
    query = torch.from_numpy(rng.standard_normal((batch, kv_heads * group, head_dim)).astype(np.float32))
    return keys, values, dyadic(rng, (batch, seq, hidden_dim)), query


def reference(method, keys, values, hidden, query, lengths):
    """(scores, token ids [B, H, width], output) of the reference for sequences of `lengths`."""
    w = method.weights(hidden.shape[-1])
    index = ref.index_keys(hidden.numpy(), w["w_k"].numpy(), method.rope_dim)
    last = hidden.numpy()[np.arange(len(lengths)), np.asarray(lengths) - 1]
    q, weights = ref.index_query(last, np.asarray(lengths) - 1, w["w_q"].numpy(), w["w_w"].numpy(),
                                 method.index_heads, method.rope_dim)
    scores = ref.relevancy(index, q, weights, lengths)
    ids = np.repeat(ref.retrieval(scores, lengths, method.top_k)[:, None], keys.shape[1], 1)
    out = page_ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), ids, lengths, 1,
                                    1 / math.sqrt(keys.shape[-1]))
    return scores, ids, out


def _on(method, device_id):
    dev = hetero.get_device(device_id)
    return Run(method, hetero.Placement({s: dev for s in hetero.STEPS}), "test")


def _host(run, value):
    return run.to_torch(value, torch.device("cpu")).numpy()


def _selected(pipe):
    return _host(Run(pipe.method, pipe.placement, "t"), pipe.last_run.artifacts["selected"])


@st.composite
def problems(draw):
    """Batches of different lengths (1 token up to 40), GQA 1/2/4, top_k from 1 to past
    the shorter sequences' lengths, RoPE on or off."""
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, 40), min_size=batch, max_size=batch))
    top_k = draw(st.sampled_from([1, 3, 8]))
    lengths[0] = max(lengths[0], top_k)  # the longest sequence holds at least top_k tokens
    return (batch, draw(st.integers(1, 2)), draw(st.sampled_from([1, 4])), lengths, top_k,
            draw(st.sampled_from([0, 8])), draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("placement", placements())
@given(problem=problems())
def test_pipeline_matches_reference(placement, problem):
    batch, kv_heads, group, lengths, top_k, rope_dim, seed = problem
    rng = np.random.default_rng(seed)
    method = exact_method(rng, 8, top_k, rope_dim)
    keys, values, hidden, query = make_inputs(rng, batch, kv_heads, group, max(lengths))
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values, hidden, lengths=lengths))
    scores, ids, expected = reference(method, keys, values, hidden, query, lengths)
    if rope_dim == 0:  # exact scores: the very same tokens, ties included
        np.testing.assert_array_equal(_selected(pipe), ids)
    else:  # RoPE's cos/sin differ in the last bits between backends: the reference's tokens
        # up to near-ties, and the output exact over the tokens this placement chose
        got = _selected(pipe)
        ids = got
        expected = page_ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), got, lengths, 1,
                                             1 / math.sqrt(keys.shape[-1]))
        for b, n in enumerate(lengths):
            chosen = got[b, 0][got[b, 0] >= 0]
            kth = np.sort(scores[b, :n])[::-1][min(top_k, n) - 1]
            assert len(chosen) == min(top_k, n) and (scores[b, chosen] >= kth - 1e-3 * max(1, abs(kth))).all()
    assert out.shape == query.shape and out.dtype == query.dtype
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("rope_dim", [0, 8])
def test_prepare_matches_reference(device, rope_dim):
    rng = np.random.default_rng(1)
    method = DSAIndexer(index_heads=HEADS, index_dim=DIM, rope_dim=rope_dim, top_k=4)
    lengths = [37, 1, 20]
    keys, values, _, _ = make_inputs(rng, 3, 2, 1, 37)
    hidden = torch.from_numpy(rng.standard_normal((3, 37, 24)).astype(np.float32)) * 3
    memory = hetero.Pipeline(method, device).prepare(keys, values, hidden, lengths=lengths)
    run = _on(method, device)
    w = method.weights(24)
    expected = ref.index_keys(hidden.numpy(), w["w_k"].numpy(), rope_dim)
    got = _host(run, memory.summary)[:, 0]
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(got[b, :n], expected[b, :n], rtol=1e-5, atol=1e-5)
    last = hidden.numpy()[np.arange(3), np.asarray(lengths) - 1]
    q, weights = ref.index_query(last, np.asarray(lengths) - 1, w["w_q"].numpy(), w["w_w"].numpy(), HEADS, rope_dim)
    packed = _host(run, memory.index_query)
    np.testing.assert_allclose(packed[..., :-1], q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[..., -1], weights, rtol=1e-5, atol=1e-6)


def test_rope_at_long_positions_matches_float64():
    """Positions past 100K: the angle is formed in float64 on every backend."""
    x = np.random.default_rng(2).standard_normal((1, 3, 16))
    pos = np.array([[0, 65535, 131071]])
    expected = ref.rope(x, pos, 16)
    from hetero.methods.dsa import rope_

    got = rope_(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(pos), 16).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert np.allclose(np.linalg.norm(expected, axis=-1), np.linalg.norm(x, axis=-1))  # a rotation


def retrieval_cases():
    rng = np.random.default_rng(3)
    n = 50
    equal = np.zeros((2, n), np.float32)
    signed_zero = np.where(rng.random((2, n)) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    signed_zero[0, 10] = 1.0
    plateau = np.round(rng.standard_normal((2, n))).astype(np.float32)
    distinct = rng.standard_normal((2, n)).astype(np.float32)
    negative = -np.abs(distinct) - 1
    cases = {"equal": equal, "signed-zero": signed_zero, "plateau": plateau, "distinct": distinct,
             "negative": negative}
    return [pytest.param(s, lengths, k, id=f"{name}-k{k}-len{lengths[1]}")
            for name, s in cases.items() for k in (1, 7, 50) for lengths in ([50, 50], [50, 5], [50, 1])]


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("scores,lengths,k", retrieval_cases())
def test_retrieval_matches_reference(device, scores, lengths, k):
    scores = scores.copy()
    for b, n in enumerate(lengths):
        scores[b, n:] = -np.inf
    method = DSAIndexer(index_heads=HEADS, index_dim=DIM, rope_dim=0, top_k=k)
    run = _on(method, device)
    ids = run.run(Step.RETRIEVAL, "retrieval", torch.from_numpy(scores), torch.tensor(lengths, dtype=torch.int32),
                  k, 3)
    expected = ref.retrieval(scores, lengths, k)
    np.testing.assert_array_equal(_host(run, ids), np.repeat(expected[:, None], 3, 1))


@pytest.mark.parametrize("device", device_ids())
def test_relevancy_matches_reference_random(device):
    """Float inputs, every index head, a context not a multiple of any tile, two lengths."""
    rng = np.random.default_rng(4)
    method = DSAIndexer(index_heads=32, index_dim=24, rope_dim=8, top_k=16)
    lengths = [1003, 998]
    keys, values, _, _ = make_inputs(rng, 2, 1, 1, 1003)
    hidden = torch.from_numpy(rng.standard_normal((2, 1003, 40)).astype(np.float32))
    memory = hetero.Pipeline(method, device).prepare(keys, values, hidden, lengths=lengths)
    run = _on(method, device)
    scores = run.run(Step.RELEVANCY, "relevancy", memory.summary, memory.index_query,
                     memory.lengths_for(run, Step.RELEVANCY), 1003)
    w = method.weights(40)
    index = ref.index_keys(hidden.numpy(), w["w_k"].numpy(), 8)
    last = hidden.numpy()[np.arange(2), np.asarray(lengths) - 1]
    q, weights = ref.index_query(last, np.asarray(lengths) - 1, w["w_q"].numpy(), w["w_w"].numpy(), 32, 8)
    expected = ref.relevancy(index, q, weights, lengths)
    got = _host(run, scores)
    assert np.isneginf(got[1, 998:]).all()
    np.testing.assert_allclose(got[:, :998], expected[:, :998], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", device_ids("opencl"))
def test_fused_equals_unfused(device):
    rng = np.random.default_rng(5)
    method = exact_method(rng, 8, 9)
    keys, values, hidden, query = make_inputs(rng, 2, 1, 1, 301)
    memory = hetero.Pipeline(method, device).prepare(keys, values, hidden, lengths=[301, 77])
    run = _on(method, device)
    lengths = memory.lengths_for(run, Step.RELEVANCY)
    scores = run.run(Step.RELEVANCY, "relevancy", memory.summary, memory.index_query, lengths, 301)
    split = run.run(Step.RETRIEVAL, "retrieval", scores, lengths, 9, 2)
    fused = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.summary, memory.index_query, lengths, 301, 9, 2)
    np.testing.assert_array_equal(_host(run, fused), _host(run, split))


@pytest.mark.parametrize("placement", placements())
def test_causal_boundary(placement):
    """The query token is the last stored one: a one-token memory attends to that token;
    appending one token makes it selectable and the previous last token stays selectable."""
    rng = np.random.default_rng(6)
    method = exact_method(rng, 8, 1)
    keys, values, hidden, query = make_inputs(rng, 1, 1, 1, 2)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys[:, :, :1], values[:, :, :1], hidden[:, :1])
    out = pipe.step(query, memory)
    np.testing.assert_array_equal(_selected(pipe), [[[0]]])
    np.testing.assert_allclose(out.numpy(), values[:, :, 0].numpy(), rtol=1e-6)  # one token: its value
    pipe.append(memory, keys[:, :, 1:], values[:, :, 1:], hidden[:, 1:])
    out = pipe.step(query, memory)
    _, ids, expected = reference(method, keys, values, hidden, query, [2])
    np.testing.assert_array_equal(_selected(pipe), ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", placements())
def test_append_equals_rebuild(placement):
    """Appends of 1 and of several tokens, past the capacity (the caches grow), give the
    memory and the output a single prepare of everything gives."""
    rng = np.random.default_rng(7)
    method = exact_method(rng, 8, 5, rope_dim=8)
    keys, values, hidden, query = make_inputs(rng, 2, 2, 2, 30)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys[:, :, :12], values[:, :, :12], hidden[:, :12], capacity=12)
    for a, b in ((12, 13), (13, 20), (20, 30)):
        pipe.append(memory, keys[:, :, a:b], values[:, :, a:b], hidden[:, a:b])
    grown = pipe.step(query, memory)
    grown_ids = _selected(pipe)
    fresh = pipe.step(query, pipe.prepare(keys, values, hidden))
    np.testing.assert_array_equal(grown_ids, _selected(pipe))
    np.testing.assert_allclose(grown.numpy(), fresh.numpy(), rtol=1e-6, atol=1e-6)
    assert memory.lengths.tolist() == [30, 30] and memory.token_capacity >= 30


def test_half_precision_kv():
    rng = np.random.default_rng(8)
    method = exact_method(rng, 8, 6)
    keys, values, hidden, query = make_inputs(rng, 1, 2, 4, 40)
    outs = {}
    for device in device_ids():
        pipe = hetero.Pipeline(method, device)
        out = pipe.step(query.half(), pipe.prepare(keys.half(), values.half(), hidden.half()))
        assert out.dtype == torch.float16
        outs[device] = out.float().numpy()
    _, _, expected = reference(method, keys.half().float(), values.half().float(), hidden, query.half().float(), [40])
    for device, out in outs.items():
        np.testing.assert_allclose(out, expected, rtol=2e-3, atol=2e-3, err_msg=device)


def test_seeded_weights_are_deterministic_and_example_runs():
    a, b = DSAIndexer(seed=3), DSAIndexer(seed=3)
    assert all(torch.equal(a.weights(32)[n], b.weights(32)[n]) for n in ("w_k", "w_q", "w_w"))
    assert not torch.equal(a.weights(32)["w_k"], DSAIndexer(seed=4).weights(32)["w_k"])
    method = get_method("dsa", index_heads=16, index_dim=32, top_k=64)
    shapes = dict(context=300, hidden=48, kv_heads=2, q_heads=4, head_dim=32, dtype="float32")
    inputs, query = method.example_inputs(shapes)
    ids, expected = method.reference_step(inputs, query)
    pipe = hetero.Pipeline(method, CPU)
    out = pipe.step(query, pipe.prepare(*inputs))
    got = _selected(pipe)
    assert (got == ids).mean() > 0.95  # float32 vs float64 scores: near-ties may swap
    assert out.shape == query.shape


# --- bad input -------------------------------------------------------------------------

@pytest.mark.parametrize("options,match", [
    (dict(index_heads=0), "index_heads"), (dict(top_k=0), "top_k"), (dict(rope_dim=3), "rope_dim"),
    (dict(rope_dim=256), "rope_dim"), (dict(scale=-1.0), "scale"), (dict(weights={"w_k": 1}), "weights"),
    (dict(index_heads=16, index_dim=8, weights={"w_k": torch.zeros(8, 4), "w_q": torch.zeros(16 * 8, 5),
                                                 "w_w": torch.zeros(16, 4)}), r"weights\['w_q'\]"),
    (dict(index_heads=16, index_dim=8, weights={"w_k": torch.zeros(8, 4), "w_q": torch.zeros(16 * 8, 4),
                                                 "w_w": torch.zeros(15, 4)}), r"weights\['w_w'\]"),
    (dict(index_heads=16, index_dim=8, weights={"w_k": torch.zeros(8, 4, 1), "w_q": torch.zeros(16 * 8, 4),
                                                 "w_w": torch.zeros(16, 4)}), r"weights\['w_k'\]"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        DSAIndexer(**options)


def test_bad_inputs_leave_memory_unchanged():
    rng = np.random.default_rng(9)
    method = exact_method(rng, 8, 4)
    keys, values, hidden, query = make_inputs(rng, 1, 2, 1, 10)
    pipe = hetero.Pipeline(method, CPU)
    with pytest.raises(ValueError, match="hidden"):
        pipe.prepare(keys, values, hidden[:, :5])
    with pytest.raises(ValueError, match="given weights expect 8"):
        pipe.prepare(keys, values, torch.zeros(1, 10, 6))
    memory = pipe.prepare(keys, values, hidden)
    before = pipe.step(query, memory)
    with pytest.raises(ValueError, match="hidden"):
        pipe.append(memory, keys[:, :, :2], values[:, :, :2], hidden[:, :3])
    bad = hidden[:, :2].clone()
    bad[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pipe.append(memory, keys[:, :, :2], values[:, :, :2], bad)
    assert memory.lengths.tolist() == [10]
    torch.testing.assert_close(pipe.step(query, memory), before)
    short = hetero.Pipeline(exact_method(rng, 8, 11), CPU)
    with pytest.raises(ValueError, match=r"top_k \(11\) is above the context \(10 tokens\)"):
        short.step(query, short.prepare(keys, values, hidden))
    with pytest.raises(ValueError, match="top_k"):
        method.shapes(context=2)


def test_opencl_needs_index_heads_multiple_of_16():
    if not device_ids("opencl"):
        pytest.skip("no OpenCL device")
    rng = np.random.default_rng(10)
    method = DSAIndexer(index_heads=8, index_dim=8, rope_dim=0, top_k=2)
    keys, values, hidden, query = make_inputs(rng, 1, 1, 1, 10)
    with pytest.raises(ValueError, match="index_heads a multiple of 16"):
        hetero.Pipeline(method, device_ids("opencl")[0]).prepare(keys, values, hidden)


# --- cost model ---------------------------------------------------------------------------

def test_placer_and_workload():
    method = DSAIndexer()
    plan = hetero.place(method, dict(context=65536, q_heads=32))
    assert set(plan.placement) == set(hetero.STEPS)
    text = plan.explain()
    assert "relevancy" in text
    for backend, fusions in (("torch", (False,)), ("host", (False,)), ("opencl", (False, True))):
        backends = {s: backend for s in hetero.STEPS}
        for fused in fusions:
            work = method.workload(method.shapes(context=8192), backends, fused)
            ops = {t.op for t in work.tasks}
            assert ("relevancy_retrieval" in ops) == fused and "sparse_attention" in ops
            flops = sum(t.flops for t in work.tasks if t.step == Step.RELEVANCY)
            assert flops >= 2 * 8192 * 64 * 128  # the index GEMM
