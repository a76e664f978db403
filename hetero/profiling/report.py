"""`prof.summary()`: per-step and per-device totals, the memory-processing share, energy
(every figure with its source) and predicted vs measured where the cost model covers the
method."""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, field

from ..cost.calibrate import fmt_bytes as _bytes
from ..cost.placer import _ms
from .timeline import Profile


@dataclass(frozen=True)
class Energy:
    """Joules and where they come from: 'measured' (a counter: NVML, RAPL) or 'modeled'
    (busy time x active power + idle time x idle power of the device's profile)."""

    joules: float
    source: str
    note: str = ""

    def __post_init__(self):
        if self.source not in ("measured", "modeled"):
            raise ValueError(f"Energy source must be 'measured' or 'modeled', got {self.source!r}")

    def __str__(self) -> str:
        j = self.joules
        text = f"{j:.3g} J" if j >= 1 else f"{j * 1e3:.3g} mJ" if j >= 1e-3 else f"{j * 1e6:.3g} uJ"
        return f"{text} ({self.source})"

    def to_dict(self) -> dict:
        return {"joules": self.joules, "source": self.source, **({"note": self.note} if self.note else {})}


@dataclass
class Summary:
    """Tables of figures (lists of dicts, as in `to_dict()`); print it for the terminal view."""

    window_s: float
    calls: dict[str, int]  # call kind -> count
    pipelines: dict[str, str]  # "p0" -> method and placement
    steps: list[dict]
    transfers: list[dict]
    devices: list[dict]
    energy: list[dict]
    memory_share: dict
    meters: list[dict]
    model_error: dict = field(default_factory=dict)  # median / p90 |predicted - measured| / measured

    def to_dict(self) -> dict:
        def plain(v):
            if isinstance(v, Energy):
                return v.to_dict()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        return plain({k: getattr(self, k) for k in self.__dataclass_fields__})

    def render(self, console) -> None:
        from rich.table import Table

        console.print(f"[bold]profile[/]: {self.window_s * 1e3:.4g} ms, calls "
                      + ", ".join(f"{n} {k}" for k, n in self.calls.items()))
        for p, label in self.pipelines.items():
            console.print(f"  {p}: {label}")
        steps = Table(title="per step (device time; share of its calls' wall time)", title_justify="left")
        for col in ("pipe", "call", "step", "device", "n", "total", "mean", "share", "moved in", "predicted",
                    "error", "energy"):
            steps.add_column(col, justify="left" if col in ("pipe", "call", "step", "device") else "right")
        for r in self.steps:
            steps.add_row(r["pipeline"], r["call"], r["step"], r["device"] + _tag(r), str(r["n"]),
                          _ms(r["seconds"]), _ms(r["mean_s"]), f"{r['share']:.0%}", _bytes(r["bytes_in"]),
                          _ms(r["predicted_s"]) if r["predicted_s"] is not None else "-",
                          f"{r['error']:+.0%}" if r["error"] is not None else "-", str(r["energy"]))
        console.print(steps)
        if self.transfers:
            moves = Table(title="transfers", title_justify="left")
            for col in ("pipe", "link", "n", "bytes", "total", "GB/s", "energy"):
                moves.add_column(col, justify="left" if col in ("pipe", "link") else "right")
            for t in self.transfers:
                moves.add_row(t["pipeline"], t["link"], str(t["n"]), _bytes(t["bytes"]), _ms(t["seconds"]),
                              f"{t['gb_s']:.3g}" if t["gb_s"] else "-", str(t["energy"]))
            console.print(moves)
        devs = Table(title=f"per device over the {self.window_s * 1e3:.4g} ms window", title_justify="left")
        for col in ("device", "busy", "share", "bytes in", "bytes out", "energy"):
            devs.add_column(col, justify="left" if col == "device" else "right")
        for d in self.devices:
            devs.add_row(d["device"] + (" (modeled)" if d["modeled"] else ""), _ms(d["busy_s"]), f"{d['share']:.0%}",
                         _bytes(d["bytes_in"]), _bytes(d["bytes_out"]), str(d["energy"]))
        console.print(devs)
        energy = Table(title="energy over the window (devices of one chip counted once)", title_justify="left")
        for col in ("devices", "modeled", "measured", "gap", "note"):
            energy.add_column(col, justify="left" if col in ("devices", "note") else "right")
        for e in self.energy:
            measured = e["measured"]
            gap = f"{measured.joules / e['modeled'].joules - 1:+.0%}" if measured and e["modeled"].joules else "-"
            energy.add_row(e["devices"], str(e["modeled"]), str(measured) if measured else "-", gap, e["note"])
        console.print(energy)
        share = self.memory_share
        if share.get("step_calls"):
            console.print(f"memory processing (relevancy + retrieval + their transfers): "
                          f"[bold]{share['of_step_calls']:.1%}[/] of the pipeline's decode steps, "
                          f"{share['of_window']:.1%} of the profiled window")
        if self.model_error:
            console.print(f"cost model vs measured: median |error| {self.model_error['median']:.1%}, "
                          f"p90 {self.model_error['p90']:.1%} over {self.model_error['n']} step rows")
        for m in self.meters:
            if not m["available"]:
                console.print(f"[dim]meter {m['name']}: absent ({m['why_absent']})[/]")

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(record=True, width=140, file=io.StringIO())
        self.render(console)
        return console.export_text()


