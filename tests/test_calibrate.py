"""`hetero calibrate`: robust statistics, the op fit, and a real (tiny) calibration."""

import dataclasses

import numpy as np
import pytest
import torch

import hetero
from hetero import Pipeline, cli
from hetero.cost import calibrate as cal
from hetero.cost import load, profiles
from hetero.methods import METHODS, PageSparseAttention, get_method

TINY_GRID = [dict(batch=1, kv_heads=2, q_heads=4, context=512), dict(batch=1, kv_heads=2, q_heads=4, context=2048)]
# DSA's top_k and Seer's budget are 2,048 tokens by default: their contexts start there
TINY_GRID_2K = [dict(batch=1, kv_heads=2, q_heads=4, context=2048), dict(batch=1, kv_heads=2, q_heads=4, context=4096)]


def test_robust_median_ignores_one_huge_sample():
    samples = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    assert cal.robust_median(samples + [100.0]) == pytest.approx(np.median(samples), rel=1e-12)
    assert cal.robust_median(samples + [0.01]) == pytest.approx(np.median(samples), rel=1e-12)
    assert 100.0 not in cal.robust_keep(samples + [100.0])


def test_robust_median_of_identical_samples():
    assert cal.robust_median([2.0, 2.0, 2.0, 5.0]) == 2.0


def test_robust_fit_recovers_overhead_and_efficiency_despite_an_outlier():
    rng = np.random.default_rng(0)
    roof = np.geomspace(1e-5, 1e-2, 10)
    measured = (50e-6 + roof / 0.4) * (1 + 0.01 * rng.standard_normal(roof.size))
    measured[4] *= 10  # one noisy point
    fit = cal.robust_fit(roof, measured)
    assert fit["overhead"] == pytest.approx(50e-6, rel=0.1)
    assert fit["efficiency"] == pytest.approx(0.4, rel=0.05)
    assert fit["kept"] == roof.size - 1 and not fit["clamped"]


def test_robust_fit_clamps_efficiency_to_one():
    roof = np.geomspace(1e-5, 1e-3, 6)
    fit = cal.robust_fit(roof, 1e-4 + roof / 2.0)  # "efficiency 2": the roofline's bandwidth is too low
    assert fit["efficiency"] == 1.0 and fit["clamped"] and fit["overhead"] > 0


def test_quick_calibration_writes_a_profile_that_loads(tmp_path):
    path = tmp_path / "machine.toml"
    result = cal.calibrate(devices=["torch:cpu"], methods=["page-sparse"], quick=True, path=path, repeats=2,
                           grid=TINY_GRID)
    profiles = load(path)
    prof = profiles.devices["torch:cpu"]
    assert prof.part == "host-cpu" and prof.memory[-1].name == "DRAM"
    assert all(a.bandwidth > b.bandwidth for a, b in zip(prof.memory, prof.memory[1:]))
    assert "PageSparseAttention.sparse_attention" in prof.ops
    assert all(0 < f.efficiency <= 1 and f.overhead >= 0 for f in prof.ops.values())
    assert "calibrated" in prof.sources["launch"] and "MAD" in prof.sources["launch"]
    assert "no RAPL" in prof.sources["active_power"]
    assert set(result.devices) == {"torch:cpu"}
    # one device: no device change was measured, so no handoff, and the source says so
    assert prof.handoff == 0 and "no decode step" in prof.sources["handoff"]
    assert result.report["decode_steps"] and all(r["wall_s"] > 0 for r in result.report["decode_steps"])


@pytest.mark.skipif(not any(d.backend == "opencl" for d in hetero.devices()), reason="no OpenCL device")
def test_opencl_gets_a_host_link(tmp_path):
    dev = next(d.id for d in hetero.devices() if d.backend == "opencl")
    path = tmp_path / "m.toml"
    cal.calibrate(devices=[dev], methods=["page-sparse"], quick=True, path=path, repeats=1, grid=TINY_GRID[:1])
    profiles = load(path)
    link = profiles.links[f"{dev} host link"]
    assert profiles.devices[dev].host_link == link.name and link.between == (dev, "host")
    assert link.bandwidth > 0 and link.latency > 0


