"""Publication-quality PNG plots of step times, rooflines and cost-model accuracy.

Inputs are plain Python data (dicts and lists of floats), so this module depends on nothing
else in hetero. Figures are built with `matplotlib.figure.Figure` and rendered by the Agg
canvas: no display is touched and no global matplotlib state changes (font settings are
applied through a temporary `rc_context`).

Every function writes a PNG to `path` (parent folders are created; the file is PNG whatever
its suffix), returns it as a `Path`, and raises ValueError naming the argument for empty or
invalid input. Colours are fixed per step across all plots (`STEP_COLORS`, `step_color`).

    plot_breakdown({"all torch:cpu": {"prepare": 0.004, "relevancy": 0.012, "apply": 0.003}}, "b.png")
    plot_roofline({"u55c": {"peak_flops": 1.08e12, "levels": [("HBM", 460e9)], "modeled": True}},
                  [{"device": "u55c", "label": "relevancy", "intensity": 0.5, "flops_per_s": 2e11,
                    "measured": False}], "r.png")
    plot_predicted_vs_measured([{"label": "apply", "device": "torch:cpu", "predicted_s": 1.1e-3,
                                 "measured_s": 1.0e-3}], "p.png")
"""

from __future__ import annotations

import math
import os
import textwrap
import zlib
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

__all__ = ["DPI", "STEP_COLORS", "step_color", "plot_breakdown", "plot_roofline", "plot_predicted_vs_measured"]

DPI = 150

# Okabe-Ito colours (distinguishable with the common colour-vision deficiencies), in the
# order segments are stacked: the four steps, the fused relevancy+retrieval operation,
# device crossings, and host/runtime overhead.
STEP_COLORS: dict[str, str] = {
    "prepare": "#0072B2",              # blue
    "relevancy": "#E69F00",            # orange
    "retrieval": "#009E73",            # green
    "relevancy+retrieval": "#CC79A7",  # reddish purple: the fused operation
    "apply": "#D55E00",                # vermillion
    "transfers": "#56B4E9",            # sky blue
    "other": "#999999",                # grey: host/runtime overhead
}
_ALIASES = {"transfer": "transfers"}
# Names outside STEP_COLORS get one of these, chosen from a checksum of the name, so a name
# has the same colour in every plot and every process.
_EXTRA_COLORS = ("#9467BD", "#8C564B", "#BCBD22", "#1B3B6F", "#7F3C8D", "#E7298A")
_MODELED_SUFFIX = " (modeled)"
_HATCH = "///"
_DEVICE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
_LEVEL_STYLES = ("-", "--", "-.", ":")
_BAND = 0.15  # the shaded band of plot_predicted_vs_measured: +-15 %
_WRAP = 40    # placement labels are wrapped at about this many characters
_MAX_LABEL_LINES = 4

_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "figure.titlesize": 13,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "hatch.linewidth": 0.8,
    "savefig.facecolor": "white",
}


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    if key.endswith(_MODELED_SUFFIX):
        key = key[: -len(_MODELED_SUFFIX)].strip()
    return _ALIASES.get(key, key)


def _step_key(name: str) -> str | None:
    """The STEP_COLORS key a name belongs to (matched as in `step_color`), or None."""
    key = _canonical(name)
    head = key.split(":", 1)[0].strip()
    for candidate in (key, _ALIASES.get(head, head)):
        if candidate in STEP_COLORS:
            return candidate
    return None


def step_color(name: str) -> str:
    """The colour of a step or segment name: an exact STEP_COLORS key, else the part before
    ':' ("relevancy:opencl:0:0"), ignoring case and a trailing " (modeled)"; other names get a
    fixed colour derived from the name."""
    key = _step_key(name)
    if key is not None:
        return STEP_COLORS[key]
    return _EXTRA_COLORS[zlib.crc32(_canonical(name).encode()) % len(_EXTRA_COLORS)]


def _step_rank(name: str) -> int:
    """Position of a name in the fixed step order (STEP_COLORS' order); unknown names last."""
    key = _step_key(name)
    return list(STEP_COLORS).index(key) if key is not None else len(STEP_COLORS)


# --- shared helpers ---------------------------------------------------------------------

