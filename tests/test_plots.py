"""The profiler's PNG plots: files written, sizes plausible, bad input refused by name."""

import pytest
from matplotlib.image import imread

from hetero.profiling import plots

PNG = b"\x89PNG\r\n\x1a\n"
MIXED = "prepare=torch:cpu, relevancy=opencl:0:0, retrieval=opencl:0:0, apply=torch:cpu"
DEVICES = {"opencl:0:0": {"peak_flops": 2.4e11, "levels": [("L2", 5.1e10), ("DRAM", 1.8e10)], "modeled": False},
           "model:u55c": {"peak_flops": 1e12, "levels": [("BRAM", 3e13), ("HBM", 4.6e11)], "modeled": True}}


def check_png(path, min_bytes=5000):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_bytes
    height, width = imread(path).shape[:2]
    assert width > 600 and height > 300


def test_breakdown(tmp_path):
    out = plots.plot_breakdown({"all=torch:cpu": {"relevancy": 1e-3, "retrieval": 5e-4, "apply": 4e-3, "other": 1e-4},
                                MIXED: {"relevancy+retrieval": 8e-4, "apply": 4e-3, "transfers": 2e-5}},
                               tmp_path / "sub" / "b.png", modeled={MIXED})
    check_png(out)
    check_png(plots.plot_breakdown({"tiny": {"apply": 3e-6, "transfers": 1e-6}}, tmp_path / "us.png"))


def test_roofline_skips_zero_flop_points(tmp_path):
    points = [dict(device="opencl:0:0", label="relevancy", intensity=2.0, flops_per_s=1.2e10, measured=True),
              dict(device="opencl:0:0", label="retrieval", intensity=0.0, flops_per_s=0.0, measured=True),
              dict(device="model:u55c", label="relevancy+retrieval", intensity=2.0, flops_per_s=3e11, measured=False)]
    check_png(plots.plot_roofline(DEVICES, points, tmp_path / "r.png"))


def test_predicted_vs_measured(tmp_path):
    points = [dict(label=s, device=d, predicted_s=p, measured_s=m) for s, d, p, m in
              (("relevancy", "torch:cpu", 1e-3, 1.1e-3), ("apply", "torch:cpu", 4e-3, 3.6e-3),
               ("relevancy+retrieval", "opencl:0:0", 8e-4, 9e-4))]
    check_png(plots.plot_predicted_vs_measured(points, tmp_path / "p.png"))


@pytest.mark.parametrize("call, match", [
    (lambda p: plots.plot_breakdown({}, p), "breakdown is empty"),
    (lambda p: plots.plot_breakdown({"a": {"apply": -1.0}}, p), "negative time"),
    (lambda p: plots.plot_breakdown({"a": {"apply": 1.0}}, p, modeled={"b"}), "modeled"),
    (lambda p: plots.plot_roofline(DEVICES, [], p), "points is empty"),
    (lambda p: plots.plot_roofline({"x": {"peak_flops": -1, "levels": [("DRAM", 1e9)]}},
                                   [dict(device="x", label="apply", intensity=1, flops_per_s=1, measured=True)], p),
     "peak_flops"),
    (lambda p: plots.plot_roofline(DEVICES, [dict(device="nope", label="apply", intensity=1, flops_per_s=1,
                                                  measured=True)], p), "device 'nope'"),
    (lambda p: plots.plot_predicted_vs_measured([dict(label="a", device="d", predicted_s=0.0, measured_s=1.0)], p),
     "must be > 0"),
])
def test_bad_input_named(tmp_path, call, match):
    path = tmp_path / "never.png"
    with pytest.raises(ValueError, match=match):
        call(path)
    assert not path.exists()
