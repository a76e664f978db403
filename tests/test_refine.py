"""hetero.place(..., refine=N): the model ranks, measurement of its N best settles the choice."""

import pytest
import torch

import hetero
from hetero.methods import PageSparseAttention

from conftest import device_ids

SHAPES = dict(batch=1, kv_heads=2, q_heads=4, head_dim=16, context=300, dtype="float32")
MODELED = ["model:mi210", "model:u55c"]


@pytest.fixture(scope="module")
def cpu_devices():
    ids = [d for d in ("torch:cpu", "host") if d in device_ids()]
    if len(ids) < 2:
        pytest.skip("needs torch:cpu and the host shim")
    return ids


def method():
    return PageSparseAttention(page_size=16, budget_tokens=64)


def test_refine_measures_the_best_predicted_and_takes_the_fastest(cpu_devices):
    plan = hetero.place(method(), SHAPES, devices=cpu_devices, refine=3, refine_rounds=2)
    top = [e.label() for e in plan.ranked[:3]]
    baselines = [e.label() for e in plan.baselines.values() if e.label() not in top]
    assert list(plan.measured) == top + baselines  # the model's three best, in its order, then the baselines
    assert all(t > 0 for t in plan.measured.values())
    assert plan.chosen.label() == min(plan.measured, key=plan.measured.get)
    if plan.predicted_choice is None:
        assert plan.chosen is plan.ranked[0]
    else:
        assert plan.predicted_choice is plan.ranked[0] and plan.chosen is not plan.ranked[0]
    assert "refined by measuring the 3 best-predicted placements and the single-device baselines" in plan.search
    text = plan.explain()
    assert "refined by measurement" in text and "measured" in text


def test_no_refine_measures_nothing(cpu_devices):
    plan = hetero.place(method(), SHAPES, devices=cpu_devices)
    assert plan.measured == {} and plan.predicted_choice is None and plan.chosen is plan.ranked[0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(refine=-1), "refine must be"), (dict(refine=True), "refine must be"), (dict(refine=2.0), "refine must be"),
    (dict(refine=2, objective="energy"), "objective='latency'"), (dict(refine=2, refine_rounds=0), "refine_rounds"),
])
def test_refine_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hetero.place(method(), SHAPES, devices=["torch:cpu"], **kwargs)


def test_refine_leaves_modeled_devices_to_the_model():
    plan = hetero.place(method(), SHAPES, devices=MODELED, home="model:mi210", refine=3)
    assert plan.measured == {} and "nothing to refine" in plan.search


def test_auto_pipeline_refines_at_prepare(cpu_devices):
    m = method()
    pipe = hetero.Pipeline(m, placement="auto", devices=cpu_devices, refine=2, shapes=dict(q_heads=4))
    (keys, values), query = m.example_inputs(SHAPES)
    memory = pipe.prepare(keys, values)
    assert len(pipe.plan.measured) >= 2
    assert {s.value: d.id for s, d in pipe.placement.items()} == pipe.plan.placement
    out = pipe.step(query, memory)
    assert out.shape == query.shape and torch.isfinite(out).all()