def _render(path, figsize: tuple[float, float], draw: Callable[[Figure], None]) -> Path:
    """Create a figure of `figsize` inches under the module's style, let `draw` fill it, and
    save it as a PNG at DPI to `path` (parent folders created). The one place figures are made."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or Path, got {type(path).__name__}")
    out = Path(path)
    width, height = figsize
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        raise ValueError(f"figsize must be two positive numbers of inches, got {figsize!r}")
    with matplotlib.rc_context(_STYLE):
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png", dpi=DPI)
    return out


def _require_nonempty(value, name: str, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise ValueError(f"{name} must be a {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    if len(value) == 0:
        raise ValueError(f"{name} is empty: nothing to plot")


def _number(value, where: str) -> float:
    """`value` as a finite float, else ValueError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{where} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return number


def _field(point, index: int, key: str, arg: str):
    if not isinstance(point, Mapping):
        raise ValueError(f"{arg}[{index}] must be a dict, got {type(point).__name__}")
    if key not in point:
        raise ValueError(f"{arg}[{index}] has no {key!r}")
    return point[key]


def _time_unit(max_seconds: float) -> tuple[str, float]:
    """('µs', 1e6) when every value is below a millisecond, else ('ms', 1e3)."""
    return ("µs", 1e6) if max_seconds < 1e-3 else ("ms", 1e3)


def _fmt(value: float) -> str:
    """Three significant figures, without exponent notation for the sizes plotted here."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    decimals = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _si(value: float, unit: str) -> str:
    """1.08e12, 'FLOP/s' -> '1.08 TFLOP/s'; 1.2e12 -> '1.2 TFLOP/s'."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1.0, "")):
        if abs(value) >= factor or factor == 1.0:
            text = _fmt(value / factor)
            if "." in text:
                text = text.rstrip("0").rstrip(".")
            return f"{text} {prefix}{unit}"
    raise AssertionError("unreachable")


def _legend(fig: Figure, handles: list, loc: str, ncol: int) -> None:
    """A figure legend outside the axes, filled row by row (matplotlib fills columns first)."""
    ncol = max(1, min(ncol, len(handles)))
    rows = math.ceil(len(handles) / ncol)
    by_column = [handles[r * ncol + c] for c in range(ncol) for r in range(rows) if r * ncol + c < len(handles)]
    fig.legend(handles=by_column, loc=loc, ncol=ncol, frameon=False)


def _wrap(label: str) -> str:
    lines = textwrap.wrap(str(label), _WRAP, break_long_words=True, break_on_hyphens=False) or [""]
    if len(lines) > _MAX_LABEL_LINES:
        lines = lines[:_MAX_LABEL_LINES]
        lines[-1] = lines[-1][: _WRAP - 1].rstrip() + "…"
    return "\n".join(lines)


def _ordered(names: Iterable[str]) -> list[str]:
    """Distinct names in the fixed step order; unknown names after, in first-seen order."""
    seen = list(dict.fromkeys(names))
    return sorted(seen, key=lambda n: (_step_rank(n), seen.index(n)))


# --- 1. per-step time breakdown ---------------------------------------------------------

