"""What `hetero profile` does: a method at given shapes on one or more placements, profiled
step by step, energy measured where a counter exists, and the files written."""

from __future__ import annotations

import json
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..devices import devices as present_devices
from ..runtime import STEPS, Pipeline, PlacementError
from .timeline import Profile, profile

OUTPUTS = ("trace.json", "profile.json", "breakdown.png", "roofline.png", "predicted_vs_measured.png")


def parse_placement(spec: str, default: str | None = None):
    """'auto', a device id ('opencl:0:0': every step there), or 'step=device,...' (steps not
    named go to `default`, when given)."""
    spec = spec.strip()
    if not spec:
        raise PlacementError("placement is empty: give 'auto', a device id, or 'step=device,...'")
    if "=" not in spec:
        return spec
    out = {}
    for part in spec.split(","):
        step, sep, device = (x.strip() for x in part.partition("="))
        if not sep or not step or not device:
            raise PlacementError(f"placement part {part!r} must read step=device (in {spec!r})")
        if step not in [s.value for s in STEPS]:
            raise PlacementError(f"placement {spec!r} names unknown step {step!r}; steps are "
                                 f"{', '.join(s.value for s in STEPS)}")
        out[step] = device
    if default is not None:
        out = {s.value: out.get(s.value, default) for s in STEPS}
    return out


@dataclass
class PlacementRun:
    spec: str
    pipe: Pipeline
    pipeline: str = ""  # the profile's name for it ("p0", ...)
    energy: dict = field(default_factory=dict)


@dataclass
class ProfileResult:
    method: object
    shapes: dict
    steps: int
    prof: Profile
    runs: list[PlacementRun]
    files: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": repr(self.method), "shapes": self.shapes, "decode_steps": self.steps,
                "machine": {"platform": platform.platform(), "processor": platform.processor(),
                            "python": platform.python_version(), "torch": torch.__version__, "hetero": __version__},
                "placements": [{"spec": r.spec, "pipeline": r.pipeline, "placement": repr(r.pipe.placement),
                                "plan": r.pipe.plan.explain() if r.pipe.plan is not None else None,
                                "energy_per_step": r.energy} for r in self.runs],
                **self.prof.to_dict()}


def profile_method(method, shapes: dict, placements: list[str], steps: int = 10, energy_window_s: float = 1.0,
                   out: str | Path | None = None, seed: int = 0, progress=None) -> ProfileResult:
    """Prepare the method's synthetic inputs on each placement, warm it up, then profile
    `steps` decode steps per placement (interleaved, so machine noise hits all alike);
    measure energy per step where a counter covers a placement's devices; write OUTPUTS to
    `out` when given. `progress(advance, total, what)` is called as work completes."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    shapes = method.shapes(**shapes)
    inputs, query = method.example_inputs(shapes, seed)
    tick = progress or (lambda *a: None)
    total = len(placements) * (steps + 2)
    runs = []
    gpus = [d.id for d in present_devices() if d.backend == "torch" and d.kind == "gpu"]
    home = gpus[0] if gpus else "torch:cpu"  # where steps a placement does not name run
    for spec in placements:
        placement = parse_placement(spec, default=home)
        # auto places at prepare from the inputs' shapes; the profiled shapes add what inputs do not say (q_heads)
        pipe = Pipeline(method, placement, shapes=shapes if placement == "auto" else None)
        tick(0, total, f"prepare {spec}")
        memory = pipe.prepare(*inputs)
        pipe.step(query, memory)  # warm-up: kernels built, lengths moved
        tick(2, total, f"warm {spec}")
        runs.append((PlacementRun(spec, pipe), memory))
    with profile() as prof:
        for i in range(steps):
            for run, memory in runs:
                run.pipe.step(query, memory)
                tick(1, total, f"step {i + 1}/{steps}")
    names = {}
    for c in prof.calls:
        names.setdefault(id(c.pipe), c.pipeline)
    for run, memory in runs:
        run.pipeline = names.get(id(run.pipe), "")
        run.energy = _energy_per_step(prof, run, lambda r=run, m=memory: r.pipe.step(query, m), energy_window_s)
    result = ProfileResult(method, shapes, steps, prof, [r for r, _ in runs])
    if out is not None:
        write_outputs(result, Path(out))
    return result


def _energy_per_step(prof: Profile, run: PlacementRun, step_fn, window_s: float) -> dict:
    """Modeled energy of one decode step (busy x active + idle x idle power over the step's
    wall time, per piece of silicon), and beside it the measured one wherever a counter covers
    the placement's devices (the step repeated over a window the counter can resolve)."""
    from .energy import measure_energy
    from .report import Energy, group_parts, modeled_energy, power_nodes

    calls = [c.record for c in prof.calls if c.pipe is run.pipe and c.record.call == "step"]
    wall = statistics.median(r.wall_s for r in calls)
    devices = [d.id for d in run.pipe.placement.devices]
    nodes = power_nodes(devices)
    out = {}
    for members in group_parts(devices, nodes).values():
        busy = statistics.median(sum(s.seconds for s in r.steps if s.device in members) for r in calls)
        modeled = modeled_energy(nodes[members[0]].profile, busy, wall,
                                 "median step: busy x active + idle x idle power")
        entry = {"modeled": modeled.to_dict(), "measured": None, "gap": None}
        meter = next((m for m in prof.meters if m.available and set(members) & set(m.covers)), None)
        if meter is None:
            absent = [f"{m.name}: {m.why_absent}" for m in prof.meters if not m.available]
            entry["note"] = "no energy counter covers these devices" + (f" ({'; '.join(absent)})" if absent else "")
        else:
            reading = measure_energy(step_fn, meter, min_window_s=window_s)
            measured = Energy(reading.joules_per_call, "measured", f"{meter.name}, {reading.calls} steps over "
                              f"{reading.window_s:.2g} s")
            entry.update(measured=measured.to_dict(), gap=measured.joules / modeled.joules - 1 if modeled.joules else None,
                         note=reading.note)
        out[" + ".join(members)] = entry
    return out


