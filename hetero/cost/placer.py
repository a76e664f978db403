"""The cost-based placer: which device should run each step, and why.

    plan = hetero.place(PageSparseAttention(), dict(context=131072, batch=4),
                        devices=["model:mi210", "model:u55c"], objective="energy")
    print(plan.explain())
    pipe = hetero.Pipeline(method, placement=plan.placement)

Every step -> device assignment the method can run is evaluated with the cost model
(exhaustively while the space is small, by greedy single-step moves beyond that); an
assignment whose memory does not fit its devices is infeasible, with the reason. Relevancy
and retrieval on one device use the fused implementation where the backend has one, as the
runtime does. Single-device baselines are always evaluated beside the choice.
"""

from __future__ import annotations

import io
import itertools
import os
from dataclasses import dataclass, field

from ..devices import Device, devices as present_devices, get_device
from ..runtime import STEPS, Step
from .model import Estimate, Node, System, capacity_reasons, evaluate
from .profiles import DeviceProfile, LinkProfile, MemoryLevel, ProfileError, link_profile, known_profiles

OBJECTIVES = ("latency", "energy", "edp")
EXHAUSTIVE_LIMIT = 20000


@dataclass
class Plan:
    """The placer's answer: the chosen placement, every placement ranked, the infeasible ones
    with reasons, and the single-device baselines."""

    method: object
    shapes: dict
    objective: str
    system: System
    chosen: Estimate
    ranked: list[Estimate]
    infeasible: list[Estimate]
    baselines: dict[str, Estimate]
    search: str
    not_runnable: dict[str, list[str]] = field(default_factory=dict)  # device -> steps it cannot run, why
    # refine=N: measured decode-step seconds (robust median) of the placements measured, by label
    measured: dict[str, float] = field(default_factory=dict)
    predicted_choice: Estimate | None = None  # the model's own choice, when refinement changed it

    @property
    def placement(self) -> dict[str, str]:
        """step -> device id, ready for `Pipeline(method, placement=plan.placement)`."""
        return {s.value: d for s, d in self.chosen.assignment.items()}

    def rejected(self) -> dict[str, list[str]]:
        """For every device, why it does not run the steps the choice gives to others."""
        out: dict[str, list[str]] = {}
        best = self.chosen.objective(self.objective)
        for dev in self.system.nodes:
            reasons = list(self.not_runnable.get(dev, []))
            for step in STEPS:
                if self.chosen.assignment[step] == dev or any(r.startswith(f"{step.value}: ") for r in reasons):
                    continue
                alt = next((e for e in self.ranked if e.assignment[step] == dev), None)
                if alt is not None:
                    worse = alt.objective(self.objective) / best - 1
                    cost = max((t for t in alt.tasks if t.task.step == step), key=lambda t: t.seconds, default=None)
                    why = f", {cost.bound}-bound there" if cost is not None else ""
                    reasons.append(f"{step.value}: best placement with it here is {worse:+.0%} {self.objective}{why}")
                else:
                    bad = next((e for e in self.infeasible if e.assignment[step] == dev), None)
                    if bad is not None:
                        reasons.append(f"{step.value}: infeasible ({bad.reasons[0]})")
            if reasons:
                out[dev] = reasons
        return out

    def explain(self, top: int = 8, width: int = 120) -> str:
        """A ranked, human-readable account of the choice (also `str(plan)`)."""
        from rich.console import Console
        from rich.table import Table

        console = Console(record=True, width=width, file=io.StringIO())  # recorded, never printed
        shapes = ", ".join(f"{k}={v}" for k, v in self.shapes.items())
        chosen = self.chosen
        console.print(f"[bold]{self.method.name}[/] ({shapes}); objective: {self.objective}; {self.search}")
        console.print(f"chosen: [bold]{chosen.label()}[/]: {_ms(chosen.seconds)} per decode step, "
                      f"{chosen.energy_j * 1e3:.3g} mJ (modeled energy)"
                      + (" [pipelined: transfers overlap other devices' work]" if chosen.overlap else ""))
        if self.measured:
            console.print(f"refined by measurement: {len(self.measured)} placements (the best-predicted and the "
                          f"single-device baselines) run on this machine; chosen "
                          f"{_ms(self.measured[chosen.label()])} measured"
                          + (f" (the model alone chose {self.predicted_choice.label()}, measured "
                             f"{_ms(self.measured[self.predicted_choice.label()])})" if self.predicted_choice else ""))
        for warning in self.warnings():
            console.print(f"[yellow]note:[/] {warning}")
        steps = Table(title="chosen placement, per operation (x layers)", title_justify="left")
        for col in ("step", "operation", "device", "predicted", "bound by", "energy"):
            steps.add_column(col, justify="right" if col in ("predicted", "energy") else "left")
        for t in chosen.tasks:
            node = self.system.nodes[t.device]
            energy = t.seconds * chosen.repeat * node.profile.active_power
            fused = [f"{a.value}+{b.value}" for (a, b), op in self.method.fusions.items() if op == t.task.op]
            steps.add_row(fused[0] if fused else t.task.step.value, t.task.op, self._name(t.device), _ms(t.seconds * chosen.repeat),
                          t.bound, f"{energy * 1e3:.3g} mJ")
        for x in chosen.transfers:
            steps.add_row("transfer", x.what, f"{x.src} -> {x.dst}", _ms(x.seconds * chosen.repeat),
                          f"link {x.link}", f"{x.energy_j * chosen.repeat * 1e3:.3g} mJ")
        for h in chosen.handoffs:
            energy = h.seconds * chosen.repeat * self.system.nodes[h.dst].profile.active_power
            steps.add_row("handoff", f"after {h.src}", self._name(h.dst), _ms(h.seconds * chosen.repeat),
                          "device change", f"{energy * 1e3:.3g} mJ")
        console.print(steps)
        ranked = Table(title=f"placements ranked by {self.objective} (top {top} of {len(self.ranked)} feasible)",
                       title_justify="left")
        cols = ["#", "placement", "latency", "energy", "EDP", "vs chosen"] + (["measured"] if self.measured else [])
        for col in cols:
            ranked.add_column(col, justify="left" if col == "placement" else "right")
        best = chosen.objective(self.objective)
        for i, e in enumerate(self.ranked[:top], 1):
            measured = [_ms(self.measured[e.label()]) if e.label() in self.measured else "-"] if self.measured else []
            ranked.add_row(str(i), e.label(), _ms(e.seconds), f"{e.energy_j * 1e3:.3g} mJ", f"{e.edp * 1e6:.3g} mJ*ms",
                           f"{e.objective(self.objective) / best:.2f}x", *measured)
        console.print(ranked)
        base = Table(title="single-device baselines", title_justify="left")
        for col in ("device", "latency", "energy", f"{self.objective} vs chosen", "note"):
            base.add_column(col, justify="left" if col in ("device", "note") else "right")
        for dev, e in self.baselines.items():
            if e.feasible:
                note = f"measured {_ms(self.measured[e.label()])}" if e.label() in self.measured else ""
                base.add_row(self._name(dev), _ms(e.seconds), f"{e.energy_j * 1e3:.3g} mJ",
                             f"{e.objective(self.objective) / best:.2f}x", note)
            else:
                base.add_row(self._name(dev), "-", "-", "-", "; ".join(e.reasons))
        console.print(base)
        rejected = self.rejected()
        if rejected:
            console.print("[bold]why not elsewhere[/]")
            for dev, reasons in rejected.items():
                for r in reasons:
                    console.print(f"  {self._name(dev)}: {r}")
        return console.export_text()

    __str__ = explain

    def warnings(self) -> list[str]:
        out = []
        for node in self.system.nodes.values():
            if not node.calibrated:
                out.append(f"{node.id} has no calibrated profile (uncalibrated defaults used); run `hetero calibrate`")
        return out

    def _name(self, dev: str) -> str:
        return f"{dev} (modeled)" if self.system.nodes[dev].modeled else dev


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} us"


