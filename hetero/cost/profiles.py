"""Device and link profiles: hierarchical rooflines read from TOML, every number with its source.

A file holds `[[device]]` and `[[link]]` tables (schema in the README, examples in
`hetero/cost/profiles/`). Every figure is an inline table `{ value = "1.6 TB/s", source = "..." }`;
a figure without a source, with an unknown unit, a negative or zero bandwidth, or an unknown
key is rejected with the file and field named. Shipped parts live in this package; the
calibrated profile of this machine (`hetero calibrate`) and the user's own files are added
with `add_profiles(path)` or the HETERO_PROFILES environment variable (paths joined by ':').
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .units import format_value, parse

SHIPPED_DIR = Path(__file__).with_name("profiles")
MACHINE_PROFILE = Path(os.environ.get("HETERO_MACHINE_PROFILE", Path.home() / ".cache" / "hetero" / "machine.toml"))
KINDS = ("gpu", "cpu", "fpga", "accelerator")
# How a step touches memory; a profile gives the fraction of its roofline each pattern reaches.
PATTERNS = {
    "stream": "sequential dense reads/writes (copies, elementwise updates, dense attention)",
    "scan": "score every memory entry against a query (GEMV-like, tiny output per entry)",
    "select": "top-k or threshold selection over scores",
    "gather": "indexed reads of selected blocks (page/token gathers)",
}
DTYPES = ("float16", "bfloat16", "float32", "int8")
LINK_KINDS = ("host", "p2p", "shared")


class ProfileError(ValueError):
    """A profile file that cannot be used, with the file and field named."""


@dataclass(frozen=True)
class MemoryLevel:
    name: str
    capacity: float  # bytes
    bandwidth: float  # bytes/s, read + write
    latency: float  # s


@dataclass(frozen=True)
class OpFit:
    """A calibrated step operation on one device: time = overhead + roofline / efficiency."""

    overhead: float  # s
    efficiency: float


@dataclass
class DeviceProfile:
    name: str  # 'mi210', or a present device id for calibrated profiles ('torch:cpu')
    title: str
    kind: str
    launch: float  # s per kernel launch
    idle_power: float  # W
    active_power: float  # W
    compute: dict[str, float]  # dtype -> FLOP/s
    memory: list[MemoryLevel]  # fastest first
    efficiency: dict[str, float]  # pattern -> fraction of the roofline reached
    ops: dict[str, OpFit] = field(default_factory=dict)  # "Method.op" -> calibrated fit
    emulate_on: str = "torch"  # backend that runs steps functionally when the device is modeled
    host_link: str | None = None
    part: str = ""  # devices naming one part are one piece of silicon (e.g. three views of one CPU)
    sources: dict[str, str] = field(default_factory=dict, repr=False)  # field path -> source
    path: str = ""
    # s charged when a task on this device follows one on another device: waking its runtime
    # (PoCL's sleeping workers, a GPU stream waiting on the host) and warming its caches
    handoff: float = 0.0

    @property
    def capacity(self) -> float:
        """Bytes this device can hold: its largest memory level."""
        return max(level.capacity for level in self.memory)

    def level_for(self, footprint: float) -> MemoryLevel:
        """The fastest level whose capacity holds `footprint` bytes (the largest level if none)."""
        for level in self.memory:
            if footprint <= level.capacity:
                return level
        return max(self.memory, key=lambda lv: lv.capacity)

    def flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`, falling back to float32 (computes in float32) when absent."""
        return self.compute.get(dtype) or self.compute.get("float32") or max(self.compute.values())


@dataclass
class LinkProfile:
    name: str
    kind: str  # host: device <-> host memory; p2p: device <-> device; shared: same memory, no copy
    bandwidth: float  # bytes/s per direction
    latency: float  # s per transfer
    energy_per_byte: float  # J/B
    between: tuple[str, ...] = ()  # device names a p2p (or calibrated) link joins
    sources: dict[str, str] = field(default_factory=dict, repr=False)
    path: str = ""

    def time(self, nbytes: float) -> float:
        if self.kind == "shared" or nbytes <= 0:
            return 0.0
        return self.latency + nbytes / self.bandwidth


