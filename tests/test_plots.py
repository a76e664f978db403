"""hetero.profiling.plots: the three PNG plots write real images of the expected size, reject
empty and invalid input with ValueError naming the argument, and leave matplotlib's global
state alone. Any warning (e.g. constrained layout giving up) fails a test."""

import math
import re

import matplotlib
import matplotlib.image
import pytest

from hetero.profiling.plots import (DPI, STEP_COLORS, plot_breakdown, plot_predicted_vs_measured, plot_roofline,
                                    step_color)

pytestmark = pytest.mark.filterwarnings("error")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path, figsize=None):
    """A PNG of plausible size; exactly figsize*DPI pixels where the size was given, else
    (width, height) in pixels."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000
    height, width = matplotlib.image.imread(path).shape[:2]
    if figsize is not None:
        assert (width, height) == (round(figsize[0] * DPI), round(figsize[1] * DPI))
    return width, height


def placement(p, r, t, a):
    return f"prepare={p}, relevancy={r}, retrieval={t}, apply={a}"


BREAKDOWN = {
    placement("torch:cpu", "opencl:0:0", "opencl:0:0", "torch:cpu"):
        {"prepare": 0.004, "relevancy+retrieval": 0.011, "apply": 0.003, "transfers": 0.002, "other": 0.0005},
    placement("torch:cpu", "torch:cpu", "torch:cpu", "torch:cpu"):
        {"other": 0.0003, "apply": 0.003, "retrieval": 0.004, "relevancy": 0.015, "prepare": 0.004},
    "host": {"prepare": 0.002, "relevancy": 0.009, "retrieval (modeled)": 0.003, "softmax": 0.001},
}

DEVICES = {
    "torch:cpu": {"peak_flops": 1.2e12, "levels": [("L1", 3.2e12), ("L2", 1.1e12), ("DRAM", 80e9)], "modeled": False},
    "model:u55c": {"peak_flops": 1.08e12, "levels": [("BRAM", 21.8e12), ("URAM", 10.4e12), ("HBM", 460e9)],
                   "modeled": True},
    "model:mi210": {"peak_flops": 181e12, "levels": [("LDS", 40e12), ("HBM", 1.6e12)], "modeled": True},
    "opencl:0:0": {"peak_flops": 6e11, "levels": [("DRAM", 60e9)]},
}

POINTS = [
    {"device": "torch:cpu", "label": "relevancy", "intensity": 0.5, "flops_per_s": 2.5e10, "measured": True},
    {"device": "torch:cpu", "label": "relevancy", "intensity": 0.5, "flops_per_s": 3.6e10, "measured": False},
    {"device": "torch:cpu", "label": "apply:gather", "intensity": 0.25, "flops_per_s": 1.2e10, "measured": True},
    {"device": "torch:cpu", "label": "retrieval", "intensity": 0.0, "flops_per_s": 0.0, "measured": True},
    {"device": "model:u55c", "label": "relevancy+retrieval", "intensity": 0.5, "flops_per_s": 2.1e11,
     "measured": False},
    {"device": "model:u55c", "label": "retrieval", "intensity": 0, "flops_per_s": 0, "measured": False},
    {"device": "model:mi210", "label": "prepare", "intensity": 8.0, "flops_per_s": 9e12, "measured": False},
    {"device": "opencl:0:0", "label": "relevancy", "intensity": 0.5, "flops_per_s": 2e10},
]


def accuracy_points():
    points = []
    for d, device in enumerate(["torch:cpu", "opencl:0:0", "model:u55c"]):
        for s, (label, base) in enumerate([("prepare", 3e-3), ("relevancy", 1e-2), ("retrieval", 2e-3),
                                           ("apply", 2.5e-3)]):
            for scale in (1, 4, 16):
                measured = base * scale * (1 + 0.05 * d)
                points.append({"label": label, "device": device, "measured_s": measured,
                               "predicted_s": measured * (1 + 0.1 * math.sin(d + 3 * s + scale))})
    return points


# --- breakdown --------------------------------------------------------------------------

def test_breakdown_png(tmp_path):
    out = plot_breakdown(BREAKDOWN, str(tmp_path / "nested" / "dir" / "breakdown.png"))
    assert out == tmp_path / "nested" / "dir" / "breakdown.png"
    width, height = check_png(out)
    assert width == 10 * DPI  # default width; the height follows the number of bars
    assert 3 * DPI < height < 8 * DPI


def test_breakdown_figsize_and_modeled_hatching(tmp_path):
    modeled = {placement("torch:cpu", "opencl:0:0", "opencl:0:0", "torch:cpu")}
    out = plot_breakdown(BREAKDOWN, tmp_path / "modeled.png", modeled=modeled, figsize=(9, 4.5), title="hatched")
    check_png(out, (9, 4.5))


def test_breakdown_microseconds_and_zero_segments(tmp_path):
    breakdown = {"a": {"prepare": 2e-5, "relevancy": 1.5e-4, "apply": 0.0}, "b": {"prepare": 3e-5, "apply": 2e-4},
                 "empty bar": {"other": 0.0}}
    check_png(plot_breakdown(breakdown, tmp_path / "us.png"))


def test_breakdown_all_zero(tmp_path):
    check_png(plot_breakdown({"idle": {"prepare": 0.0}}, tmp_path / "zero.png", figsize=(6, 2.5)), (6, 2.5))


def test_breakdown_many_long_labels(tmp_path):
    breakdown = {"x" * 200 + str(i): {"relevancy": 1e-3 * (i + 1), "unknown-step": 5e-4} for i in range(12)}
    width, height = check_png(plot_breakdown(breakdown, tmp_path / "many.png"))
    assert height > 8 * DPI  # grows with the number of bars


@pytest.mark.parametrize("breakdown, message", [
    ({}, "breakdown is empty"),
    ([], "breakdown must be a Mapping"),
    ({"p": {}}, "breakdown['p'] has no segments"),
    ({"p": [1.0]}, "breakdown['p'] must be a dict"),
    ({"p": {"apply": -1e-3}}, "negative time -0.001 s for placement 'p', segment 'apply'"),
    ({"p": {"apply": float("nan")}}, "breakdown['p']['apply'] must be finite"),
    ({"p": {"apply": "1 ms"}}, "breakdown['p']['apply'] must be a number"),
])
def test_breakdown_rejects(tmp_path, breakdown, message):
    with pytest.raises(ValueError, match=_literal(message)):
        plot_breakdown(breakdown, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_breakdown_rejects_unknown_modeled_label(tmp_path):
    with pytest.raises(ValueError, match="modeled names placements not in breakdown"):
        plot_breakdown(BREAKDOWN, tmp_path / "bad.png", modeled={"no such placement"})


# --- roofline ---------------------------------------------------------------------------

def test_roofline_png(tmp_path):
    out = plot_roofline(DEVICES, POINTS, tmp_path / "roofline.png")
    width, height = check_png(out)
    # four devices: a 2 x 3 grid
    assert width == round((0.6 + 4.4 * 3) * DPI)
    assert 7 * DPI < height < 9.5 * DPI


def test_roofline_single_device_figsize(tmp_path):
    points = [p for p in POINTS if p["device"] == "model:u55c"]
    check_png(plot_roofline({"model:u55c": DEVICES["model:u55c"]}, points, tmp_path / "one.png", figsize=(6, 5)),
              (6, 5))


def test_roofline_zero_flop_points_are_skipped(tmp_path):
    # Every point does no FLOPs (top-k); the ceilings are still drawn, with the count noted.
    points = [{"device": "torch:cpu", "label": "retrieval", "intensity": 0.0, "flops_per_s": 0.0},
              {"device": "torch:cpu", "label": "retrieval", "intensity": 0.5, "flops_per_s": -1.0},
              {"device": "torch:cpu", "label": "retrieval", "intensity": -2.0, "flops_per_s": 1e9}]
    check_png(plot_roofline({"torch:cpu": DEVICES["torch:cpu"]}, points, tmp_path / "zero.png"))


@pytest.mark.parametrize("devices, points, message", [
    ({}, POINTS, "devices is empty"),
    (DEVICES, [], "points is empty"),
    (DEVICES, None, "points must be a list or tuple"),
    ({"d": {"levels": [("DRAM", 1e11)]}}, POINTS, "devices['d'] has no 'peak_flops'"),
    ({"d": {"peak_flops": 0, "levels": [("DRAM", 1e11)]}}, POINTS, "devices['d']['peak_flops'] must be > 0"),
    ({"d": {"peak_flops": 1e12, "levels": []}}, POINTS, "devices['d']['levels'] must be a non-empty list"),
    ({"d": {"peak_flops": 1e12, "levels": [("DRAM", -5)]}}, POINTS, "devices['d']['levels'][0] bandwidth must be > 0"),
    ({"d": {"peak_flops": 1e12, "levels": [("DRAM",)]}}, POINTS, "devices['d']['levels'][0] must be a (name, bytes/s)"),
    (DEVICES, [{"device": "nowhere", "label": "apply", "intensity": 1, "flops_per_s": 1}],
     "points[0]: device 'nowhere' is not in devices"),
    (DEVICES, [{"device": "torch:cpu", "label": "apply", "intensity": 1}], "points[0] has no 'flops_per_s'"),
    (DEVICES, [{"device": "torch:cpu", "label": "apply", "intensity": float("inf"), "flops_per_s": 1}],
     "points[0]['intensity'] must be finite"),
])
def test_roofline_rejects(tmp_path, devices, points, message):
    with pytest.raises(ValueError, match=_literal(message)):
        plot_roofline(devices, points, tmp_path / "bad.png")


# --- predicted vs measured --------------------------------------------------------------

def test_predicted_vs_measured_png(tmp_path):
    out = plot_predicted_vs_measured(accuracy_points(), tmp_path / "pvm.png")
    check_png(out, (8.0, 5.6))


def test_predicted_vs_measured_narrow_range_in_microseconds(tmp_path):
    points = [{"label": "relevancy", "device": "torch:cpu", "predicted_s": 1.1e-4, "measured_s": 1.0e-4},
              {"label": "apply", "device": "host", "predicted_s": 1.5e-4, "measured_s": 1.6e-4}]
    check_png(plot_predicted_vs_measured(points, tmp_path / "narrow.png", figsize=(6, 4.5)), (6, 4.5))


@pytest.mark.parametrize("points, message", [
    ([], "points is empty"),
    ({"label": "apply"}, "points must be a list or tuple"),
    ([{"label": "apply", "device": "d", "predicted_s": 1e-3}], "points[0] has no 'measured_s'"),
    ([{"label": "apply", "device": "d", "predicted_s": 1e-3, "measured_s": 0.0}],
     "points[0]['measured_s'] must be > 0"),
    ([{"label": "apply", "device": "d", "predicted_s": -1e-3, "measured_s": 1e-3}],
     "points[0]['predicted_s'] must be > 0"),
    (["apply"], "points[0] must be a dict"),
])
def test_predicted_vs_measured_rejects(tmp_path, points, message):
    with pytest.raises(ValueError, match=_literal(message)):
        plot_predicted_vs_measured(points, tmp_path / "bad.png")


# --- shared -----------------------------------------------------------------------------

def test_step_colors_consistent():
    assert list(STEP_COLORS) == ["prepare", "relevancy", "retrieval", "relevancy+retrieval", "apply", "transfers",
                                 "other"]
    assert len(set(STEP_COLORS.values())) == len(STEP_COLORS)
    assert step_color("relevancy:opencl:0:0") == STEP_COLORS["relevancy"]
    assert step_color("Relevancy+Retrieval (modeled)") == STEP_COLORS["relevancy+retrieval"]
    assert step_color("transfer") == STEP_COLORS["transfers"]
    assert step_color("softmax") == step_color("softmax")
    assert step_color("softmax") not in STEP_COLORS.values()


def test_global_matplotlib_state_untouched(tmp_path):
    backend = matplotlib.get_backend()
    params = dict(matplotlib.rcParams)
    plot_breakdown(BREAKDOWN, tmp_path / "a.png")
    plot_roofline(DEVICES, POINTS, tmp_path / "b.png")
    plot_predicted_vs_measured(accuracy_points(), tmp_path / "c.png")
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == params


def test_bad_path_type(tmp_path):
    with pytest.raises(ValueError, match="path must be a str or Path"):
        plot_breakdown(BREAKDOWN, 42)


def _literal(message):
    return re.escape(message)