# --- devices and the system ------------------------------------------------------------

def _host_memory(device: Device) -> bool:
    return device.backend == "host" or (device.backend == "torch" and device.kind == "cpu")


def _uncalibrated(device: Device) -> tuple[DeviceProfile, LinkProfile | None]:
    """Rough defaults for a present device nobody calibrated (flagged in every explanation)."""
    note = "uncalibrated default; run `hetero calibrate`"
    gpu = device.kind == "gpu"
    capacity = device.info.get("memory_bytes") or device.info.get("global_memory_bytes") or (
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    profile = DeviceProfile(
        name=device.id, title=device.name, kind=device.kind, launch=10e-6 if gpu else 30e-6,
        idle_power=50.0 if gpu else 30.0, active_power=300.0 if gpu else 100.0,
        compute={"float32": 20e12 if gpu else 100e9},
        memory=[MemoryLevel("DRAM", float(capacity), 1e12 if gpu else 20e9, 500e-9 if gpu else 100e-9)],
        efficiency={"stream": 0.8, "scan": 0.5, "select": 0.3, "gather": 0.5},
        part="" if gpu else "host-cpu", sources={"*": note})
    link = None
    if not _host_memory(device):
        link = LinkProfile(f"{device.id} host link", "host", 25e9 if gpu else 10e9, 10e-6, 20e-12, (device.id, "host"),
                           {"*": note})
    return profile, link


def node_for(device: "str | Device") -> Node:
    """A placer node for a present device id or a modeled one ('model:<profile>')."""
    dev = get_device(device)
    reg = known_profiles()
    if dev.info.get("modeled"):
        prof = reg.devices[dev.info["profile"]]
        link = link_profile(prof.host_link) if prof.host_link else None
        return Node(dev.id, prof, dev.backend, True, link)
    prof = reg.devices.get(dev.id)
    if prof is None:
        prof, link = _uncalibrated(dev)
        return Node(dev.id, prof, dev.backend, False, link, calibrated=False)
    link = None if _host_memory(dev) or not prof.host_link else link_profile(prof.host_link)
    return Node(dev.id, prof, dev.backend, False, link)


def make_system(device_list, home: str | None = None, links: dict | None = None) -> tuple[System, dict[str, Device]]:
    if device_list is None:
        device_list = [d.id for d in present_devices()]
    if isinstance(device_list, (str, Device)):
        device_list = [device_list]
    devs = {get_device(d).id: get_device(d) for d in device_list}
    if not devs:
        raise ValueError("devices must name at least one device")
    nodes = [node_for(d) for d in devs.values()]
    if home is None:
        gpus = [d for d in devs.values() if d.kind == "gpu"]
        home = gpus[0].id if gpus else ("torch:cpu" if "torch:cpu" in devs else next(iter(devs)))
    home = get_device(home).id
    if home not in devs:
        devs[home] = get_device(home)
        nodes.append(node_for(home))
    joined: dict[frozenset, LinkProfile] = {}
    by_name = {n.profile.name: n.id for n in nodes}
    for link in known_profiles().links.values():
        ends = [by_name.get(e, e) for e in link.between]
        if link.kind == "p2p" and len(ends) == 2 and all(e in devs for e in ends):
            joined[frozenset(ends)] = link
    for pair, name in (links or {}).items():
        ends = [get_device(e).id for e in pair]
        if len(ends) != 2 or any(e not in devs for e in ends):
            raise ValueError(f"links key {pair!r} must name two of the placed devices {sorted(devs)}")
        joined[frozenset(ends)] = name if isinstance(name, LinkProfile) else link_profile(name)
    return System(nodes, home, joined), devs


# --- search -----------------------------------------------------------------------------

def place(method, shapes: dict | None = None, devices=None, objective: str = "latency", home: str | None = None,
          links: dict | None = None, overlap: bool = False, exhaustive_limit: int = EXHAUSTIVE_LIMIT,
          adjust=None, refine: int = 0, refine_rounds: int = 10) -> Plan:
    """The best step -> device placement of `method` for one decode step at `shapes`.

    Args:
        method: a hetero method (e.g. PageSparseAttention()).
        shapes: the method's shapes (see `method.shapes()`; defaults filled in).
        devices: device ids to choose from: present ones ('torch:cpu', 'opencl:0:0', 'host')
            and modeled ones ('model:u55c'); default every present device.
        objective: 'latency', 'energy' or 'edp' (energy-delay product).
        home: where queries come from and outputs go (default: the first GPU, else torch:cpu).
        links: {(device, device): link profile name} peer-to-peer links between devices
            (others are staged through host memory over each device's host link).
        overlap: steps pipelined across layers/queries, so transfers hide behind other
            devices' work and only the busiest device or link counts.
        refine: measure the `refine` best-predicted placements and the single-device
            baselines on this machine (synthetic inputs at `shapes`, `refine_rounds`
            interleaved rounds of decode steps) and choose the fastest measured one. The
            model ranks; measurement settles what it cannot see (e.g. devices sharing CPU
            cores slowing each other). Latency objective only; placements on modeled devices
            are not measured. 0 (default): the model decides.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ValueError(f"refine must be a count of placements to measure (an int >= 0), got {refine!r}")
    if refine and objective != "latency":
        raise ValueError(f"refine measures time, so it needs objective='latency' (got {objective!r}); energy and EDP "
                         f"are not measured here")
    if not isinstance(refine_rounds, int) or refine_rounds < 1:
        raise ValueError(f"refine_rounds must be an int >= 1, got {refine_rounds!r}")
    shapes = method.shapes(**(shapes or {}))
    system, devs = make_system(devices, home, links)
    candidates: dict[Step, list[str]] = {}
    not_runnable: dict[str, list[str]] = {}
    for step in STEPS:
        candidates[step] = []
        for dev_id, dev in devs.items():
            why = method.why_not(step, dev)
            if why:
                not_runnable.setdefault(dev_id, []).append(f"{step.value}: {'; '.join(why)}")
            else:
                candidates[step].append(dev_id)
        if not candidates[step]:
            raise ProfileError(f"no device among {sorted(devs)} can run {step.value} of {method.name}: "
                               + "; ".join(not_runnable.get(d, [""])[-1] for d in devs))
    workloads: dict = {}

    def estimate(assignment: dict[Step, str]) -> Estimate:
        placed = {s: devs[d] for s, d in assignment.items()}
        backends = {s: d.backend for s, d in placed.items()}
        fused = method.fused(placed)
        key = (tuple(backends.values()), fused)
        if key not in workloads:
            workloads[key] = method.workload(shapes, backends, fused, appended=method.STEP_APPENDS, query=True)
        work = workloads[key] if adjust is None else adjust(workloads[key], placed)
        est = evaluate(method, work, assignment, system, overlap)
        reasons = capacity_reasons(work, assignment, system)
        if reasons:
            est.feasible, est.reasons = False, reasons
        return est

    def rank_key(e: Estimate):
        return (e.objective(objective), e.seconds, e.energy_j)

    space = 1
    for step in STEPS:
        space *= len(candidates[step])
    if space <= exhaustive_limit:
        found = [estimate(dict(zip(STEPS, combo))) for combo in itertools.product(*(candidates[s] for s in STEPS))]
        search = f"exhaustive over {space} placements"
    else:
        found, search = _greedy(estimate, candidates, rank_key), f"greedy single-step moves ({space} placements in all)"
    feasible = sorted((e for e in found if e.feasible), key=rank_key)
    infeasible = [e for e in found if not e.feasible]
    baselines = {}
    for dev_id in devs:
        if all(dev_id in candidates[s] for s in STEPS):
            baselines[dev_id] = next((e for e in found if set(e.assignment.values()) == {dev_id}), None) or \
                estimate({s: dev_id for s in STEPS})
    if not feasible:
        reasons = sorted({r for e in infeasible for r in e.reasons})
        raise ProfileError(f"no placement of {method.name} at {shapes} fits the devices:\n  " + "\n  ".join(reasons))
    plan = Plan(method, shapes, objective, system, feasible[0], feasible, infeasible, baselines, search, not_runnable)
    if refine:
        _refine(plan, devs, refine, refine_rounds)
    return plan


def _refine(plan: Plan, devs: dict[str, Device], count: int, rounds: int, steps: int = 3) -> None:
    """Measure the `count` best-predicted placements that run on present devices only, and
    the single-device baselines, interleaved in a new random order each round (a slow spell
    of a shared machine then hits them all alike), and choose the fastest by robust median
    of the decode-step wall time."""
    from ..runtime import Pipeline
    from .calibrate import decode_inputs_for, measure_round_robin, robust_median

    method = plan.method

    def runnable(e: Estimate) -> bool:
        return e.feasible and not any(devs[d].info.get("modeled") for d in e.assignment.values())

    # the single-device baselines too: the model's systematic errors (unmodeled costs of
    # crossing devices) favour splits, and a baseline is what a split must beat
    candidates = [e for e in plan.ranked if runnable(e)][:count]
    candidates += [e for e in plan.baselines.values() if runnable(e) and e.label() not in {c.label() for c in candidates}]
    if len(candidates) < 2:
        plan.search += "; nothing to refine (fewer than 2 placements on present devices)"
        return
    inputs, query = method.example_inputs(plan.shapes)
    new = decode_inputs_for(method, inputs)
    runs = []
    for e in candidates:
        pipe = Pipeline(method, {s.value: d for s, d in e.assignment.items()})
        runs.append((pipe, pipe.prepare(*inputs)))
    measured = measure_round_robin(method, runs, inputs, query, new, rounds, steps)
    walls = {e.label(): m["wall"] for e, m in zip(candidates, measured)}
    plan.measured = {label: robust_median(w) for label, w in walls.items()}
    best = min(candidates, key=lambda e: plan.measured[e.label()])
    if best is not plan.chosen:
        plan.predicted_choice, plan.chosen = plan.chosen, best
    plan.search += (f"; refined by measuring the {min(count, len(candidates))} best-predicted placements and the "
                    f"single-device baselines ({len(candidates)} in all, {rounds} rounds)")


def _greedy(estimate, candidates: dict[Step, list[str]], rank_key) -> list[Estimate]:
    """Start from every single-device placement that exists and from the first candidates,
    then move one step at a time to the device that improves the objective most."""
    starts = [{s: candidates[s][0] for s in STEPS}]
    common = set.intersection(*(set(candidates[s]) for s in STEPS))
    starts += [{s: d for s in STEPS} for d in sorted(common)]
    seen: dict[tuple, Estimate] = {}

    def get(a):
        key = tuple(a[s] for s in STEPS)
        if key not in seen:
            seen[key] = estimate(a)
        return seen[key]

    def score(e):  # infeasible placements rank last
        return (not e.feasible, rank_key(e))

    for start in starts:
        current = get(start)
        while True:
            moves = [get({**current.assignment, step: d}) for step in STEPS for d in candidates[step]]
            best = min(moves, key=score)
            if score(best) >= score(current):
                break
            current = best
    return list(seen.values())
