"""Conformance: every implementation of every SeerAttention step equals the reference
(hetero/methods/seer_reference.py), on every device present and on mixed placements.

Selections are compared exactly. Where the reference computes gate probabilities in
float64 and a backend in float32, a selection is only compared when no decision rests on a
margin below float32 rounding (`decided`); retrieval on given float32 probabilities is
compared exactly everywhere, ties and probabilities equal to the threshold included.
"""

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import hetero
from hetero import Step
from hetero.methods import SeerAttention, dense_attention, get_method
from hetero.methods import seer_reference as ref
from hetero.runtime import Run

from conftest import device_ids, dyadic

CPU = "torch:cpu"
# few examples per placement by default (each is a whole pipeline); HETERO_EXAMPLES=200 for a soak
HYP = settings(max_examples=int(os.environ.get("HETERO_EXAMPLES", "6")), deadline=None, database=None)


def placements():
    """Every single-device placement present, plus mixed ones (every crossing kind)."""
    out = [pytest.param(d, id=d) for d in device_ids()]
    for cl in device_ids("opencl")[:1]:
        mixed = {
            "cl-relevancy+retrieval": {"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU},
            "cl-prepare+relevancy": {"prepare": cl, "relevancy": cl, "retrieval": CPU, "apply": CPU},
            "cl-retrieval+apply": {"prepare": CPU, "relevancy": CPU, "retrieval": cl, "apply": cl},
        }
        if "host" in device_ids():
            mixed["host-cl-torch"] = {"prepare": cl, "relevancy": "host", "retrieval": cl, "apply": "host"}
        out += [pytest.param(p, id=name) for name, p in mixed.items()]
    return out


def _on(method, device_id):
    dev = hetero.get_device(device_id)
    return Run(method, hetero.Placement({s: dev for s in hetero.STEPS}), "test")


def _host(run, value):
    return run.to_torch(value, torch.device("cpu"))


def _numpy(value):
    """A device value (torch tensor, host array, OpenCL array) as numpy."""
    if isinstance(value, torch.Tensor):
        return value.cpu().numpy()
    return value.get() if hasattr(value, "get") else np.asarray(value)


def make_inputs(seed, batch, heads, group, seq, dim, exact=False):
    rng = np.random.default_rng(seed)
    gen = (lambda shape: dyadic(rng, shape)) if exact else (lambda shape: torch.from_numpy(
        rng.standard_normal(shape).astype(np.float32)))
    return gen((batch, heads, seq, dim)), gen((batch, heads, seq, dim)), gen((batch, heads * group, dim))


def reference(keys, values, query, lengths, method):
    """(block ids, output, probs, gate keys) of the float64 reference for `method`."""
    w = method.weights(keys.shape[-1])
    scale = method.scale or 1 / math.sqrt(keys.shape[-1])
    return ref.step(keys.double().numpy(), values.double().numpy(), query.double().numpy(), list(lengths),
                    method.block_size, method.budget_blocks, method.sink_blocks, method.local_blocks,
                    method.threshold32, w["w_q"].double().numpy(), w["w_k"].double().numpy(), scale)


def decided(probs, lengths, method, margin=1e-5):
    """True when the reference selection does not hinge on probabilities closer than
    `margin` (to each other at the cut, or to the threshold)."""
    thr = method.threshold32
    for b, n in enumerate(lengths):
        nb = ref.num_blocks(n, method.block_size)
        forced = ref.forced_pages(nb, method.sink_blocks, method.local_blocks)
        for h in range(probs.shape[1]):
            others = sorted((probs[b, h, p] for p in range(nb) if p not in forced), reverse=True)
            if thr is not None:
                if any(abs(p - thr) < margin for p in others):
                    return False
                others = [p for p in others if p >= thr]
            cap = method.budget_blocks - len(forced)
            if 0 < cap < len(others) and others[cap - 1] - others[cap] < margin:
                return False
    return True


def dyadic_weights(rng, gate_dim, dim):
    """Gate weights in {-1, -0.5, 0, 0.5, 1}: with dyadic keys and power-of-two blocks and
    groups every gate logit is exact in float32 (equal blocks give equal probabilities)."""
    pick = lambda shape: torch.from_numpy((rng.integers(-2, 3, size=shape) / 2).astype(np.float32))  # noqa: E731
    return {"w_q": pick((gate_dim, dim)), "w_k": pick((gate_dim, 2 * dim))}


# --------------------------------------------------------------------------------------
# the whole pipeline
# --------------------------------------------------------------------------------------

# (head_dim, gate_dim, block_size, budget_blocks). Every configuration (with each GQA group)
# is an OpenCL build of seer.cl and page_sparse.cl, seconds each on a cold PoCL cache, so
# the tests share a few: STANDARD nearly everywhere; odd sizes (scalar and 8-wide vector
# paths of the kernels, a block of 5) in the hypothesis test.
STANDARD = dict(block_size=16, budget_blocks=4, gate_dim=8)
CONFIGS = [(16, 8, 16, 4), (24, 12, 5, 3), (9, 5, 4, 4)]


@st.composite
def problems(draw):
    dim, gate_dim, block, budget = draw(st.sampled_from(CONFIGS))
    group = draw(st.sampled_from([1, 2]))
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 2))
    lengths = draw(st.lists(st.integers(1, 10 * block + 3), min_size=batch, max_size=batch))
    threshold = draw(st.sampled_from([None, None, 0.02, 0.15, 0.6]))
    sink = draw(st.integers(0, min(1, budget)))
    local = draw(st.integers(1 if sink == 0 and threshold is not None else 0, budget - sink))
    seed = draw(st.integers(0, 2**31 - 1))
    return dim, gate_dim, block, budget, group, heads, lengths, threshold, sink, local, seed


