"""The cost model: hierarchical roofline per step, transfers over links, energy with idle power.

A method declares, for given shapes, a `Workload`: the tasks one call runs (each with its
FLOPs, the bytes it moves through memory and the size of the structure those bytes come
from), the values that flow between tasks, and the memory each step keeps resident. Given a
placement onto device profiles:

    task time     = launches x launch + max(compute, bytes at each level / level bandwidth)
                    / efficiency(pattern)        (or a calibrated overhead + roofline / efficiency)
    handoff       = the device's handoff time, wherever a task follows one on another device
    transfer time = latency + bytes / bandwidth, per hop (peer-to-peer link, or staged
                    through host memory over each device's host link)
    energy        = sum over devices of busy x active power + (total - busy) x idle power,
                    plus bytes x energy per byte on every link

The level serving an access is the fastest one whose capacity holds the structure (the
hierarchical part: page summaries that fit on chip are read on chip).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..runtime import STEPS, Step
from .profiles import DeviceProfile, LinkProfile


@dataclass(frozen=True)
class Access:
    """Bytes a task moves (read + written) from one structure of `footprint` bytes."""

    what: str
    nbytes: float
    footprint: float


@dataclass(frozen=True)
class Task:
    """One operation of a call on the device of `step`, as the runtime records it (`op`)."""

    step: Step
    op: str
    flops: float
    dtype: str  # compute dtype
    pattern: str  # a key of profiles.PATTERNS
    accesses: tuple[Access, ...]
    reads: tuple[str, ...] = ()  # dataflow values consumed (inputs or earlier tasks' writes)
    writes: tuple[tuple[str, float], ...] = ()  # values produced, with their bytes
    launches: int = 1


@dataclass
class Workload:
    """What one call of a method does, for given shapes and backends (one layer; `repeat`
    layers run the same work)."""

    tasks: list[Task]
    inputs: dict[str, float]  # values that arrive from the home device: name -> bytes
    outputs: tuple[str, ...]  # values returned to the home device
    resident: dict[Step, dict[str, float]]  # bytes of memory held on each step's device (all layers)
    repeat: int = 1


@dataclass(frozen=True)
class Node:
    """A device the placer may use: a present device or a modeled profile."""

    id: str  # device id: 'torch:cpu', 'model:u55c'
    profile: DeviceProfile
    backend: str  # backend whose implementation runs (the emulator's for modeled devices)
    modeled: bool
    host_link: LinkProfile | None  # None: the device computes in host memory
    calibrated: bool = True


@dataclass
class TaskCost:
    task: Task
    device: str
    seconds: float
    bound: str  # "compute", "<level> bandwidth" or "launch"
    levels: dict[str, float]  # level -> seconds of its bytes


@dataclass
class TransferCost:
    what: str
    src: str
    dst: str
    nbytes: float
    seconds: float
    link: str
    energy_j: float


def roofline(task: Task, prof: DeviceProfile) -> tuple[float, float, dict[str, float], float]:
    """The bare roofline of `task` on `prof`: (max(compute, level times), compute seconds,
    level -> seconds of its bytes, the slowest level's latency); no launches, no efficiency."""
    compute_s = task.flops / prof.flops(task.dtype)
    levels: dict[str, float] = {}
    latency = 0.0
    for access in task.accesses:
        level = prof.level_for(access.footprint)
        levels[level.name] = levels.get(level.name, 0.0) + access.nbytes / level.bandwidth
        latency = max(latency, level.latency)
    return max([compute_s, *levels.values()]), compute_s, levels, latency


def task_cost(task: Task, node: Node, method_name: str) -> TaskCost:
    prof = node.profile
    roof, compute_s, levels, latency = roofline(task, prof)
    bound = "compute" if compute_s >= roof else f"{max(levels, key=levels.get)} bandwidth"
    fit = prof.ops.get(f"{method_name}.{task.op}")
    if fit is not None:
        fixed, busy = fit.overhead, roof / fit.efficiency
    else:
        fixed, busy = task.launches * prof.launch + latency, roof / prof.efficiency[task.pattern]
    if fixed > busy:
        bound = "launch" if fit is None else "overhead"
    return TaskCost(task, node.id, fixed + busy, bound, levels)


class System:
    """The devices a placement may use, how they are linked, and where inputs come from."""

    def __init__(self, nodes: list[Node], home: str, links: dict[frozenset, LinkProfile] | None = None):
        self.nodes = {n.id: n for n in nodes}
        self.home = home
        self.links = links or {}

    def hops(self, src: str, dst: str) -> list[LinkProfile]:
        """The links a value crosses from src to dst (empty when it stays)."""
        if src == dst:
            return []
        direct = self.links.get(frozenset((src, dst)))
        if direct is not None:
            return [direct]
        a, b = self.nodes[src].host_link, self.nodes[dst].host_link
        return [link for link in (a, b) if link is not None]  # staged through host memory

    def transfer(self, what: str, src: str, dst: str, nbytes: float) -> list[TransferCost]:
        return [TransferCost(what, src, dst, nbytes, link.time(nbytes), link.name,
                             0.0 if link.kind == "shared" else nbytes * link.energy_per_byte)
                for link in self.hops(src, dst)]


@dataclass
class Handoff:
    """A device change in a call's task order: `dst` starts after work on `src`."""

    src: str
    dst: str
    seconds: float


def device_changes(order: list[str]) -> list[tuple[str, str]]:
    """(previous, next) device wherever consecutive tasks of a call run on different devices.
    Decode steps repeat, so the first task follows the last one of the previous step."""
    return [(a, b) for a, b in zip(order[-1:] + order[:-1], order) if a != b]


def handoffs(tasks: list[TaskCost], system: "System") -> list[Handoff]:
    """The handoffs of one call's tasks in order (device changes into a device with a handoff time)."""
    return [Handoff(a, b, system.nodes[b].profile.handoff) for a, b in device_changes([t.device for t in tasks])
            if system.nodes[b].profile.handoff > 0]


@dataclass
class Estimate:
    """A placement's predicted cost for one call (all layers)."""

    assignment: dict[Step, str]
    tasks: list[TaskCost]
    transfers: list[TransferCost]
    repeat: int
    seconds: float  # serial latency, or the pipelined bottleneck when overlap=True
    serial_seconds: float
    busy: dict[str, float]  # device -> busy seconds
    energy_j: float
    energy_by_device: dict[str, float]
    overlap: bool = False
    feasible: bool = True
    reasons: list[str] = field(default_factory=list)
    handoffs: list[Handoff] = field(default_factory=list)

    @property
    def edp(self) -> float:
        return self.energy_j * self.seconds

    def objective(self, name: str) -> float:
        return {"latency": self.seconds, "energy": self.energy_j, "edp": self.edp}[name]

    def step_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.tasks:
            out[t.task.step.value] = out.get(t.task.step.value, 0.0) + t.seconds * self.repeat
        return out

    @property
    def transfer_seconds(self) -> float:
        return sum(t.seconds for t in self.transfers) * self.repeat

    def label(self) -> str:
        ids = list(dict.fromkeys(self.assignment.values()))
        if len(ids) == 1:
            return f"all on {ids[0]}"
        return ", ".join(f"{s.value}={d}" for s, d in self.assignment.items())


def evaluate(method, workload: Workload, assignment: dict[Step, str], system: System,
             overlap: bool = False) -> Estimate:
    """Predicted time and energy of `workload` with each step on `assignment[step]`."""
    name = method.name
    tasks = [task_cost(t, system.nodes[assignment[t.step]], name) for t in workload.tasks]
    where = {value: system.home for value in workload.inputs}
    sizes = dict(workload.inputs)
    transfers: list[TransferCost] = []
    moved: set[tuple[str, str]] = set()
    for cost in tasks:
        dev = cost.device
        for value in cost.task.reads:
            if value in where and where[value] != dev and (value, dev) not in moved:
                moved.add((value, dev))
                transfers += system.transfer(value, where[value], dev, sizes[value])
        for value, nbytes in cost.task.writes:
            where[value], sizes[value] = dev, nbytes
    for value in workload.outputs:
        transfers += system.transfer(value, where[value], system.home, sizes[value])
    reps = workload.repeat
    switches = handoffs(tasks, system)
    busy: dict[str, float] = {}
    for cost in tasks:
        busy[cost.device] = busy.get(cost.device, 0.0) + cost.seconds * reps
    for h in switches:  # the device starting up is busy
        busy[h.dst] = busy.get(h.dst, 0.0) + h.seconds * reps
    link_busy: dict[str, float] = {}
    for t in transfers:
        link_busy[t.link] = link_busy.get(t.link, 0.0) + t.seconds * reps
    serial = sum(busy.values()) + sum(link_busy.values())
    # pipelined across layers/queries: each device and link works on another layer's data while
    # the others run, so only the busiest resource counts (transfers hidden behind compute)
    seconds = max([*busy.values(), *link_busy.values()]) if overlap else serial
    # devices that are one piece of silicon (torch:cpu, host and PoCL on one CPU) draw power once
    parts: dict[str, list[str]] = {}
    for dev in dict.fromkeys([*assignment.values(), system.home]):
        parts.setdefault(system.nodes[dev].profile.part or dev, []).append(dev)
    energy_by_device = {}
    for members in parts.values():
        prof = system.nodes[members[0]].profile
        b = min(sum(busy.get(dev, 0.0) for dev in members), seconds)
        energy_by_device[" + ".join(members)] = b * prof.active_power + (seconds - b) * prof.idle_power
    energy = sum(energy_by_device.values()) + sum(t.energy_j for t in transfers) * reps
    return Estimate(dict(assignment), tasks, transfers, reps, seconds, serial, busy, energy, energy_by_device, overlap,
                    handoffs=switches)


def capacity_reasons(workload: Workload, assignment: dict[Step, str], system: System) -> list[str]:
    """Why the memory of this placement does not fit its devices (empty when it fits)."""
    held: dict[str, dict[str, float]] = {}
    for step in STEPS:
        for what, nbytes in workload.resident.get(step, {}).items():
            held.setdefault(assignment[step], {})[what] = nbytes
    reasons = []
    for dev, parts in held.items():
        prof = system.nodes[dev].profile
        total = sum(parts.values())
        if total > prof.capacity:
            level = max(prof.memory, key=lambda lv: lv.capacity)
            listing = " + ".join(f"{w} {_gb(b)}" for w, b in parts.items())
            reasons.append(f"{listing} = {_gb(total)} does not fit {dev} ({_gb(level.capacity)} {level.name})")
    return reasons


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.3g} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.3g} MB"


def safe_log2(n: float) -> float:
    return math.log2(max(n, 2.0))