def plot_breakdown(breakdown: Mapping[str, Mapping[str, float]], path, title: str = "per-step time per placement",
                   modeled: set[str] | frozenset[str] | None = None,
                   figsize: tuple[float, float] | None = None) -> Path:
    """A horizontal stacked bar per placement: placement label -> {segment name -> seconds}.

    Segments are stacked in the fixed order of STEP_COLORS (names matched as in `step_color`),
    unknown names after in the order given. The x axis is in ms, or µs when every total is
    below 1 ms; each bar's total is written at its end. Long labels are wrapped at about 40
    characters. Placements named in `modeled`, and segments whose name ends in " (modeled)",
    are hatched, with a "modeled" legend entry. `figsize` (inches) overrides the size chosen
    from the number of bars.
    """
    _require_nonempty(breakdown, "breakdown", Mapping)
    bars: list[tuple[str, dict[str, float]]] = []
    for placement, segments in breakdown.items():
        if not isinstance(segments, Mapping):
            raise ValueError(f"breakdown[{placement!r}] must be a dict of segment -> seconds, "
                             f"got {type(segments).__name__}")
        if not segments:
            raise ValueError(f"breakdown[{placement!r}] has no segments")
        values = {}
        for segment, seconds in segments.items():
            where = f"breakdown[{placement!r}][{segment!r}]"
            value = _number(seconds, where)
            if value < 0:
                raise ValueError(f"{where}: negative time {value!r} s for placement {placement!r}, segment {segment!r}")
            values[str(segment)] = value
        bars.append((str(placement), values))
    modeled = set(modeled or ())
    unknown = modeled - {label for label, _ in bars}
    if unknown:
        raise ValueError(f"modeled names placements not in breakdown: {sorted(unknown)}")

    totals = [sum(values.values()) for _, values in bars]
    unit, scale = _time_unit(max(totals))
    # Segments with the same name up to " (modeled)" share a colour, a stack position and a legend entry.
    order = _ordered(_strip_modeled(s) for _, values in bars for s in values)
    labels = [_wrap(label) for label, _ in bars]
    any_hatched = bool(modeled) or any(s.endswith(_MODELED_SUFFIX) for _, values in bars for s in values)

    if figsize is None:
        lines = max(label.count("\n") + 1 for label in labels)
        row = max(0.42, 0.17 * lines + 0.2)
        legend_rows = math.ceil((len({_step_key(n) or n for n in order}) + any_hatched) / 5)
        figsize = (10.0, 1.5 + row * len(bars) + 0.3 * legend_rows)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        ys = np.arange(len(bars))
        for y, (label, values) in zip(ys, bars):
            left = 0.0
            for name in sorted(values, key=lambda s: order.index(_strip_modeled(s))):
                width = values[name] * scale
                if width == 0:
                    continue
                hatched = label in modeled or name.endswith(_MODELED_SUFFIX)
                # The hatch takes the edge colour (no `hatchcolor`, which needs matplotlib >= 3.10).
                ax.barh(y, width, left=left, height=0.62, color=step_color(name), linewidth=0.6,
                        edgecolor="#333333" if hatched else "white", hatch=_HATCH if hatched else None)
                left += width
            ax.annotate(f"{_fmt(left)} {unit}", (left, y), xytext=(4, 0), textcoords="offset points",
                        va="center", ha="left", fontsize=9)
        ax.set_yticks(ys, labels, fontsize=8.5 if max(len(label) for label in labels) > 30 else 9)
        ax.set_ylim(len(bars) - 0.5, -0.5)  # first placement on top; also when the last bar is empty
        ax.set_xlim(0, max(totals) * scale * 1.17 or 1.0)
        ax.set_xlabel(f"time per call ({unit})")
        ax.set_title(title)
        ax.grid(axis="x", color="#dddddd", linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(axis="y", length=0)
        drawn = [_strip_modeled(s) for _, values in bars for s, v in values.items() if v > 0]
        groups = _ordered(_step_key(name) or name for name in drawn)  # one legend entry per colour shown
        handles = [Patch(facecolor=step_color(name), edgecolor="white", label=name) for name in groups]
        if any_hatched:
            handles.append(Patch(facecolor="white", edgecolor="#333333", hatch=_HATCH, label="modeled"))
        _legend(fig, handles, "outside lower center", 5)

    return _render(path, figsize, draw)


def _strip_modeled(name: str) -> str:
    return name[: -len(_MODELED_SUFFIX)] if name.endswith(_MODELED_SUFFIX) else name


# --- 2. hierarchical roofline -----------------------------------------------------------

def plot_roofline(devices: Mapping[str, Mapping], points: Sequence[Mapping], path, title: str = "hierarchical roofline",
                  figsize: tuple[float, float] | None = None) -> Path:
    """One log-log roofline subplot per device (up to 3 columns).

    devices: id -> {"peak_flops": FLOP/s, "levels": [(name, bytes/s), ...], "modeled": bool
    (optional, default False)}. Each level is drawn as bandwidth x intensity up to its ridge
    point, the compute ceiling flat from the first ridge on; both are named in the subplot's
    legend. points: {"device", "label", "intensity" (FLOP/byte), "flops_per_s", "measured"
    (optional, default True)}; coloured by the label's step (`step_color`), measured points
    filled, modeled/predicted ones hollow. Points with zero or negative intensity or
    throughput (e.g. top-k, which does no FLOPs) are skipped and counted in the subplot.
    """
    _require_nonempty(devices, "devices", Mapping)
    _require_nonempty(points, "points", (list, tuple))
    specs = {}
    for device, spec in devices.items():
        where = f"devices[{device!r}]"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(spec).__name__}")
        if "peak_flops" not in spec:
            raise ValueError(f"{where} has no 'peak_flops'")
        peak = _number(spec["peak_flops"], f"{where}['peak_flops']")
        if peak <= 0:
            raise ValueError(f"{where}['peak_flops'] must be > 0, got {peak!r}")
        levels = spec.get("levels")
        if not isinstance(levels, (list, tuple)) or not levels:
            raise ValueError(f"{where}['levels'] must be a non-empty list of (name, bytes/s) pairs, got {levels!r}")
        checked = []
        for i, level in enumerate(levels):
            if not isinstance(level, (list, tuple)) or len(level) != 2:
                raise ValueError(f"{where}['levels'][{i}] must be a (name, bytes/s) pair, got {level!r}")
            bandwidth = _number(level[1], f"{where}['levels'][{i}] bandwidth")
            if bandwidth <= 0:
                raise ValueError(f"{where}['levels'][{i}] bandwidth must be > 0, got {bandwidth!r}")
            checked.append((str(level[0]), bandwidth))
        specs[str(device)] = (peak, checked, bool(spec.get("modeled", False)))

    shown: dict[str, list[tuple[float, float, str, bool]]] = {d: [] for d in specs}
    skipped = dict.fromkeys(specs, 0)
    for i, point in enumerate(points):
        device = str(_field(point, i, "device", "points"))
        if device not in specs:
            raise ValueError(f"points[{i}]: device {device!r} is not in devices ({', '.join(map(repr, specs))})")
        label = str(_field(point, i, "label", "points"))
        intensity = _number(_field(point, i, "intensity", "points"), f"points[{i}]['intensity']")
        rate = _number(_field(point, i, "flops_per_s", "points"), f"points[{i}]['flops_per_s']")
        if intensity <= 0 or rate <= 0:
            skipped[device] += 1
            continue
        shown[device].append((intensity, rate, label, bool(point.get("measured", True))))

    ncols = min(3, len(specs))
    nrows = math.ceil(len(specs) / ncols)
    # One legend entry per colour: the step a label belongs to, or the label itself if it names no step.
    steps = _ordered(_step_key(p[2]) or p[2] for pts in shown.values() for p in pts)
    kinds = {p[3] for pts in shown.values() for p in pts}
    if figsize is None:
        legend_rows = math.ceil((len(steps) + len(kinds)) / 6)
        figsize = (0.6 + 4.4 * ncols, 0.7 + 3.7 * nrows + 0.3 * legend_rows)

    def draw(fig: Figure) -> None:
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(specs):]:
            ax.remove()
        for ax, (device, (peak, levels, is_modeled)) in zip(axes, specs.items()):
            _draw_roofline(ax, device, peak, levels, is_modeled, shown[device], skipped[device])
        fig.suptitle(title)
        handles = [Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor=step_color(s),
                          markeredgecolor="black", markeredgewidth=0.5, label=s) for s in steps]
        if True in kinds:
            handles.append(Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor="#777777",
                                  markeredgecolor="black", markeredgewidth=0.5, label="measured"))
        if False in kinds:
            handles.append(Line2D([], [], linestyle="", marker="o", markersize=8, markerfacecolor="none",
                                  markeredgecolor="#777777", markeredgewidth=1.6, label="modeled / predicted"))
        if handles:
            _legend(fig, handles, "outside lower center", 6)

    return _render(path, figsize, draw)