@pytest.mark.parametrize("placement", placements())
@HYP
@given(problem=problems())
def test_pipeline_matches_reference(placement, problem):
    dim, gate_dim, block, budget, group, heads, lengths, threshold, sink, local, seed = problem
    keys, values, query = make_inputs(seed, len(lengths), heads, group, max(lengths), dim)
    method = SeerAttention(block_size=block, budget_blocks=budget, threshold=threshold, sink_blocks=sink,
                           local_blocks=local, gate_dim=gate_dim, seed=seed % 1000)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys, values, lengths=lengths)
    if threshold is None and budget > ref.num_blocks(max(lengths), block):
        with pytest.raises(ValueError, match="budget_blocks"):  # top-k above the context
            pipe.step(query, memory)
        return
    out = pipe.step(query, memory)
    ids, expected, probs, _ = reference(keys, values, query, lengths, method)
    assert out.shape == query.shape and out.dtype == query.dtype and out.device == query.device
    selected = _numpy(pipe.last_run.artifacts["selected"])
    for b, n in enumerate(lengths):  # the query token's block is always attended (local)
        if local:
            assert ((selected[b] == (n - 1) // block).any(-1)).all()
    assume(decided(probs, lengths, method))
    np.testing.assert_array_equal(selected, ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------
# each step against the reference
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("lengths", [[1], [16], [37], [200, 5, 64]])
def test_prepare_matches_reference(device, lengths):
    keys, values, _ = make_inputs(1, len(lengths), 2, 1, max(lengths), 16)
    method = SeerAttention(**STANDARD)
    memory = hetero.Pipeline(method, device).prepare(keys, values, lengths=lengths)
    run = _on(method, device)
    gate = _host(run, memory.gate_keys).double().numpy()
    expected = ref.gate_keys(keys.numpy(), lengths, 16, method.weights(16)["w_k"].numpy())
    for b, n in enumerate(lengths):
        nb = ref.num_blocks(n, 16)
        np.testing.assert_allclose(gate[b, :, :nb], expected[b, :, :nb], rtol=1e-5, atol=1e-5)
    # running stats of the partial last block: its max and sum, or (-inf, 0) when complete
    tail = _host(run, memory.tail).double().numpy()
    for b, n in enumerate(lengths):
        part = keys[b, :, n // 16 * 16: n].double().numpy()
        if part.shape[1]:
            np.testing.assert_allclose(tail[b, :, 0], part.max(1), rtol=0, atol=0)
            np.testing.assert_allclose(tail[b, :, 1], part.sum(1), rtol=1e-5, atol=1e-5)
        else:
            assert (tail[b, :, 0] == -np.inf).all() and (tail[b, :, 1] == 0).all()


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("group", [1, 4])
def test_relevancy_matches_reference(device, group):
    lengths = [300, 123, 1]
    keys, values, query = make_inputs(2, 3, 2, group, 300, 16)
    method = SeerAttention(**STANDARD)
    memory = hetero.Pipeline(method, device).prepare(keys, values, lengths=lengths)
    run = _on(method, device)
    n_blocks = ref.num_blocks(300, 16)
    probs = run.run(Step.RELEVANCY, "relevancy", memory.gate_keys, memory.w_q, query,
                    memory.lengths_for(run, Step.RELEVANCY), n_blocks)
    probs = _host(run, probs).numpy()
    w = method.weights(16)
    gk = ref.gate_keys(keys.numpy(), lengths, 16, w["w_k"].numpy())
    expected = ref.relevancy(gk, ref.gate_query(query.numpy(), w["w_q"].numpy(), 2), lengths, 16)
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(np.isinf(probs), np.isinf(expected))
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    assert probs[2, :, 0].tolist() == [1.0, 1.0]  # a single block takes all the probability


def retrieval_cases():
    """float32 gate probabilities with ties, plateaus and values exactly at the threshold."""
    rng = np.random.default_rng(3)
    lengths = [40 * 16, 17 * 16 - 5, 1]
    equal = np.full((3, 2, 40), 1 / 40, dtype=np.float32)  # every block ties: the lowest win
    logits = rng.standard_normal((3, 2, 40))
    distinct = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    plateau = np.round(distinct * 40, 0).astype(np.float32) / 64  # runs of equal values
    at = float(distinct[0, 0, 7])  # a threshold one block meets exactly
    cases = []
    for name, s in (("equal", equal), ("plateau", plateau), ("distinct", distinct)):
        for thr in (None, 1e-30, at, 2 / 64, 0.999):  # everything, exact equality, some, nothing
            for k, sink, local in ((1, 0, 1), (5, 1, 2), (8, 0, 8), (17, 2, 2), (40, 1, 1)):
                cases.append(pytest.param(s, lengths, k, sink, local, thr, id=f"{name}-t{thr}-k{k}-s{sink}-l{local}"))
    return cases


def _retrieve(device, scores, lengths, k, sink, local, thr):
    method = SeerAttention(block_size=16, budget_blocks=40, sink_blocks=0, local_blocks=0, gate_dim=8)
    scores = scores.copy()
    for b, n in enumerate(lengths):
        scores[b, :, ref.num_blocks(n, 16):] = -np.inf
    run = _on(method, device)
    ids = run.run(Step.RETRIEVAL, "retrieval", torch.from_numpy(scores), torch.tensor(lengths, dtype=torch.int32),
                  min(k, 40), sink, local, thr, (16, False))
    return _host(run, ids).numpy(), scores


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("scores,lengths,k,sink,local,thr", retrieval_cases())
def test_retrieval_matches_reference(device, scores, lengths, k, sink, local, thr):
    ids, scores = _retrieve(device, scores, lengths, k, sink, local, thr)
    expected = ref.retrieval(scores, lengths, 16, k, sink, local, thr)
    np.testing.assert_array_equal(ids, expected)
    if thr == 0.999:  # selects nothing: only the forced blocks
        for b, n in enumerate(lengths):
            forced = sorted(ref.forced_pages(ref.num_blocks(n, 16), sink, local))
            assert ids[b, 0, : len(forced)].tolist() == forced and (ids[b, :, len(forced):] == -1).all()


def test_threshold_identical_across_backends():
    """Same probabilities in, the same ids out on every backend: set and order, padding included."""
    for case in retrieval_cases()[::7]:
        got = [_retrieve(d, *case.values)[0] for d in device_ids()]
        for other in got[1:]:
            np.testing.assert_array_equal(other, got[0])


@pytest.mark.parametrize("device", device_ids())
def test_apply_is_page_sparse(device):
    lengths = [100, 37]
    keys, values, query = make_inputs(4, 2, 2, 2, 100, 16)
    method = SeerAttention(**STANDARD)
    memory = hetero.Pipeline(method, device).prepare(keys, values, lengths=lengths)
    ids = np.array([[[0, 3, 6], [1, 2, -1]], [[0, 2, -1], [2, -1, -1]]])
    run = _on(method, device)
    out = run.run(Step.APPLY, "sparse_attention", memory.k_cache, memory.v_cache, query,
                  torch.from_numpy(ids.astype(np.int32)), memory.lengths_for(run, Step.APPLY), 0.125)
    expected = ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), ids, lengths, 16, 0.125)
    np.testing.assert_allclose(_host(run, out).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threshold", [None, 0.01, 0.05, 0.3])
def test_fused_equals_unfused(opencl_device, threshold):
    """OpenCL's fused relevancy+retrieval selects exactly what its two kernels select, even
    with the threshold set to a probability that occurs."""
    lengths = [700, 333, 64]
    keys, values, query = make_inputs(11, 3, 2, 4, 700, 16)
    method = SeerAttention(**STANDARD)
    memory = hetero.Pipeline(method, opencl_device).prepare(keys, values, lengths=lengths)
    run = _on(method, opencl_device)
    n_blocks = ref.num_blocks(700, 16)
    lens = memory.lengths_for(run, Step.RELEVANCY)
    probs = run.run(Step.RELEVANCY, "relevancy", memory.gate_keys, memory.w_q, query, lens, n_blocks)
    thresholds = [threshold] if threshold is None else [threshold, float(_numpy(probs)[1, 1, 5])]
    for thr in thresholds:
        fused = run.run(Step.RELEVANCY, "relevancy_retrieval", memory.gate_keys, memory.w_q, query, lens, n_blocks,
                        4, 1, 1, thr)
        unfused = run.run(Step.RETRIEVAL, "retrieval", probs, lens, 4, 1, 1, thr, (16, False))
        np.testing.assert_array_equal(_numpy(fused), _numpy(unfused))
        np.testing.assert_array_equal(_numpy(fused), ref.retrieval(_numpy(probs), lengths, 16, 4, 1, 1, thr))


# --------------------------------------------------------------------------------------
# adversarial cases on every placement
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", placements())
def test_threshold_selecting_nothing_or_everything(placement):
    lengths = [190, 77]
    keys, values, query = make_inputs(5, 2, 2, 2, 190, 16)
    blocks = ref.num_blocks(190, 16)
    dense = ref.dense_attention(keys.numpy(), values.numpy(), query.numpy(), lengths, 1 / math.sqrt(16))
    # nothing passes 0.999 (no block has nearly all the probability): the forced blocks only
    method = SeerAttention(block_size=16, budget_blocks=blocks, threshold=0.999, sink_blocks=1, local_blocks=1,
                           gate_dim=8)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values, lengths=lengths))
    selected = _numpy(pipe.last_run.artifacts["selected"])
    expected = np.full((2, 2, blocks), -1)
    expected[0, :, :2], expected[1, :, :2] = [0, 11], [0, 4]
    np.testing.assert_array_equal(selected, expected)
    ref_out = ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), expected, lengths, 16,
                                   1 / math.sqrt(16))
    np.testing.assert_allclose(out.numpy(), ref_out, rtol=1e-4, atol=1e-5)
    # every block passes a tiny threshold and the budget holds them all: dense attention
    method = SeerAttention(block_size=16, budget_blocks=blocks, threshold=1e-12, gate_dim=8)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values, lengths=lengths))
    selected = _numpy(pipe.last_run.artifacts["selected"])
    assert selected.shape == (2, 2, blocks)
    assert (selected[0] == np.arange(blocks)).all() and (selected[1, :, :5] == np.arange(5)).all()
    assert (selected[1, :, 5:] == -1).all()
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("placement", placements())
@pytest.mark.parametrize("threshold", [None, 0.05])
def test_ties_go_to_the_lower_block(placement, threshold):
    """Every block is a copy of one block: all gate probabilities are equal (exactly, with
    dyadic weights), so the lowest-index blocks win after the forced ones."""
    rng = np.random.default_rng(6)
    block, n_blocks, dim = 16, 12, 16
    one = dyadic(rng, (1, 2, block, dim))
    keys = one.repeat(1, 1, n_blocks, 1)
    _, values, query = make_inputs(6, 1, 2, 2, block * n_blocks, dim, exact=True)
    method = SeerAttention(block_size=block, budget_blocks=4, threshold=threshold, sink_blocks=0, local_blocks=1,
                           gate_dim=8, weights=dyadic_weights(rng, 8, dim))
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values))
    selected = _numpy(pipe.last_run.artifacts["selected"])
    np.testing.assert_array_equal(selected, [[[0, 1, 2, 11]] * 2])
    ids, expected, _, _ = reference(keys, values, query, [block * n_blocks], method)
    np.testing.assert_array_equal(selected, ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("placement", placements())
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_causal_boundaries(placement, threshold):
    """A one-token memory (the first token is the whole context), and sequences whose last
    token opens a new block: that one-token block is attended as the local block."""
    keys, values, query = make_inputs(7, 1, 1, 2, 1, 16)
    method = SeerAttention(block_size=16, budget_blocks=1, threshold=threshold, sink_blocks=0, local_blocks=1,
                           gate_dim=8)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values))
    assert _numpy(pipe.last_run.artifacts["selected"]).tolist() == [[[0]]]
    torch.testing.assert_close(out, values[:, :, 0].repeat_interleave(2, 1), rtol=1e-6, atol=1e-6)

    lengths = [16 * 6 + 1, 16 * 6, 1]
    keys, values, query = make_inputs(8, 3, 2, 2, 16 * 6 + 1, 16)
    method = SeerAttention(**STANDARD, threshold=threshold, sink_blocks=1, local_blocks=1)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values, lengths=lengths))
    selected = _numpy(pipe.last_run.artifacts["selected"])
    ids, expected, probs, _ = reference(keys, values, query, lengths, method)
    assert (selected[0] == 6).any(-1).all() and (selected[1] == 5).any(-1).all()
    assert (selected[:, :, 0] == 0).all() and (selected[2, :, 1:] == -1).all()
    assert decided(probs, lengths, method)
    np.testing.assert_array_equal(selected, ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("placement", placements())
@pytest.mark.parametrize("chunks", [[1] * 20, [7, 1, 30, 2], [100]])
def test_append_equals_rebuild(placement, chunks):
    lengths = [50, 3]
    total = sum(chunks)
    keys, values, query = make_inputs(9, 2, 2, 2, 50 + total, 16)
    method = SeerAttention(**STANDARD, threshold=0.1, sink_blocks=1, local_blocks=1)
    pipe = hetero.Pipeline(method, placement)
    start_keys, start_values = torch.zeros(2, 2, 50, 16), torch.zeros(2, 2, 50, 16)
    for b, n in enumerate(lengths):
        start_keys[b, :, :n], start_values[b, :, :n] = keys[b, :, :n], values[b, :, :n]
    memory = pipe.prepare(start_keys, start_values, lengths=lengths, capacity=64)  # appends must grow it
    done = 0
    for n in chunks:
        new_k = torch.stack([keys[b, :, lengths[b] + done: lengths[b] + done + n] for b in range(2)])
        new_v = torch.stack([values[b, :, lengths[b] + done: lengths[b] + done + n] for b in range(2)])
        pipe.append(memory, new_k, new_v)
        done += n
    assert memory.lengths.tolist() == [n + total for n in lengths]
    seq_k, seq_v = torch.zeros(2, 2, 50 + total, 16), torch.zeros(2, 2, 50 + total, 16)
    for b, n in enumerate(lengths):
        seq_k[b, :, : n + total], seq_v[b, :, : n + total] = keys[b, :, : n + total], values[b, :, : n + total]
    out = pipe.step(query, memory)
    ids, expected, probs, _ = reference(seq_k, seq_v, query, memory.lengths.tolist(), method)
    assert decided(probs, memory.lengths.tolist(), method)
    np.testing.assert_array_equal(_numpy(pipe.last_run.artifacts["selected"]), ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    rebuilt = pipe.prepare(seq_k, seq_v, lengths=memory.lengths.tolist())
    placed = hetero.Placement.resolve(method, placement)
    rel, prep = _on(method, placed[Step.RELEVANCY].id), _on(method, placed[Step.PREPARE].id)
    blocks = ref.num_blocks(max(memory.lengths), 16)
    # block sums run in token order on OpenCL (bit-equal); torch sums blocks its own way
    exact = placed[Step.PREPARE].backend == "opencl"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_host(rel, memory.gate_keys)[:, :, :blocks], _host(rel, rebuilt.gate_keys)[:, :, :blocks],
                               **tol)
    torch.testing.assert_close(_host(prep, memory.tail), _host(prep, rebuilt.tail), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", device_ids())
def test_half_precision(device, dtype):
    """float16 keys are stored as half on OpenCL (float32 compute); bfloat16 as float."""
    keys, values, query = (t.to(dtype) for t in make_inputs(10, 1, 2, 2, 60, 16))
    method = SeerAttention(**STANDARD)  # every block: dense attention
    pipe = hetero.Pipeline(method, device)
    memory = pipe.prepare(keys, values)
    out = pipe.step(query, memory)
    assert out.dtype == dtype
    dense = dense_attention(keys.float(), values.float(), query.float())
    torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)
    run = _on(method, device)  # gate probabilities close to the reference on the rounded inputs
    probs = run.run(Step.RELEVANCY, "relevancy", memory.gate_keys, memory.w_q, query,
                    memory.lengths_for(run, Step.RELEVANCY), 4)
    _, _, expected, _ = reference(keys.float(), values.float(), query.float(), [60], method)
    np.testing.assert_allclose(_host(run, probs).numpy(), expected, rtol=2e-2, atol=1e-3)


# --------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("threshold", [0, 1, 1.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_threshold_outside_unit_interval(threshold):
    with pytest.raises(ValueError, match="threshold"):
        SeerAttention(threshold=threshold)


@pytest.mark.parametrize("options,match", [
    (dict(block_size=0), "block_size"), (dict(budget_blocks=0), "budget_blocks"),
    (dict(budget_tokens=-1), "budget_tokens"), (dict(budget_tokens=64, budget_blocks=1), "not both"),
    (dict(sink_blocks=-1), "sink_blocks"), (dict(local_blocks=1.5), "local_blocks"),
    (dict(budget_blocks=2, sink_blocks=2, local_blocks=1), "sink_blocks \\+ local_blocks"),
    (dict(threshold=0.5, sink_blocks=0, local_blocks=0), "sink_blocks \\+ local_blocks"),
    (dict(gate_dim=0), "gate_dim"), (dict(seed=-1), "seed"), (dict(scale=0.0), "scale"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        SeerAttention(**options)


@pytest.mark.parametrize("weights,match", [
    ({"w_q": torch.zeros(8, 16)}, "weights must be a dict"),
    ({"w_q": torch.zeros(8, 16), "w_k": torch.zeros(8, 16)}, r"weights\['w_k'\] must be \[gate_dim, 2 \* head_dim\] = \[8, 32\]"),
    ({"w_q": torch.zeros(4, 16), "w_k": torch.zeros(4, 32)}, r"weights\['w_q'\] must be \[gate_dim, head_dim\] = \[8,"),
    ({"w_q": torch.zeros(8, 16), "w_k": torch.zeros(9, 32)}, r"weights\['w_k'\]"),
    ({"w_q": torch.zeros(8, 16, 1), "w_k": torch.zeros(8, 32)}, r"weights\['w_q'\] must be a 2-D"),
    ({"w_q": np.zeros((8, 16), dtype=np.int64), "w_k": torch.zeros(8, 32)}, r"weights\['w_q'\] must be a 2-D float"),
    ({"w_q": torch.full((8, 16), float("nan")), "w_k": torch.zeros(8, 32)}, r"weights\['w_q'\] contains NaN"),
    ("w", "weights must be a dict"),
])
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        SeerAttention(gate_dim=8, weights=weights)


def test_weights_of_another_head_dim():
    method = SeerAttention(block_size=4, budget_blocks=3, gate_dim=8,
                           weights={"w_q": np.zeros((8, 16), np.float32), "w_k": np.zeros((8, 32), np.float32)})
    keys, values, _ = make_inputs(0, 1, 1, 1, 20, 24)
    with pytest.raises(ValueError, match=r"weights\['w_q'\].*head_dim 24"):
        hetero.Pipeline(method, CPU).prepare(keys, values)


@pytest.mark.parametrize("options,arg", [(dict(budget_blocks=6), "budget_blocks"),
                                         (dict(budget_tokens=90), "budget_tokens"),
                                         (dict(), "budget_tokens \\(default 2048\\)")])
def test_topk_above_the_context(options, arg):
    method = SeerAttention(block_size=16, gate_dim=8, **options)
    keys, values, query = make_inputs(0, 2, 1, 1, 80, 8)
    pipe = hetero.Pipeline(method, CPU)
    memory = pipe.prepare(keys, values, lengths=[80, 3])  # 5 blocks
    with pytest.raises(ValueError, match=arg):
        pipe.step(query, memory)
    with pytest.raises(ValueError, match=arg):
        method.shapes(context=80)
    # threshold mode takes the budget as a cap only
    pipe = hetero.Pipeline(SeerAttention(block_size=16, gate_dim=8, threshold=0.1, **options), CPU)
    assert pipe.step(query, pipe.prepare(keys, values, lengths=[80, 3])).shape == query.shape


def test_failed_append_leaves_memory_unchanged():
    keys, values, query = make_inputs(1, 1, 2, 1, 40, 8)
    method = SeerAttention(block_size=4, budget_blocks=3, gate_dim=8)
    pipe = hetero.Pipeline(method, CPU)
    memory = pipe.prepare(keys, values)
    before = pipe.step(query, memory)
    gate, tail = memory.gate_keys.clone(), memory.tail.clone()
    for bad_k, bad_v in [(keys[:, :, :3, :4], values[:, :, :3, :4]), (keys[:, :, :3].half(), values[:, :, :3].half()),
                         (keys[:, :, :3] * float("nan"), values[:, :, :3])]:
        with pytest.raises(ValueError):
            pipe.append(memory, bad_k, bad_v)
    assert memory.lengths.tolist() == [40]
    assert torch.equal(memory.gate_keys, gate) and torch.equal(memory.tail, tail)
    torch.testing.assert_close(pipe.step(query, memory), before, rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# registry, cost model, placer
# --------------------------------------------------------------------------------------

def test_registered_and_weights_seeded():
    assert isinstance(get_method("seer", block_size=32), SeerAttention)
    a, b, c = SeerAttention(seed=3), SeerAttention(seed=3), SeerAttention(seed=4)
    assert torch.equal(a.weights(64)["w_k"], b.weights(64)["w_k"])
    assert not torch.equal(a.weights(64)["w_q"], c.weights(64)["w_q"])
    assert a.weights(64)["w_q"].shape == (128, 64) and a.weights(64)["w_k"].shape == (128, 128)


@pytest.mark.parametrize("threshold", [None, 0.01])
@pytest.mark.parametrize("placement", placements())
def test_workload_lists_the_recorded_ops(placement, threshold):
    """The cost model's tasks are the ops the runtime records, in order, for prepare,
    append and step."""
    method = SeerAttention(**STANDARD, threshold=threshold)
    (keys, values), query = method.example_inputs(dict(batch=1, kv_heads=2, q_heads=4, head_dim=16, context=200,
                                                       dtype="float32"))
    pipe = hetero.Pipeline(method, placement)
    placed = pipe.placement
    backends = {s: placed[s].backend for s in hetero.STEPS}
    fused = method.fused(placed)
    memory = pipe.prepare(keys, values)
    calls = [("prepare", dict(appended=200, query=False, allocate=True))]
    recorded = [[r.op for r in pipe.last_run.steps]]
    pipe.append(memory, keys[:, :, :1], values[:, :, :1])
    calls.append(("append", dict(appended=1, query=False)))
    recorded.append([r.op for r in pipe.last_run.steps])
    pipe.step(query, memory)
    calls.append(("step", dict(appended=0, query=True)))
    recorded.append([r.op for r in pipe.last_run.steps])
    shapes = method.shapes_of(memory, query)
    for (call, opts), ops in zip(calls, recorded):
        work = method.workload(shapes, backends, fused, **opts)
        assert [t.op for t in work.tasks] == ops, call
        assert all(t.launches >= 1 for t in work.tasks)


def test_place_and_pipeline_on_opencl(opencl_device):
    method = SeerAttention()
    plan = hetero.place(method, dict(context=32768))
    assert plan.placement and plan.chosen.seconds > 0
    assert plan.explain()
    for objective in ("latency", "energy"):
        hetero.place(SeerAttention(threshold=0.01), dict(context=131072, batch=2), objective=objective)
    hetero.place(method, dict(context=131072), devices=["model:mi210", "model:u55c"])
    shapes = dict(batch=1, kv_heads=2, q_heads=4, head_dim=16, context=4096, dtype="float32")
    inputs, query = method.example_inputs(shapes)
    pipe = hetero.Pipeline(method, opencl_device)
    out = pipe.step(query, pipe.prepare(*inputs))
    selected, expected = method.reference_step(inputs, query)
    np.testing.assert_array_equal(_numpy(pipe.last_run.artifacts["selected"]), selected)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-5)
    auto = hetero.Pipeline(method, "auto", shapes={"q_heads": 4})
    torch.testing.assert_close(auto.step(query, auto.prepare(*inputs)), out, rtol=1e-4, atol=1e-5)
