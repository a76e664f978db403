"""`hetero calibrate`: robust statistics, the op fit, and a real (tiny) calibration."""

import numpy as np
import pytest

import hetero
from hetero import cli
from hetero.cost import calibrate as cal
from hetero.cost import load

TINY_GRID = [dict(batch=1, kv_heads=2, q_heads=4, context=512), dict(batch=1, kv_heads=2, q_heads=4, context=2048)]


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
    result = cal.calibrate(devices=["torch:cpu"], quick=True, path=path, repeats=2, grid=TINY_GRID)
    profiles = load(path)
    prof = profiles.devices["torch:cpu"]
    assert prof.part == "host-cpu" and prof.memory[-1].name == "DRAM"
    assert all(a.bandwidth > b.bandwidth for a, b in zip(prof.memory, prof.memory[1:]))
    assert "PageSparseAttention.sparse_attention" in prof.ops
    assert all(0 < f.efficiency <= 1 and f.overhead >= 0 for f in prof.ops.values())
    assert "calibrated" in prof.sources["launch"] and "MAD" in prof.sources["launch"]
    assert "no RAPL" in prof.sources["active_power"]
    assert set(result.devices) == {"torch:cpu"}


@pytest.mark.skipif(not any(d.backend == "opencl" for d in hetero.devices()), reason="no OpenCL device")
def test_opencl_gets_a_host_link(tmp_path):
    dev = next(d.id for d in hetero.devices() if d.backend == "opencl")
    path = tmp_path / "m.toml"
    cal.calibrate(devices=[dev], quick=True, path=path, repeats=1, grid=TINY_GRID[:1])
    profiles = load(path)
    link = profiles.links[f"{dev} host link"]
    assert profiles.devices[dev].host_link == link.name and link.between == (dev, "host")
    assert link.bandwidth > 0 and link.latency > 0


def test_cli_calibrate_quick(tmp_path, capsys):
    out = tmp_path / "cli.toml"
    assert cli.main(["calibrate", "--quick", "--devices", "torch:cpu", "--out", str(out), "--repeats", "2"]) == 0
    assert out.is_file() and "torch:cpu" in load(out).devices
    assert str(out) in capsys.readouterr().out.replace("\n", "")