# --- files ------------------------------------------------------------------------------------

def write_outputs(result: ProfileResult, out: Path) -> dict[str, Path]:
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    summary = result.prof.summary()
    files = {"trace.json": result.prof.export_trace(out / "trace.json")}
    path = out / "profile.json"
    path.write_text(json.dumps(result.to_dict(), indent=1, default=str))
    files["profile.json"] = path
    breakdown, modeled = breakdown_data(result, summary)
    files["breakdown.png"] = plots.plot_breakdown(breakdown, out / "breakdown.png", modeled=modeled,
                                                  title=f"{result.method.name}: one decode step per placement")
    devices, points = roofline_data(summary)
    if points:  # steps the cost model counts FLOPs and bytes for
        files["roofline.png"] = plots.plot_roofline(devices, points, out / "roofline.png",
                                                    title=f"{result.method.name}: hierarchical roofline")
    compared = [dict(label=r["step"], device=r["device"], predicted_s=r["predicted_s"] / r["n"],
                     measured_s=r["mean_s"]) for r in summary.steps if r["predicted_s"]]
    if compared:
        files["predicted_vs_measured.png"] = plots.plot_predicted_vs_measured(compared, out / "predicted_vs_measured.png")
    result.files = files
    return files


def _label(run: PlacementRun) -> str:
    placed = repr(run.pipe.placement).removeprefix("Placement(").removesuffix(")")
    return f"auto: {placed}" if run.spec == "auto" else placed


def breakdown_data(result: ProfileResult, summary) -> tuple[dict, set]:
    """Placement -> {step: mean seconds per decode step, transfers, other (runtime)}."""
    breakdown, modeled = {}, set()
    walls = {}
    for c in result.prof.calls:
        if c.record.call == "step":
            walls.setdefault(c.pipeline, []).append(c.record.wall_s)
    for run in result.runs:
        label = _label(run)
        rows = [r for r in summary.steps if r["pipeline"] == run.pipeline and r["call"] == "step"]
        segments: dict[str, float] = {}
        for r in rows:
            segments[r["step"]] = segments.get(r["step"], 0.0) + r["seconds"] / r["n"]
            if r["clock"] == "modeled":
                modeled.add(label)
        calls = len(walls.get(run.pipeline, [])) or 1
        segments["transfers"] = sum(t["seconds"] for t in summary.transfers if t["pipeline"] == run.pipeline) / calls
        wall = statistics.mean(walls.get(run.pipeline, [0.0]))
        segments["other"] = max(wall - sum(segments.values()), 0.0)
        breakdown[label] = segments
    return breakdown, modeled


def roofline_data(summary) -> tuple[dict, list]:
    """Each device's roofline (compute peak, a bandwidth per memory level) and each step's
    point: model FLOPs / model bytes against FLOPs per measured (filled) or predicted (hollow) second."""
    from .report import power_nodes

    rows = [r for r in summary.steps if r["call"] == "step" and r["flops"]]
    nodes = power_nodes(list(dict.fromkeys(r["device"] for r in rows)))
    devices = {d: {"peak_flops": n.profile.flops("float32"), "modeled": n.modeled,
                   "levels": [(lv.name, lv.bandwidth) for lv in n.profile.memory]} for d, n in nodes.items()}
    points = []
    for r in rows:
        intensity = r["flops"] / r["traffic"] if r["traffic"] else 0.0
        points.append(dict(device=r["device"], label=r["step"], intensity=intensity,
                           flops_per_s=r["flops"] / r["mean_s"], measured=r["clock"] != "modeled"))
        if r["predicted_s"]:
            points.append(dict(device=r["device"], label=r["step"], intensity=intensity,
                               flops_per_s=r["flops"] * r["n"] / r["predicted_s"], measured=False))
    return devices, points