def _tag(row) -> str:
    return " (modeled)" if row["clock"] == "modeled" else ""


def group_parts(device_ids, nodes) -> dict[str, list[str]]:
    """Devices by piece of silicon: those naming one profile `part` (torch:cpu, host and PoCL
    on one CPU) draw power once."""
    parts: dict[str, list[str]] = {}
    for d in device_ids:
        parts.setdefault(nodes[d].profile.part or d, []).append(d)
    return parts


def modeled_energy(profile, busy_s: float, wall_s: float, note: str) -> Energy:
    busy_s = min(busy_s, wall_s)
    return Energy(busy_s * profile.active_power + (wall_s - busy_s) * profile.idle_power, "modeled", note)


# --- building it ------------------------------------------------------------------------------

def predictions(prof: Profile) -> dict[int, list]:
    """Call index -> per step record, (TaskCost or None) from the cost model; calls whose method
    has no model are absent. Predictions are cached per (placement, call shape)."""
    from ..cost.emulation import predict

    cache: dict = {}
    out: dict[int, list] = {}
    for c in prof.calls:
        if c.shape is None:
            continue
        s = c.shape
        key = (id(c.pipe), s.call, tuple(sorted(s.shapes.items())), s.appended, s.query, s.allocate, s.home)
        if key not in cache:
            cache[key] = predict(c.pipe.method, c.pipe.placement, s)[0]
        queues: dict[tuple[str, str], list] = {}
        for t in cache[key].tasks:
            queues.setdefault((t.device, t.task.op), []).append(t)
        matched = []
        for r in c.record.steps:  # the n-th record of an operation on a device is its n-th task
            queue = queues.get((r.device, r.op))
            matched.append(queue.pop(0) if queue else None)
        out[c.index] = matched
    return out


def power_nodes(device_ids) -> dict:
    """Device id -> the placer's Node (profile with idle/active power; calibrated or default)."""
    from ..cost.placer import node_for

    return {d: node_for(d) for d in device_ids}