def _draw_roofline(ax, device: str, peak: float, levels: list[tuple[str, float]], is_modeled: bool,
                   shown: list[tuple[float, float, str, bool]], skipped: int) -> None:
    ridges = [peak / bandwidth for _, bandwidth in levels]
    xs = [p[0] for p in shown] + ridges
    x_lo, x_hi = min(xs) / 4, max(xs) * 4
    decades = math.log10(x_hi / x_lo)
    if decades < 3:  # at least three decades, so the diagonals read as such
        pad = 10 ** ((3 - decades) / 2)
        x_lo, x_hi = x_lo / pad, x_hi * pad
    lowest = min(bandwidth for _, bandwidth in levels) * x_lo
    y_lo = min([lowest] + [p[1] / 3 for p in shown])
    y_hi = peak * 3

    for i, ((name, bandwidth), ridge) in enumerate(sorted(zip(levels, ridges), key=lambda lr: -lr[0][1])):
        ax.plot([x_lo, ridge], [bandwidth * x_lo, peak], color="#444444", linewidth=1.4,
                linestyle=_LEVEL_STYLES[i % len(_LEVEL_STYLES)], label=f"{name} {_si(bandwidth, 'B/s')}", zorder=2)
    ax.plot([min(ridges), x_hi], [peak, peak], color="black", linewidth=2.0, label=f"peak {_si(peak, 'FLOP/s')}",
            zorder=2)
    for intensity, rate, label, measured in shown:
        color = step_color(label)
        if measured:
            ax.scatter(intensity, rate, s=48, marker="o", facecolors=color, edgecolors="black", linewidths=0.5,
                       zorder=4)
        else:
            ax.scatter(intensity, rate, s=48, marker="o", facecolors="none", edgecolors=color, linewidths=1.6,
                       zorder=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("performance (FLOP/s)")
    ax.set_title(f"{device} (modeled)" if is_modeled else device)
    ax.grid(which="major", color="#e4e4e4", linewidth=0.7)
    ax.set_axisbelow(True)
    note = None
    if skipped:
        note = f"{skipped} point{'s' if skipped != 1 else ''} not shown (zero FLOPs)"
    ax.legend(loc="best", fontsize=8, title=note, title_fontsize=8, framealpha=0.9, handlelength=2.6)


# --- 3. cost-model accuracy -------------------------------------------------------------

def plot_predicted_vs_measured(points: Sequence[Mapping], path, title: str = "predicted vs measured step time",
                               figsize: tuple[float, float] | None = None) -> Path:
    """Log-log scatter of predicted against measured seconds, one marker per device and one
    colour per step label, with the y = x line, a shaded ±15 % band, and the median and p90 of
    |predicted - measured| / measured written in the corner.

    points: {"label", "device", "predicted_s", "measured_s"}; both times must be > 0.
    """
    _require_nonempty(points, "points", (list, tuple))
    rows = []
    for i, point in enumerate(points):
        label = str(_field(point, i, "label", "points"))
        device = str(_field(point, i, "device", "points"))
        times = []
        for key in ("predicted_s", "measured_s"):
            value = _number(_field(point, i, key, "points"), f"points[{i}][{key!r}]")
            if value <= 0:
                raise ValueError(f"points[{i}][{key!r}] must be > 0 s (log axes), got {value!r} "
                                 f"(label {label!r}, device {device!r})")
            times.append(value)
        rows.append((label, device, times[0], times[1]))

    predicted = np.array([r[2] for r in rows])
    measured = np.array([r[3] for r in rows])
    errors = np.abs(predicted - measured) / measured
    unit, scale = _time_unit(max(predicted.max(), measured.max()))
    steps = _ordered(_step_key(r[0]) or r[0] for r in rows)  # one legend entry per colour
    device_names = list(dict.fromkeys(r[1] for r in rows))
    markers = {d: _DEVICE_MARKERS[i % len(_DEVICE_MARKERS)] for i, d in enumerate(device_names)}
    if figsize is None:
        figsize = (8.0, 5.6)

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        lo = min(predicted.min(), measured.min()) * scale
        hi = max(predicted.max(), measured.max()) * scale
        pad = max(10 ** 0.15, math.sqrt(10 / (hi / lo)) if hi / lo < 10 else 1.0)  # at least one decade shown
        lo, hi = lo / pad, hi * pad
        line = np.geomspace(lo, hi, 50)
        ax.fill_between(line, line * (1 - _BAND), line * (1 + _BAND), color="#bbbbbb", alpha=0.35, linewidth=0,
                        zorder=1)
        ax.plot(line, line, color="black", linewidth=1.0, linestyle="--", zorder=2)
        for label, device, pred, meas in rows:
            ax.scatter(meas * scale, pred * scale, marker=markers[device], s=50, color=step_color(label),
                       edgecolors="black", linewidths=0.5, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(title)
        ax.grid(which="major", color="#e4e4e4", linewidth=0.7)
        ax.set_axisbelow(True)
        within = int(np.sum(errors <= _BAND + 1e-12))
        summary = (f"median |error| {100 * np.median(errors):.1f}%\n"
                   f"p90 |error| {100 * np.percentile(errors, 90):.1f}%\n"
                   f"within ±{100 * _BAND:.0f}%: {within}/{len(rows)}")
        ax.text(0.03, 0.97, summary, transform=ax.transAxes, va="top", ha="left", fontsize=9,
                bbox=dict(boxstyle="round,pad=0.4", facecolor="white", edgecolor="#bbbbbb", alpha=0.95), zorder=5)
        handles = [Patch(facecolor=step_color(s), edgecolor="black", linewidth=0.5, label=s) for s in steps]
        handles += [Line2D([], [], linestyle="", marker=markers[d], markersize=7, markerfacecolor="white",
                           markeredgecolor="black", label=d) for d in device_names]
        handles += [Line2D([], [], color="black", linestyle="--", linewidth=1.0, label="predicted = measured"),
                    Patch(facecolor="#bbbbbb", alpha=0.35, label=f"±{100 * _BAND:.0f}%")]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0, frameon=False)

    return _render(path, figsize, draw)
