"""Conformance: every implementation of every PageSparseAttention step equals the reference,
on every device present and on mixed placements."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hetero
from hetero import Step
from hetero.methods import PageSparseAttention, dense_attention
from hetero.methods import page_sparse_reference as ref
from hetero.runtime import Run

from conftest import device_ids, dyadic

CPU = "torch:cpu"


def placements():
    """Every single-device placement present, plus mixed ones when OpenCL is present."""
    out = [pytest.param(d, id=d) for d in device_ids()]
    for cl in device_ids("opencl")[:1]:
        mixed = {
            "cl-relevancy+retrieval": {"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU},
            "cl-prepare+relevancy": {"prepare": cl, "relevancy": cl, "retrieval": CPU, "apply": CPU},
            "cl-retrieval+apply": {"prepare": CPU, "relevancy": CPU, "retrieval": cl, "apply": cl},
            "cl-alternating": {"prepare": cl, "relevancy": CPU, "retrieval": cl, "apply": CPU},
        }
        out += [pytest.param(p, id=name) for name, p in mixed.items()]
    if "host" in device_ids():
        mixed = {"host-relevancy+retrieval": {"prepare": "host", "relevancy": "host", "retrieval": "host", "apply": CPU}}
        for cl in device_ids("opencl")[:1]:  # three devices, every crossing a different pair
            mixed["host-cl-torch"] = {"prepare": cl, "relevancy": "host", "retrieval": cl, "apply": "host"}
        out += [pytest.param(p, id=name) for name, p in mixed.items()]
    return out


def reference_step(keys, values, query, lengths, method):
    lengths = list(lengths)
    mn, mx = ref.page_minmax(keys.double().numpy(), lengths, method.page_size)
    scores = ref.relevancy(mn, mx, query.double().numpy(), lengths, method.page_size)
    ids = ref.retrieval(scores, lengths, method.page_size, method.budget_pages, method.sink_pages, method.local_pages)
    scale = method.scale or 1 / math.sqrt(keys.shape[-1])
    out = ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), ids, lengths, method.page_size, scale)
    return out, ids, scores, (mn, mx)


@st.composite
def problems(draw):
    """Shapes the issue calls adversarial: GQA 1/4/8, odd lengths, single pages, batches of
    different lengths, budgets from one page to everything, sink+local covering all."""
    page = draw(st.sampled_from([4, 16]))
    dim = draw(st.sampled_from([16, 64]))
    group = draw(st.sampled_from([1, 4, 8]))
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 2))
    lengths = draw(st.lists(st.integers(1, 12 * page + 3), min_size=batch, max_size=batch))
    budget = draw(st.sampled_from([1, 2, 4, 8]))
    sink = draw(st.integers(0, min(2, budget)))
    local = draw(st.integers(0, budget - sink))
    seed = draw(st.integers(0, 2**31 - 1))
    return page, dim, group, heads, lengths, budget, sink, local, seed


def make_inputs(seed, batch, heads, group, seq, dim, exact=True):
    rng = np.random.default_rng(seed)
    gen = (lambda shape: dyadic(rng, shape)) if exact else (lambda shape: torch.from_numpy(
        rng.standard_normal(shape).astype(np.float32)))
    return gen((batch, heads, seq, dim)), gen((batch, heads, seq, dim)), gen((batch, heads * group, dim))


@pytest.mark.parametrize("placement", placements())
@given(problem=problems())
def test_pipeline_matches_reference(placement, problem):
    page, dim, group, heads, lengths, budget, sink, local, seed = problem
    keys, values, query = make_inputs(seed, len(lengths), heads, group, max(lengths), dim)
    method = PageSparseAttention(page_size=page, budget_pages=budget, sink_pages=sink, local_pages=local)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys, values, lengths=lengths)
    out = pipe.step(query, memory)
    expected, *_ = reference_step(keys, values, query, lengths, method)
    assert out.shape == query.shape and out.dtype == query.dtype and out.device == query.device
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


def _on(method, device_id):
    dev = hetero.get_device(device_id)
    return Run(method, hetero.Placement({s: dev for s in hetero.STEPS}), "test")


def _host(run, value):
    return run.to_torch(value, torch.device("cpu"))


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("lengths", [[1], [16], [37], [200, 5, 64]])
def test_prepare_matches_reference(device, lengths):
    keys, values, _ = make_inputs(1, len(lengths), 2, 1, max(lengths), 32, exact=False)
    method = PageSparseAttention(page_size=16, budget_pages=4)
    pipe = hetero.Pipeline(method, device)
    memory = pipe.prepare(keys, values, lengths=lengths)
    summary = _host(_on(method, device), memory.summary)
    mn, mx = ref.page_minmax(keys.numpy(), lengths, 16)
    pages = mn.shape[2]
    np.testing.assert_array_equal(summary[:, :, :pages, 0].double().numpy(), mn)
    np.testing.assert_array_equal(summary[:, :, :pages, 1].double().numpy(), mx)
    assert torch.isinf(summary[:, :, pages:]).all()


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("group", [1, 4, 8])
def test_relevancy_matches_reference(device, group):
    lengths = [300, 123]
    keys, values, query = make_inputs(2, 2, 2, group, 300, 64, exact=False)
    method = PageSparseAttention(page_size=16, budget_pages=4)
    memory = hetero.Pipeline(method, device).prepare(keys, values, lengths=lengths)
    run = _on(method, device)
    n_pages = ref.num_pages(300, 16)
    scores = run.run(Step.RELEVANCY, "relevancy", memory.summary, query, memory.lengths_for(run, Step.RELEVANCY), n_pages)
    mn, mx = ref.page_minmax(keys.numpy(), lengths, 16)
    expected = ref.relevancy(mn, mx, query.numpy(), lengths, 16)
    np.testing.assert_allclose(_host(run, scores).numpy(), expected, rtol=1e-5, atol=1e-4)


def retrieval_cases():
    rng = np.random.default_rng(3)
    ties = np.zeros((2, 3, 40), dtype=np.float32)  # every score equal: the lowest pages win
    ties[0, 1, 30:] = 1.0  # a run of equal maxima
    plateau = np.round(rng.standard_normal((2, 3, 40)), 0).astype(np.float32)  # many ties
    distinct = rng.standard_normal((2, 3, 40)).astype(np.float32)
    lengths = [40 * 16, 17 * 16 - 5]
    return [pytest.param(s, lengths, k, sink, local, id=f"{name}-k{k}-s{sink}-l{local}")
            for name, s in (("ties", ties), ("plateau", plateau), ("distinct", distinct))
            for k, sink, local in ((1, 0, 0), (5, 1, 2), (8, 0, 8), (17, 2, 2), (40, 1, 1))]


@pytest.mark.parametrize("device", device_ids())
@pytest.mark.parametrize("scores,lengths,k,sink,local", retrieval_cases())
def test_retrieval_matches_reference(device, scores, lengths, k, sink, local):
    method = PageSparseAttention(page_size=16, budget_pages=max(k, 1), sink_pages=sink, local_pages=local)
    scores = scores.copy()
    for b, n in enumerate(lengths):
        scores[b, :, ref.num_pages(n, 16):] = -np.inf
    run = _on(method, device)
    lengths_t = torch.tensor(lengths, dtype=torch.int32)
    ids = run.run(Step.RETRIEVAL, "retrieval", torch.from_numpy(scores), lengths_t, min(k, 40), sink, local)
    expected = ref.retrieval(scores, lengths, 16, k, sink, local)
    np.testing.assert_array_equal(_host(run, ids).numpy(), expected)


@pytest.mark.parametrize("device", device_ids())
def test_apply_matches_reference(device):
    lengths = [100, 37]
    keys, values, query = make_inputs(4, 2, 2, 4, 100, 64, exact=False)
    method = PageSparseAttention(page_size=16, budget_pages=3)
    memory = hetero.Pipeline(method, device).prepare(keys, values, lengths=lengths)
    ids = np.array([[[0, 3, 6], [1, 2, -1]], [[0, 2, -1], [2, -1, -1]]])
    run = _on(method, device)
    out = run.run(Step.APPLY, "sparse_attention", memory.k_cache, memory.v_cache, query,
                  torch.from_numpy(ids.astype(np.int32)), memory.lengths_for(run, Step.APPLY), 0.125)
    expected = ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), ids, lengths, 16, 0.125)
    np.testing.assert_allclose(_host(run, out).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", placements())
@pytest.mark.parametrize("group", [1, 4, 8])
def test_full_budget_equals_dense_attention(placement, group):
    lengths = [333, 70]
    keys, values, query = make_inputs(5, 2, 2, group, 333, 64, exact=False)
    method = PageSparseAttention(page_size=16, budget_pages=ref.num_pages(333, 16))
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values, lengths=lengths))
    dense = ref.dense_attention(keys.numpy(), values.numpy(), query.numpy(), lengths, 1 / math.sqrt(64))
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_attention(keys, values, query, lengths), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("placement", placements())
def test_sink_and_local_covering_everything(placement):
    keys, values, query = make_inputs(6, 1, 1, 4, 64, 16)
    method = PageSparseAttention(page_size=16, budget_pages=4, sink_pages=2, local_pages=2)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(query, pipe.prepare(keys, values))
    dense = ref.dense_attention(keys.numpy(), values.numpy(), query.numpy(), [64], 1 / math.sqrt(16))
    np.testing.assert_allclose(out.numpy(), dense, rtol=1e-5, atol=1e-5)


def test_mixed_placements_agree_with_single_device():
    keys, values, query = make_inputs(7, 2, 4, 4, 2000, 128, exact=False)
    method = PageSparseAttention(page_size=16, budget_tokens=256)
    outs = {}
    for p in placements():
        pipe = hetero.Pipeline(method, p.values[0])
        outs[p.id] = pipe.step(query, pipe.prepare(keys, values, lengths=[2000, 1234]))
    first = next(iter(outs.values()))
    for name, out in outs.items():
        torch.testing.assert_close(out, first, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("placement", placements())
@pytest.mark.parametrize("chunks", [[1] * 40, [7, 1, 30, 2], [100, 100]])
def test_append_equals_rebuild(placement, chunks):
    lengths = [50, 3]
    total = sum(chunks)
    keys, values, query = make_inputs(8, 2, 2, 4, 50 + total, 32)
    method = PageSparseAttention(page_size=16, budget_pages=3, sink_pages=1, local_pages=1)
    pipe = hetero.Pipeline(method, placement)
    # sequences start at different lengths; every append adds the same count to each
    start_keys = torch.zeros(2, 2, 50, 32)
    start_values = torch.zeros(2, 2, 50, 32)
    for b, n in enumerate(lengths):
        start_keys[b, :, :n] = keys[b, :, :n]
        start_values[b, :, :n] = values[b, :, :n]
    memory = pipe.prepare(start_keys, start_values, lengths=lengths, capacity=64)  # appends must grow it
    done = 0
    for n in chunks:
        new_k = torch.stack([keys[b, :, lengths[b] + done: lengths[b] + done + n] for b in range(2)])
        new_v = torch.stack([values[b, :, lengths[b] + done: lengths[b] + done + n] for b in range(2)])
        pipe.append(memory, new_k, new_v)
        done += n
    assert memory.lengths.tolist() == [n + total for n in lengths]
    # the same tokens per sequence, prepared in one go
    seq_k = torch.zeros(2, 2, 50 + total, 32)
    seq_v = torch.zeros(2, 2, 50 + total, 32)
    for b, n in enumerate(lengths):
        seq_k[b, :, : n + total] = keys[b, :, : n + total]
        seq_v[b, :, : n + total] = values[b, :, : n + total]
    out = pipe.step(query, memory)
    expected, *_ = reference_step(seq_k, seq_v, query, memory.lengths.tolist(), method)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    rebuilt = pipe.prepare(seq_k, seq_v, lengths=memory.lengths.tolist())
    run = _on(method, hetero.Placement.resolve(method, placement)[Step.RELEVANCY].id)
    pages = ref.num_pages(max(memory.lengths), 16)
    torch.testing.assert_close(_host(run, memory.summary)[:, :, :pages], _host(run, rebuilt.summary)[:, :, :pages],
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", device_ids())
def test_half_precision(device, dtype):
    keys, values, query = (t.to(dtype) for t in make_inputs(9, 1, 2, 4, 300, 64, exact=False))
    method = PageSparseAttention(page_size=16, budget_pages=ref.num_pages(300, 16))
    pipe = hetero.Pipeline(method, device)
    memory = pipe.prepare(keys, values)
    out = pipe.step(query, memory)
    assert out.dtype == dtype
    dense = dense_attention(keys.float(), values.float(), query.float())
    torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("placement", placements())
def test_needle_is_retrieved(placement):
    """A page whose keys align with the query must be selected over noise."""
    rng = np.random.default_rng(10)
    seq, dim = 4096, 64
    keys = torch.from_numpy(rng.standard_normal((1, 2, seq, dim)).astype(np.float32)) * 0.1
    values = torch.from_numpy(rng.standard_normal((1, 2, seq, dim)).astype(np.float32))
    query = torch.from_numpy(rng.standard_normal((1, 8, dim)).astype(np.float32))
    needle = 1234
    keys[0, :, needle] = 4 * query[0, ::4] / query[0, ::4].norm(dim=-1, keepdim=True)
    method = PageSparseAttention(page_size=16, budget_pages=8)
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys, values)
    out = pipe.step(query, memory)
    selected = pipe.last_run.artifact("page_ids")
    assert (selected == needle // 16).any(dim=-1).all()
    expected, ids, _, _ = reference_step(keys, values, query, [seq], method)
    np.testing.assert_array_equal(selected.numpy(), ids)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
