"""Conformance: every implementation of MemoryAsContext equals the reference
(hetero/methods/mac_reference.py), on every device present and on mixed placements."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hetero
from hetero import Step
from hetero.methods import MemoryAsContext, get_method
from hetero.methods import mac_reference as ref
from hetero.runtime import Placement, PlacementError, Run

from conftest import device_ids, dyadic

CPU = "torch:cpu"


def placements():
    """Every placement the method can run: apply (a concatenation feeding the model) stays
    on torch or the host."""
    out = [pytest.param(d, id=d) for d in device_ids() if not d.startswith("opencl")]
    for cl in device_ids("opencl")[:1]:
        out += [pytest.param({"prepare": CPU, "relevancy": cl, "retrieval": cl, "apply": CPU}, id="cl-fused"),
                pytest.param({"prepare": cl, "relevancy": CPU, "retrieval": cl, "apply": "host"}, id="cl-split"),
                pytest.param({"prepare": "host", "relevancy": cl, "retrieval": "host", "apply": CPU}, id="cl-host")]
    return out


def reference(method, memory, segment, lengths):
    w = method.weights(memory.shape[-1])
    keys = ref.memory_keys(memory.double().numpy(), w["w_k"].numpy())
    scores = ref.relevancy(keys, segment.double().numpy(), w["w_q"].numpy(), lengths, method.scale)
    return ref.prepend(ref.retrieval(scores, memory.double().numpy(), lengths, method.top_k), segment.double().numpy())


@st.composite
def problems(draw):
    """Batches whose sequences hold 0 entries (a first segment) up to 40, top_k from all to
    one, odd dims."""
    batch = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    return (lengths, draw(st.sampled_from([0, 1, 3, 100])), draw(st.sampled_from([8, 24, 33])),
            draw(st.integers(1, 5)), draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("placement", placements())
@given(problem=problems())
def test_pipeline_matches_reference(placement, problem):
    lengths, top_k, dim, seg_len, seed = problem
    rng = np.random.default_rng(seed)
    memory = torch.from_numpy(rng.standard_normal((len(lengths), max(lengths), dim)).astype(np.float32))
    segment = torch.from_numpy(rng.standard_normal((len(lengths), seg_len, dim)).astype(np.float32))
    method = MemoryAsContext(key_dim=16, top_k=top_k)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(segment, pipe.prepare(memory, lengths=lengths))
    assert out.shape == (len(lengths), seg_len + 1, dim) and out.dtype == segment.dtype
    np.testing.assert_allclose(out.numpy(), reference(method, memory, segment, lengths), rtol=1e-5, atol=1e-5)
    for b, n in enumerate(lengths):
        if n == 0:  # nothing to read yet: a zero vector first
            assert not out[b, 0].any()


@pytest.mark.parametrize("placement", placements())
def test_top_k_ties_take_the_lower_index(placement):
    """Dyadic entries and weights make every score exact; duplicated entries tie, and the
    readout must average exactly the lower-index ones (entry 0 and 1 tie with 5 and 6)."""
    rng = np.random.default_rng(1)
    dim = 8
    weights = {"w_q": dyadic(rng, (4, dim)), "w_k": dyadic(rng, (4, dim))}
    memory = dyadic(rng, (1, 9, dim))
    memory[0, 5], memory[0, 6] = memory[0, 0], memory[0, 1]
    segment = dyadic(rng, (1, 2, dim))
    method = MemoryAsContext(key_dim=4, top_k=3, weights=weights, scale=1.0)
    pipe = hetero.Pipeline(method, placement)
    out = pipe.step(segment, pipe.prepare(memory))
    np.testing.assert_allclose(out.numpy(), reference(method, memory, segment, [9]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("placement", placements())
def test_append_equals_rebuild(placement):
    rng = np.random.default_rng(2)
    memory = torch.from_numpy(rng.standard_normal((2, 30, 16)).astype(np.float32))
    segment = torch.from_numpy(rng.standard_normal((2, 4, 16)).astype(np.float32))
    method = MemoryAsContext(key_dim=8, top_k=5)
    pipe = hetero.Pipeline(method, placement)
    bank = pipe.prepare(memory[:, :0], capacity=4)  # empty: the first segment
    first = pipe.step(segment, bank)
    assert not first[:, 0].any()
    for a, b in ((0, 1), (1, 7), (7, 30)):
        pipe.append(bank, memory[:, a:b])
    np.testing.assert_allclose(pipe.step(segment, bank).numpy(), pipe.step(segment, pipe.prepare(memory)).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert bank.lengths.tolist() == [30, 30] and bank.token_capacity >= 30


@pytest.mark.parametrize("device", [d for d in device_ids() if d.startswith("opencl")])
def test_fused_equals_unfused(device):
    rng = np.random.default_rng(3)
    memory = torch.from_numpy(rng.standard_normal((2, 50, 24)).astype(np.float32))
    segment = torch.from_numpy(rng.standard_normal((2, 3, 24)).astype(np.float32))
    for top_k in (0, 4):
        method = MemoryAsContext(key_dim=16, top_k=top_k)
        bank = hetero.Pipeline(method, {"prepare": CPU, "relevancy": device, "retrieval": device,
                                        "apply": CPU}).prepare(memory, lengths=[50, 17])
        run = Run(method, Placement({s: hetero.get_device(device) for s in hetero.STEPS}), "t")
        lengths = bank.lengths_for(run, Step.RELEVANCY)
        scores = run.run(Step.RELEVANCY, "relevancy", bank.keys, bank.w_q, segment, lengths, 50, method.scale)
        split = run.run(Step.RETRIEVAL, "retrieval", scores, bank.values, lengths, top_k)
        fused = run.run(Step.RELEVANCY, "relevancy_retrieval", bank.keys, bank.values, bank.w_q, segment, lengths, 50,
                        method.scale, top_k)
        cpu = torch.device("cpu")
        np.testing.assert_array_equal(run.to_torch(fused, cpu).numpy(), run.to_torch(split, cpu).numpy())


def test_apply_cannot_run_on_opencl():
    if not device_ids("opencl"):
        pytest.skip("no OpenCL device")
    with pytest.raises(PlacementError, match="prepend"):
        hetero.Pipeline(MemoryAsContext(), device_ids("opencl")[0])


@pytest.mark.parametrize("options,match", [
    (dict(key_dim=0), "key_dim"), (dict(top_k=-1), "top_k"), (dict(scale=0.0), "scale"),
    (dict(weights={"w_q": torch.zeros(4, 8)}), "weights"),
    (dict(key_dim=4, weights={"w_q": torch.zeros(4, 8), "w_k": torch.zeros(5, 8)}), r"weights\['w_k'\]"),
    (dict(key_dim=4, weights={"w_q": torch.zeros(4, 8), "w_k": torch.zeros(4, 9)}), "same shape"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        MemoryAsContext(**options)


def test_bad_inputs_leave_memory_unchanged():
    method = MemoryAsContext(key_dim=4)
    pipe = hetero.Pipeline(method, CPU)
    memory = torch.randn(1, 5, 8)
    with pytest.raises(ValueError, match="lengths"):
        pipe.prepare(memory, lengths=[6])
    bank = pipe.prepare(memory)
    segment = torch.randn(1, 2, 8)
    before = pipe.step(segment, bank)
    with pytest.raises(ValueError, match=r"segments must be \[1, n, 8\]"):
        pipe.append(bank, torch.randn(1, 2, 9))
    bad = torch.randn(1, 2, 8)
    bad[0, 1, 3] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        pipe.append(bank, bad)
    with pytest.raises(ValueError, match="query must be"):
        pipe.step(torch.randn(1, 2, 7), bank)
    assert bank.lengths.tolist() == [5]
    torch.testing.assert_close(pipe.step(segment, bank), before)


def test_registry_cost_model_and_example():
    method = get_method("mac", top_k=8)
    plan = hetero.place(method, dict(entries=16384))
    assert set(plan.placement) == set(hetero.STEPS) and "relevancy" in plan.explain()
    inputs, segment = method.example_inputs(dict(entries=100, dim=32, segment=7))
    read, expected = method.reference_step(inputs, segment)
    assert read.shape == (1, 1, 8)
    pipe = hetero.Pipeline(method, CPU)
    np.testing.assert_allclose(pipe.step(segment, pipe.prepare(*inputs)).numpy(), expected, rtol=1e-5, atol=1e-5)
    for backend in ("torch", "host", "opencl"):
        backends = {s: backend for s in hetero.STEPS}
        backends[Step.APPLY] = "torch"
        work = method.workload(method.shapes(entries=1000), backends, backend == "opencl")
        assert "prepend" in {t.op for t in work.tasks}