def summarize(prof: Profile) -> Summary:
    window = prof.window_s
    predicted = predictions(prof)
    device_ids = list(dict.fromkeys(d.id for c in prof.calls for d in c.pipe.placement.devices))
    home = [c.shape.home for c in prof.calls if c.shape is not None]
    device_ids += [h for h in dict.fromkeys(home) if h not in device_ids]
    nodes = power_nodes(device_ids)

    calls: dict[str, int] = {}
    wall: dict[tuple[str, str], float] = {}
    for c in prof.calls:
        calls[c.record.call] = calls.get(c.record.call, 0) + 1
        key = (c.pipeline, c.record.call)
        wall[key] = wall.get(key, 0.0) + c.record.wall_s

    rows: dict[tuple, dict] = {}
    links: dict[tuple, dict] = {}
    busy: dict[str, float] = {d: 0.0 for d in device_ids}
    moved_in: dict[str, int] = {d: 0 for d in device_ids}
    moved_out: dict[str, int] = {d: 0 for d in device_ids}
    comparisons = []
    memory_by_pipe: dict[str, float] = {}
    for c in prof.calls:
        r = c.record
        tasks = predicted.get(c.index)
        if r.call == "step":
            memory_by_pipe[c.pipeline] = memory_by_pipe.get(c.pipeline, 0.0) + r.memory_seconds
        fed: dict[int, int] = {}
        for t in r.transfers:
            fed[t.feeds] = fed.get(t.feeds, 0) + t.nbytes
            key = (c.pipeline, f"{t.src} -> {t.dst}")
            link = links.setdefault(key, dict(pipeline=c.pipeline, link=key[1], n=0, bytes=0, seconds=0.0,
                                              clock=t.timing.source))
            link["n"] += 1
            link["bytes"] += t.nbytes
            link["seconds"] += t.seconds
            for dev, table in ((t.src, moved_out), (t.dst, moved_in)):
                if dev in table:
                    table[dev] += t.nbytes
        for i, s in enumerate(r.steps):
            key = (c.pipeline, r.call, s.step, s.op, s.device)
            row = rows.setdefault(key, dict(pipeline=c.pipeline, call=r.call, step=s.step, op=s.op, device=s.device,
                                            n=0, seconds=0.0, bytes_in=0, predicted_s=None, clock=s.timing.source,
                                            flops=None, traffic=None, dtype=None, bound=None,
                                            _measured_for_model=0.0))
            row["n"] += 1
            row["seconds"] += s.seconds
            row["bytes_in"] += fed.get(i, 0)
            busy[s.device] = busy.get(s.device, 0.0) + s.seconds
            task = tasks[i] if tasks else None
            if task is not None and row["flops"] is None:  # the model's count, per call
                row.update(flops=task.task.flops, traffic=sum(a.nbytes for a in task.task.accesses),
                           dtype=task.task.dtype, bound=task.bound)
            if task is not None and s.timing.source != "modeled":
                row["predicted_s"] = (row["predicted_s"] or 0.0) + task.seconds
                row["_measured_for_model"] += s.seconds

    step_rows = []
    for row in rows.values():
        measured_part = row.pop("_measured_for_model")
        row["mean_s"] = row["seconds"] / row["n"]
        row["share"] = row["seconds"] / max(wall[(row["pipeline"], row["call"])], 1e-12)
        row["error"] = (row["predicted_s"] / measured_part - 1) if row["predicted_s"] and measured_part else None
        if row["error"] is not None:
            comparisons.append(abs(row["predicted_s"] - measured_part) / measured_part)
        row["energy"] = Energy(row["seconds"] * nodes[row["device"]].profile.active_power, "modeled",
                               "busy time x active power")
        step_rows.append(row)

    from ..cost.placer import make_system

    system = make_system(device_ids)[0] if device_ids else None
    transfer_rows = []
    for link in links.values():
        src, dst = link["link"].split(" -> ")
        per_byte = sum(x.energy_j for x in system.transfer("", src, dst, 1.0)) if system else 0.0
        link["gb_s"] = link["bytes"] / link["seconds"] / 1e9 if link["seconds"] > 0 and link["bytes"] else None
        link["energy"] = Energy(link["bytes"] * per_byte, "modeled", "bytes x link energy per byte")
        transfer_rows.append(link)

    device_rows = []
    for d in device_ids:
        note = "busy x active + idle x idle power" + ("" if nodes[d].calibrated else "; uncalibrated default power")
        device_rows.append(dict(device=d, modeled=nodes[d].modeled, calibrated=nodes[d].calibrated, busy_s=busy[d],
                                share=min(busy[d], window) / window if window else 0.0, bytes_in=moved_in[d],
                                bytes_out=moved_out[d], energy=modeled_energy(nodes[d].profile, busy[d], window, note)))

    energy_rows = _energy_by_part(prof, device_ids, nodes, busy, window)
    step_wall = sum(w for (_, call), w in wall.items() if call == "step")
    memory_s = sum(memory_by_pipe.values())
    memory_share = dict(memory_s=memory_s, step_calls=calls.get("step", 0), step_wall_s=step_wall,
                        of_step_calls=memory_s / step_wall if step_wall else 0.0,
                        of_window=memory_s / window if window else 0.0, window_s=window,
                        by_pipeline={p: memory_by_pipe.get(p, 0.0) / w for (p, call), w in wall.items()
                                     if call == "step" and w > 0})
    model_error = {}
    if comparisons:
        ordered = sorted(comparisons)
        model_error = dict(median=statistics.median(ordered), p90=ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
                           n=len(ordered))
    meters = [dict(name=m.name, covers=list(m.covers), available=m.available, why_absent=m.why_absent,
                   source=m.source) for m in prof.meters]
    return Summary(window, calls, {f"{c.pipeline}": c.label for c in prof.calls}, step_rows, transfer_rows,
                   device_rows, energy_rows, memory_share, meters, model_error)


def _energy_by_part(prof: Profile, device_ids, nodes, busy, window) -> list[dict]:
    """One row per piece of silicon (devices naming one `part` draw power once): the modeled
    energy over the window, and the measured one where a counter covers it."""
    rows = []
    for members in group_parts(device_ids, nodes).values():
        prof_d = nodes[members[0]].profile
        modeled = modeled_energy(prof_d, sum(busy[d] for d in members), window,
                                 f"{prof_d.idle_power:g} W idle, {prof_d.active_power:g} W active")
        meter = next((m for m in prof.meters if m.available and set(members) & set(m.covers)), None)
        measured = None
        note = modeled.note
        if meter is not None and meter.name in prof.meter_joules:
            measured = Energy(prof.meter_joules[meter.name], "measured", meter.name)
            note = f"{meter.name} counter; model: {modeled.note}"
        elif meter is None and prof.meters:
            absent = [m.name for m in prof.meters if not m.available]
            note += f"; no counter ({', '.join(absent)} absent)" if absent else ""
        rows.append(dict(devices=" + ".join(members), modeled=modeled, measured=measured, note=note))
    return rows