def test_cli_calibrate_quick(tmp_path, capsys):
    out = tmp_path / "cli.toml"
    assert cli.main(["calibrate", "--quick", "--devices", "torch:cpu", "--out", str(out), "--repeats", "2",
                     "--methods", "seer"]) == 0
    assert out.is_file() and "torch:cpu" in load(out).devices
    assert {op.split(".")[0] for op in load(out).devices["torch:cpu"].ops} == {"SeerAttention"}
    assert str(out) in capsys.readouterr().out.replace("\n", "")
    assert cli.main(["calibrate", "--methods", "nope", "--out", str(tmp_path / "no.toml")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().out and not (tmp_path / "no.toml").exists()


@pytest.mark.parametrize("name", [name for name, cls in METHODS.items() if cls.TOKEN_AXES])
def test_decode_inputs_are_one_token_appends_shaped_like_the_prepare_inputs(name):
    method = get_method(name)
    inputs, query = method.example_inputs(cal.method_shapes(method, dict(batch=2, kv_heads=2, q_heads=4, context=2048)))
    halves = tuple(x.half() for x in inputs)
    new = method.decode_inputs(halves, 3, seed=1)
    assert len(new) == 3 and all(len(append) == len(inputs) == len(method.TOKEN_AXES) for append in new)
    for append in new:
        for x, a, axis in zip(halves, append, method.TOKEN_AXES):
            assert x.shape[axis] == 2048 and a.shape == x.shape[:axis] + (1,) + x.shape[axis + 1:]
            assert a.dtype == torch.float16 and a.device == x.device
    assert not torch.equal(new[0][0], new[1][0])
    assert all(torch.equal(a, b) for a, b in zip(new[2], method.decode_inputs(halves, 3, seed=1)[2]))
    with pytest.raises(ValueError, match="prepare inputs"):
        method.decode_inputs(inputs + inputs, 1)
    pipe = Pipeline(method, "torch:cpu")  # what calibration runs: prepare, one-token appends, steps
    memory = pipe.prepare(*inputs)
    for append in method.decode_inputs(inputs, 2):
        pipe.append(memory, *append)
        pipe.step(query, memory)
    assert memory.max_length == 2050


def test_tensor_methods_can_be_calibrated_and_others_are_refused_up_front(tmp_path):
    assert all(cal.calibratable(METHODS[name]) for name in ("page-sparse", "dsa", "seer", "mac"))

    class NoAppends(PageSparseAttention):
        TOKEN_AXES = ()

    with pytest.raises(ValueError, match="cannot be calibrated"):
        cal.calibrate(devices=["torch:cpu"], methods=[NoAppends()], path=tmp_path / "x.toml")
    assert not (tmp_path / "x.toml").exists()


def test_dsa_calibration_fits_its_ops_and_changes_the_placer(tmp_path):
    path = tmp_path / "dsa.toml"
    result = cal.calibrate(devices=["torch:cpu"], methods=["dsa"], quick=True, path=path, repeats=2,
                           grid=TINY_GRID_2K)
    assert result.report["methods"] == ["DSAIndexer"]
    written = load(path)
    prof = written.devices["torch:cpu"]
    assert {f"DSAIndexer.{op}" for op in ("project_keys", "project_query", "store_tokens", "relevancy", "retrieval",
                                          "sparse_attention")} <= set(prof.ops)
    assert all(op.startswith("DSAIndexer.") for op in prof.ops)
    # the same profile without its op fits (the per-pattern efficiencies kept): the fits alone move the prediction
    unfitted = tmp_path / "unfitted.toml"
    unfitted.write_text(profiles.dumps([dataclasses.replace(prof, ops={})], list(written.links.values())))
    method, shapes = get_method("dsa"), dict(context=65536, dtype="float32")
    try:
        hetero.cost.add_profiles(unfitted)
        before = hetero.place(method, shapes, devices=["torch:cpu"]).chosen.seconds
        hetero.cost.add_profiles(path)
        after = hetero.place(method, shapes, devices=["torch:cpu"]).chosen.seconds
    finally:
        hetero.cost.reload()
    assert after != pytest.approx(before, rel=1e-3)


@pytest.mark.skipif(not any(d.backend == "host" for d in hetero.devices()), reason="no host (C++ shim) device")
def test_op_placements_move_a_step_the_method_cannot_run():
    class NoApplyOnHost:
        def why_not(self, step, device):
            return ["no apply here"] if step is hetero.Step.APPLY and device.backend == "host" else []

    placements = cal.op_placements(["torch:cpu", "host"], NoApplyOnHost())
    assert {"prepare": "host", "relevancy": "host", "retrieval": "host", "apply": "torch:cpu"} in placements
    assert all(p["apply"] == "torch:cpu" for p in placements) and len(placements) == 4
    assert len(cal.op_placements(["torch:cpu", "host"])) == 4


def test_calibrating_some_methods_keeps_the_other_methods_fits(tmp_path):
    path = tmp_path / "machine.toml"
    cal.calibrate(devices=["torch:cpu"], methods=["page-sparse"], quick=True, path=path, repeats=1, grid=TINY_GRID_2K)
    first = load(path).devices["torch:cpu"]
    page_ops = {op for op in first.ops if op.startswith("PageSparseAttention.")}
    assert page_ops
    result = cal.calibrate(devices=["torch:cpu"], methods=["dsa"], quick=True, path=path, repeats=1,
                           grid=TINY_GRID_2K)
    merged = load(path).devices["torch:cpu"]
    assert page_ops <= set(merged.ops) and any(op.startswith("DSAIndexer.") for op in merged.ops)
    assert set(result.report["kept_fits"]["torch:cpu"]) == page_ops
    for op in page_ops:  # carried over unchanged, with their own sources
        assert merged.ops[op] == first.ops[op]
        assert merged.sources[f"ops.{op}.overhead"] == first.sources[f"ops.{op}.overhead"]


@pytest.mark.skipif("host" not in [d.id for d in hetero.devices()], reason="the host shim is not built")
def test_two_devices_get_fitted_handoffs(tmp_path):
    path = tmp_path / "two.toml"
    result = cal.calibrate(devices=["torch:cpu", "host"], methods=["page-sparse"], quick=True, path=path, repeats=1,
                           grid=TINY_GRID_2K)
    fitted = result.report["handoffs"]
    assert set(fitted) == {"torch:cpu", "host"}  # the split placements change device both ways
    written = load(path)
    for dev, h in fitted.items():
        assert h["seconds"] >= 0 and h["changes"] > 0 and h["steps"] == len(result.report["decode_steps"])
        assert written.devices[dev].handoff == pytest.approx(h["seconds"], rel=1e-3, abs=1e-12)
        assert "fitted to" in written.devices[dev].sources["handoff"]