@dataclass
class Profiles:
    devices: dict[str, DeviceProfile] = field(default_factory=dict)
    links: dict[str, LinkProfile] = field(default_factory=dict)

    def update(self, other: "Profiles") -> None:
        self.devices.update(other.devices)
        self.links.update(other.links)


# --- reading --------------------------------------------------------------------------

class _Reader:
    """Reads one table, recording sources and rejecting unknown keys."""

    def __init__(self, table: dict, where: str, sources: dict):
        if not isinstance(table, dict):
            raise ProfileError(f"{where} must be a table")
        self.table, self.where, self.sources, self.used = table, where, sources, set()

    def _get(self, key: str, required: bool):
        self.used.add(key)
        if key not in self.table:
            if required:
                raise ProfileError(f"{self.where}: missing required field {key!r}")
            return None
        return self.table[key]

    def text(self, key: str, required: bool = True, choices=None, default=None) -> str | None:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str) or not value:
            raise ProfileError(f"{self.where}.{key} must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise ProfileError(f"{self.where}.{key} must be one of {', '.join(choices)}, got {value!r}")
        return value

    def figure(self, key: str, kind: str, positive: bool = False, required: bool = True, path: str = "") -> float | None:
        value = self._get(key, required)
        if value is None:
            return None
        return _figure(value, kind, f"{self.where}.{key}", positive, self.sources, path or key)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ProfileError(f"{self.where}: unknown field(s) {', '.join(unknown)}")


def _figure(value, kind: str, where: str, positive: bool, sources: dict, path: str) -> float:
    if not isinstance(value, dict) or set(value) - {"value", "source"} or "value" not in value:
        raise ProfileError(f"{where} must be {{ value = ..., source = \"...\" }}, got {value!r}")
    source = value.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ProfileError(f"{where} needs a source (where the number comes from)")
    try:
        number = parse(value["value"], kind, where)
    except ValueError as exc:
        raise ProfileError(str(exc)) from None
    if positive and number <= 0:
        raise ProfileError(f"{where} must be > 0, got {value['value']!r}")
    if kind == "fraction" and number > 1:
        raise ProfileError(f"{where} is a fraction and must lie in (0, 1], got {value['value']!r}")
    sources[path] = source
    return number


def _device(table, where: str, path: str) -> DeviceProfile:
    sources: dict[str, str] = {}
    r = _Reader(table, where, sources)
    name = r.text("name")
    kind = r.text("kind", choices=KINDS)
    profile = DeviceProfile(
        name=name, title=r.text("title", required=False, default=name), kind=kind,
        launch=r.figure("launch", "time"), idle_power=r.figure("idle_power", "power"),
        active_power=r.figure("active_power", "power", positive=True),
        compute={}, memory=[], efficiency={},
        emulate_on=r.text("emulate_on", required=False, choices=("torch", "opencl", "host"),
                          default="opencl" if kind == "fpga" else "torch"),
        host_link=r.text("host_link", required=False), part=r.text("part", required=False, default=""),
        sources=sources, path=path, handoff=r.figure("handoff", "time", required=False) or 0.0)
    if profile.active_power < profile.idle_power:
        raise ProfileError(f"{where}: active_power ({profile.active_power:g} W) is below idle_power "
                           f"({profile.idle_power:g} W)")
    compute = _Reader(r._get("compute", True), f"{where}.compute", sources)
    for dtype in compute.table:
        if dtype not in DTYPES:
            raise ProfileError(f"{where}.compute: unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
        profile.compute[dtype] = compute.figure(dtype, "flops", positive=True, path=f"compute.{dtype}")
    if not profile.compute:
        raise ProfileError(f"{where}.compute must give at least one dtype's peak")
    levels = r._get("memory", True)
    if not isinstance(levels, list) or not levels:
        raise ProfileError(f"{where}.memory must be a list of levels ([[device.memory]]), fastest first")
    for i, level in enumerate(levels):
        lr = _Reader(level, f"{where}.memory[{i}]", sources)
        lname = lr.text("name")
        profile.memory.append(MemoryLevel(
            lname, lr.figure("capacity", "bytes", positive=True, path=f"memory.{lname}.capacity"),
            lr.figure("bandwidth", "bandwidth", positive=True, path=f"memory.{lname}.bandwidth"),
            lr.figure("latency", "time", path=f"memory.{lname}.latency")))
        lr.finish()
    capacities = [level.capacity for level in profile.memory]
    if capacities != sorted(capacities):
        raise ProfileError(f"{where}.memory must list levels fastest (smallest) first, got "
                           + ", ".join(f"{lv.name} {lv.capacity:.3g} B" for lv in profile.memory))
    eff = _Reader(r._get("efficiency", True), f"{where}.efficiency", sources)
    for pattern in PATTERNS:
        profile.efficiency[pattern] = eff.figure(pattern, "fraction", positive=True, path=f"efficiency.{pattern}")
    eff.finish()
    ops = r._get("ops", False)
    ops = {} if ops is None else ops  # not `or {}`: ops = 0 / "" / [] / false are errors, not "no ops"
    if not isinstance(ops, dict):
        raise ProfileError(f"{where}.ops must be a table of calibrated operations")
    for op, fit in ops.items():
        fr = _Reader(fit, f"{where}.ops.{op!r}", sources)
        profile.ops[op] = OpFit(fr.figure("overhead", "time", path=f"ops.{op}.overhead"),
                                fr.figure("efficiency", "fraction", positive=True, path=f"ops.{op}.efficiency"))
        fr.finish()
    r.finish()
    return profile


def _link(table, where: str, path: str) -> LinkProfile:
    sources: dict[str, str] = {}
    r = _Reader(table, where, sources)
    link = LinkProfile(
        name=r.text("name"), kind=r.text("kind", choices=LINK_KINDS),
        bandwidth=r.figure("bandwidth", "bandwidth", positive=True), latency=r.figure("latency", "time"),
        energy_per_byte=r.figure("energy_per_byte", "energy_per_byte"), sources=sources, path=path)
    between = r._get("between", False)
    if between is not None:
        if not (isinstance(between, list) and len(between) == 2 and all(isinstance(b, str) for b in between)):
            raise ProfileError(f"{where}.between must name two devices, got {between!r}")
        link.between = tuple(between)
    r.finish()
    return link


def loads(text: str, path: str = "<string>") -> Profiles:
    """Profiles from TOML text; ProfileError names the file and field at fault."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: e.g. an integer of 5,000 digits
        raise ProfileError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(data) - {"device", "link"})
    if unknown:
        raise ProfileError(f"{path}: unknown top-level table(s) {', '.join(unknown)}; use [[device]] and [[link]]")
    for key in ("device", "link"):
        if not isinstance(data.get(key, []), list):
            raise ProfileError(f"{path}: {key} must be an array of tables ([[{key}]]), got {data[key]!r}")
    out = Profiles()
    for i, table in enumerate(data.get("device", [])):
        dev = _device(table, f"{path}: device[{i}]", path)
        out.devices[dev.name] = dev
    for i, table in enumerate(data.get("link", [])):
        link = _link(table, f"{path}: link[{i}]", path)
        out.links[link.name] = link
    for dev in out.devices.values():
        if dev.host_link and dev.host_link not in out.links and dev.host_link not in _registry().links:
            raise ProfileError(f"{path}: device {dev.name!r} names host_link {dev.host_link!r}, which no profile "
                               f"defines")
    return out


def load(path: str | os.PathLike) -> Profiles:
    path = Path(path)
    if not path.is_file():
        raise ProfileError(f"no profile file at {path}")
    return loads(path.read_text(), str(path))


_loaded: Profiles | None = None


def _registry() -> Profiles:
    global _loaded
    if _loaded is None:
        _loaded = Profiles()
        files = sorted(SHIPPED_DIR.glob("*.toml"), key=lambda p: (not p.stem.startswith("link"), p.name))
        for extra in os.environ.get("HETERO_PROFILES", "").split(os.pathsep):
            if extra:
                files.extend(sorted(Path(extra).glob("*.toml")) if Path(extra).is_dir() else [Path(extra)])
        if MACHINE_PROFILE.is_file():
            files.append(MACHINE_PROFILE)
        for f in files:
            _loaded.update(load(f))
    return _loaded


def add_profiles(path: str | os.PathLike) -> Profiles:
    """Load a user profile file (or every *.toml in a folder) into the registry; returns what it held."""
    path = Path(path)
    added = Profiles()
    for f in sorted(path.glob("*.toml")) if path.is_dir() else [path]:
        added.update(load(f))
    _registry().update(added)
    return added


def device_profile(name: str) -> DeviceProfile:
    reg = _registry()
    if name not in reg.devices:
        raise ProfileError(f"no device profile {name!r}; known: {', '.join(sorted(reg.devices))} "
                           f"(add your own with hetero.cost.add_profiles(path); `hetero calibrate` profiles this machine)")
    return reg.devices[name]


def link_profile(name: str) -> LinkProfile:
    reg = _registry()
    if name not in reg.links:
        raise ProfileError(f"no link profile {name!r}; known: {', '.join(sorted(reg.links))}")
    return reg.links[name]


def known_profiles() -> Profiles:
    """Every profile known: shipped, HETERO_PROFILES, this machine's calibration, added ones."""
    return _registry()


def reload() -> None:
    """Forget loaded profiles (e.g. after `hetero calibrate` wrote a new machine profile)."""
    global _loaded
    _loaded = None
    from ..devices import modeled_device

    modeled_device.cache_clear()  # model:<profile> devices are built from the profiles just forgotten


# --- writing (calibration) ------------------------------------------------------------

def _fig(value: float, kind: str, source: str) -> str:
    return f'{{ value = "{format_value(value, kind)}", source = {_quote(source)} }}'


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def dumps(devices: list[DeviceProfile], links: list[LinkProfile]) -> str:
    """TOML text for profiles, readable back with `loads` (used by `hetero calibrate`)."""
    out: list[str] = []
    for d in devices:
        src = d.sources
        out += ["[[device]]", f"name = {_quote(d.name)}", f"title = {_quote(d.title)}", f"kind = {_quote(d.kind)}",
                f"emulate_on = {_quote(d.emulate_on)}"]
        if d.host_link:
            out.append(f"host_link = {_quote(d.host_link)}")
        if d.part:
            out.append(f"part = {_quote(d.part)}")
        if "handoff" in src:
            out.append(f"handoff = {_fig(d.handoff, 'time', src['handoff'])}")
        out += [f"launch = {_fig(d.launch, 'time', src.get('launch', '?'))}",
                f"idle_power = {_fig(d.idle_power, 'power', src.get('idle_power', '?'))}",
                f"active_power = {_fig(d.active_power, 'power', src.get('active_power', '?'))}",
                "compute = { " + ", ".join(f"{k} = {_fig(v, 'flops', src.get(f'compute.{k}', '?'))}"
                                           for k, v in d.compute.items()) + " }",
                "efficiency = { " + ", ".join(f"{k} = {_fig(v, 'fraction', src.get(f'efficiency.{k}', '?'))}"
                                              for k, v in d.efficiency.items()) + " }"]
        for level in d.memory:
            p = f"memory.{level.name}"
            out += ["[[device.memory]]", f"name = {_quote(level.name)}",
                    f"capacity = {_fig(level.capacity, 'bytes', src.get(p + '.capacity', '?'))}",
                    f"bandwidth = {_fig(level.bandwidth, 'bandwidth', src.get(p + '.bandwidth', '?'))}",
                    f"latency = {_fig(level.latency, 'time', src.get(p + '.latency', '?'))}"]
        for op, fit in d.ops.items():
            out += [f"[device.ops.{_quote(op)}]",
                    f"overhead = {_fig(fit.overhead, 'time', src.get(f'ops.{op}.overhead', '?'))}",
                    f"efficiency = {_fig(fit.efficiency, 'fraction', src.get(f'ops.{op}.efficiency', '?'))}"]
        out.append("")
    for link in links:
        src = link.sources
        out += ["[[link]]", f"name = {_quote(link.name)}", f"kind = {_quote(link.kind)}",
                f"bandwidth = {_fig(link.bandwidth, 'bandwidth', src.get('bandwidth', '?'))}",
                f"latency = {_fig(link.latency, 'time', src.get('latency', '?'))}",
                f"energy_per_byte = {_fig(link.energy_per_byte, 'energy_per_byte', src.get('energy_per_byte', '?'))}"]
        if link.between:
            out.append(f"between = [{_quote(link.between[0])}, {_quote(link.between[1])}]")
        out.append("")
    return "\n".join(out)
