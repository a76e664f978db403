"""Energy meters behind one interface: NVML for NVIDIA GPUs, RAPL (Linux powercap) for the CPU.

    meters = energy_meters()                 # every kind this machine could have, absent ones too
    for m in meters:
        print(m)                             # NvmlMeter('nvml', absent: pynvml is not installed ...)
    meter = meter_for("torch:cpu", meters)   # the available meter covering a device, or None
    reading = measure_energy(lambda: pipe.step(q, memory), meter)
    reading.joules_per_call, reading.watts, reading.note

Every figure carries its source ("measured") and the meter it came from. An absent meter says
why in `why_absent` and raises MeterAbsent when read: it never reads as zero.

What the counters measure: the whole domain (a GPU board, a CPU package), so a per-call figure
is "energy the device drew while running this step", idle/static power and any other work on
the device included, not the step's marginal energy. RAPL's package domain excludes DRAM.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

POWERCAP_ROOT = "/sys/class/powercap"

# NVML does not document how often the total-energy counter updates; it moves every few tens of
# ms on recent GPUs. 0.1 s is the conservative figure: measure_energy's window is 20x this.
NVML_UPDATE_PERIOD_S = 0.1
# RAPL energy counters update about every millisecond (Intel SDM; AMD's are similar).
RAPL_UPDATE_PERIOD_S = 0.001


class MeterAbsent(RuntimeError):
    """Read an energy meter that is not present here; the message says why."""


class Meter:
    """A cumulative energy counter covering some hetero device ids.

    Subclasses set `why_absent` (empty when the counter works) and implement `_read_j`."""

    source = "measured"

    def __init__(self, name: str, covers: Iterable[str] = (), update_period_s: float = 0.0,
                 why_absent: str = "") -> None:
        self.name = name
        self.covers: tuple[str, ...] = tuple(covers)
        self.update_period_s = update_period_s
        self.why_absent = why_absent

    @property
    def available(self) -> bool:
        return not self.why_absent

    def read_j(self) -> float:
        """Joules since an arbitrary origin (fixed for this meter). Raises MeterAbsent."""
        if not self.available:
            raise MeterAbsent(f"{self.name}: {self.why_absent}")
        return self._read_j()

    def _read_j(self) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        state = "available" if self.available else f"absent: {self.why_absent}"
        return (f"{type(self).__name__}({self.name!r}, covers={list(self.covers)}, {state}, "
                f"updates every {self.update_period_s:g} s)")


# ---------------------------------------------------------------------------------------- NVML

_nvml_init_problem: dict[Any, str] = {}  # pynvml module -> "" or why nvmlInit failed


def _nvml_init(pynvml: Any) -> str:
    """nvmlInit once per process (keyed by module, so a test's fake module gets its own try)."""
    key = pynvml
    if key not in _nvml_init_problem:
        try:
            pynvml.nvmlInit()
            _nvml_init_problem[key] = ""
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
            _nvml_init_problem[key] = f"nvmlInit failed ({exc}): no NVIDIA driver on this machine?"
    return _nvml_init_problem[key]


def _plain_uuid(uuid: Any) -> str:
    """'GPU-6d4f...' (NVML, str or bytes) and '6d4f...' (torch) -> '6d4f...'."""
    text = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
    text = text.strip().lower()
    for prefix in ("gpu-", "mig-"):
        text = text.removeprefix(prefix)
    return text


def _torch_cuda_problem(cuda_index: int) -> str:
    """Why torch:cuda:<cuda_index> is not there ("" when it is)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed, so there is no torch:cuda device"
    if getattr(torch.version, "hip", None):
        return "torch's CUDA devices are AMD GPUs (ROCm build); NVML covers NVIDIA GPUs only"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build: no torch:cuda device"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda_index >= count:
        return f"no torch:cuda:{cuda_index}: torch sees {count} CUDA device(s)"
    return ""


class NvmlMeter(Meter):
    """The GPU's total-energy counter through NVML (`pip install nvidia-ml-py`), Volta or newer."""

    def __init__(self, cuda_index: int) -> None:
        super().__init__(f"nvml:{cuda_index}", (f"torch:cuda:{cuda_index}",), NVML_UPDATE_PERIOD_S)
        self.cuda_index = cuda_index
        self._nvml: Any = None
        self._handle: Any = None
        self.why_absent = self._open()

    def _open(self) -> str:
        try:
            import pynvml
        except ImportError:
            return "pynvml is not installed: pip install nvidia-ml-py"
        problem = _nvml_init(pynvml) or _torch_cuda_problem(self.cuda_index)
        if problem:
            return problem
        try:
            handle = self._match_handle(pynvml)
        except Exception as exc:
            return f"cannot find torch:cuda:{self.cuda_index} in NVML: {exc}"
        if handle is None:
            return (f"torch:cuda:{self.cuda_index}'s UUID matches no NVML device "
                    "(a MIG instance? NVML's energy counter is per physical GPU)")
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as exc:
            if getattr(exc, "value", None) == getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", 3):
                return (f"torch:cuda:{self.cuda_index} has no total-energy counter "
                        "(NVML supports it on Volta and newer)")
            return f"nvmlDeviceGetTotalEnergyConsumption failed: {exc}"
        self._nvml, self._handle = pynvml, handle
        return ""

    def _match_handle(self, pynvml: Any) -> Any:
        """NVML's handle for torch:cuda:i. By UUID where torch exposes one, since NVML indexes
        in PCI order and ignores CUDA_VISIBLE_DEVICES; else by index (right when no
        CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER reorders devices). None: UUID unmatched."""
        import torch

        uuid = getattr(torch.cuda.get_device_properties(self.cuda_index), "uuid", None)
        if uuid is None:
            return pynvml.nvmlDeviceGetHandleByIndex(self.cuda_index)
        for j in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(j)
            if _plain_uuid(pynvml.nvmlDeviceGetUUID(handle)) == _plain_uuid(uuid):
                return handle
        return None

    def _read_j(self) -> float:
        # millijoules since the driver loaded, an unsigned 64-bit count: no wrap to handle
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0


# ---------------------------------------------------------------------------------------- RAPL

_RAPL_TOP_DOMAIN = re.compile(r"intel-rapl:(\d+)")  # intel-rapl:0:0 (core...) are sub-domains


def _cpu_side_ids() -> tuple[str, ...]:
    """Device ids whose work runs on the CPU packages: torch:cpu, host, OpenCL CPU devices."""
    ids = ["torch:cpu", "host"]
    try:
        from ..devices import devices

        ids += [d.id for d in devices() if d.kind == "cpu" and not d.id.startswith("model:")]
    except Exception:  # discovery problems must not take the meter down
        pass
    return tuple(dict.fromkeys(ids))


class RaplMeter(Meter):
    """CPU package energy from Linux powercap (`.../intel-rapl:N`; AMD uses the same names).

    `domain_path` is one package directory or several: several are summed into one meter
    (covering every CPU-side device), since a CPU device's threads run on any socket."""

    def __init__(self, domain_path: str | os.PathLike | Sequence[str | os.PathLike],
                 covers: Iterable[str] | None = None) -> None:
        paths = ([Path(domain_path)] if isinstance(domain_path, (str, os.PathLike))
                 else [Path(p) for p in domain_path])
        found = paths and all(p.is_dir() for p in paths)
        name = "rapl:" + "+".join(self._domain_name(p) for p in paths) if found else "rapl"
        super().__init__(name, _cpu_side_ids() if covers is None else covers, RAPL_UPDATE_PERIOD_S)
        self._paths = paths
        self._max_uj: list[int] = []
        self._last_uj: list[int] = []
        self._total_uj = 0
        self.why_absent = self._open()

    @staticmethod
    def _domain_name(path: Path) -> str:
        try:
            return (path / "name").read_text().strip()  # "package-0"
        except OSError:
            return path.name

    def _open(self) -> str:
        if not self._paths:
            return "no powercap RAPL package domain found (a VM or non-Linux)"
        for path in self._paths:
            if not path.is_dir():
                return f"no powercap RAPL interface on this machine (a VM or non-Linux): {path} does not exist"
            try:
                self._last_uj.append(int((path / "energy_uj").read_text()))
            except PermissionError:
                return (f"{path / 'energy_uj'} is readable by root only; run as root or "
                        f"`chmod o+r` it")
            except (OSError, ValueError) as exc:
                return f"cannot read {path / 'energy_uj'}: {exc}"
            try:
                self._max_uj.append(int((path / "max_energy_range_uj").read_text()))
            except (OSError, ValueError) as exc:
                return f"cannot read {path / 'max_energy_range_uj'}: {exc}"
        return ""

    def _read_j(self) -> float:
        for i, path in enumerate(self._paths):
            raw = int((path / "energy_uj").read_text())
            delta = raw - self._last_uj[i]
            if delta < 0:  # wrapped past max_energy_range_uj (once: it takes minutes at full power)
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last_uj[i] = raw
        return self._total_uj / 1e6  # origin: when this meter was opened


def rapl_meter(root: str | os.PathLike = POWERCAP_ROOT, covers: Iterable[str] | None = None) -> RaplMeter:
    """One meter summing every RAPL package domain under `root` (absent, with why, if none)."""
    root = Path(root)
    packages: list[Path] = []
    try:
        for path in root.iterdir():
            match = _RAPL_TOP_DOMAIN.fullmatch(path.name)
            if match and RaplMeter._domain_name(path).startswith("package"):
                packages.append(path)
    except OSError:
        pass
    packages.sort(key=lambda p: int(p.name.split(":")[1]))
    # nothing found: point at the usual first package so the meter says what is missing
    return RaplMeter(packages or root / "intel-rapl:0", covers)


# -------------------------------------------------------------------------------- discovery

def energy_meters(device_ids: Iterable[Any] | None = None, *,
                  powercap_root: str | os.PathLike = POWERCAP_ROOT) -> list[Meter]:
    """Every meter kind this machine could have, absent ones included with their reasons.

    With `device_ids` (ids or hetero.Device), only meters covering any of them."""
    wanted = None if device_ids is None else {str(d) for d in device_ids}
    cuda = set()
    try:
        import torch

        if torch.cuda.is_available():
            cuda.update(range(torch.cuda.device_count()))
    except Exception:  # a broken torch install must not break the report
        pass
    for d in wanted or ():
        if re.fullmatch(r"torch:cuda:\d+", d):
            cuda.add(int(d.rsplit(":", 1)[1]))  # asked for: say why it has no meter
    meters: list[Meter] = [NvmlMeter(i) for i in sorted(cuda)]
    if not meters:
        meters.append(Meter("nvml", (), NVML_UPDATE_PERIOD_S, NvmlMeter(0).why_absent))
    meters.append(rapl_meter(powercap_root))
    if wanted is None:
        return meters
    return [m for m in meters if wanted.intersection(m.covers)]


def meter_for(device_id: Any, meters: Iterable[Meter]) -> Meter | None:
    """The first available meter whose counter includes `device_id` (an id or hetero.Device)."""
    return next((m for m in meters if m.available and str(device_id) in m.covers), None)


# ------------------------------------------------------------------------------ measurement

@dataclass
class EnergyReading:
    """Energy per call of a step, from a counter read around many repeated calls."""

    joules_per_call: float | None  # None when the counter did not advance (see note)
    seconds_per_call: float
    calls: int
    window_s: float  # time between the two counter reads
    source: str
    meter: str
    note: str

    @property
    def watts(self) -> float | None:
        if self.joules_per_call is None:
            return None
        return self.joules_per_call / self.seconds_per_call


def _read_after_update(meter: Meter) -> tuple[float, float]:
    """Counter value and time just after the counter next moves (waits at most two periods),
    so that the window starts and ends on counter updates, not up to a period off."""
    first = meter.read_j()
    deadline = perf_counter() + 2 * meter.update_period_s
    while True:
        value, now = meter.read_j(), perf_counter()
        if value != first or now >= deadline:
            return value, now


def measure_energy(fn: Callable[[], Any], meter: Meter, min_window_s: float = 1.0,
                   min_calls: int = 3, progress: Callable[[float], Any] | None = None) -> EnergyReading:
    """Joules per call of `fn()`, repeating it for a window long against the counter's update
    period: max(min_window_s, 20 x update period), and at least `min_calls` times.

    `fn` must return when its work is done (synchronize a GPU). Warm it up first: every call
    is counted. `progress(fraction)` is called now and then with the fraction done."""
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(min_window_s, bool) or not isinstance(min_window_s, (int, float)) \
            or not math.isfinite(min_window_s) or min_window_s <= 0:
        raise ValueError(f"min_window_s must be a finite number of seconds > 0, got {min_window_s!r}")
    if isinstance(min_calls, bool) or not isinstance(min_calls, int) or min_calls < 1:
        raise ValueError(f"min_calls must be an integer >= 1, got {min_calls!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {type(progress).__name__}")
    if not isinstance(meter, Meter):
        raise ValueError(f"meter must be a hetero energy Meter, got {type(meter).__name__}")
    if not meter.available:
        raise MeterAbsent(f"{meter.name}: {meter.why_absent}")

    window = max(float(min_window_s), 20 * meter.update_period_s)
    tick = window / 100  # progress updates: often enough for a bar, rare enough to cost nothing
    before, start = _read_after_update(meter)
    calls, next_tick = 0, start
    while True:
        fn()
        calls += 1
        now = perf_counter()
        elapsed = now - start
        if elapsed >= window and calls >= min_calls:
            break
        if progress is not None and now >= next_tick:
            progress(min(elapsed / window, calls / min_calls))
            next_tick = now + tick
    after, end = _read_after_update(meter)
    if progress is not None:
        progress(1.0)

    delta = after - before
    note = (f"{calls} calls in {elapsed:.3g} s; {meter.name} updates every "
            f"{meter.update_period_s:g} s, so counter steps blur about "
            f"{meter.update_period_s / (end - start):.1%} of the window; whole-domain energy: "
            f"idle power and other work on {meter.name} included")
    if delta <= 0:
        note = f"counter did not advance ({delta:+.6g} J) over the window; " + note
    return EnergyReading(joules_per_call=delta / calls if delta > 0 else None,
                         seconds_per_call=elapsed / calls, calls=calls, window_s=end - start,
                         source=meter.source, meter=meter.name, note=note)
