"""`with hetero.profile() as prof:`: every pipeline call inside the block, on one clock.

Each pipeline call already keeps a RunRecord (its steps and transfers, timed by the
backends: OpenCL profiling events, CUDA events, or the host clock). A profile collects those
records while it is open, maps device timestamps onto the host's perf_counter clock, and
turns them into a timeline (`events()`, `export_trace()` for Perfetto), a report
(`summary()`) and a JSON of every figure (`save_json()`). With no profile open, a pipeline
call pays one check of an empty list.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import runtime
from ..records import MEMORY_STEPS, RunRecord, Timing  # noqa: F401  (MEMORY_STEPS re-exported)



@dataclass
class Call:
    """One pipeline call seen by a profile."""

    index: int
    pipeline: str  # "p0", "p1", ... in order of first appearance
    label: str  # the pipeline's method and placement
    pipe: object = field(repr=False)  # the Pipeline: its method and placement, for the model
    record: RunRecord = field(repr=False)
    shape: object = field(default=None, repr=False)  # cost.emulation.CallShape, None if the method has no model


@dataclass
class Event:
    """One slice of the timeline, on the host perf_counter clock (ns)."""

    kind: str  # "call", "step" or "transfer"
    track: str  # the pipeline (calls), the device id (steps) or "src -> dst" (transfers)
    name: str
    start_ns: int
    end_ns: int
    clock: str  # Timing.source: opencl-event / cuda-event / host-clock / modeled
    call: int  # Call.index
    args: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


class Profile:
    """What `hetero.profile()` returns; see the module docstring.

    meters: read the energy counters present (NVML, RAPL) at the block's start and end.
    """

    def __init__(self, meters: bool = True):
        self.calls: list[Call] = []
        self.start_ns = self.end_ns = 0
        self._use_meters = bool(meters)
        self.meters: list = []  # energy.Meter, absent ones included (they say why)
        self.meter_joules: dict[str, float] = {}  # meter name -> joules over the block
        self._pipes: dict[int, tuple[str, object, str]] = {}  # id -> (name, pipeline, label)
        self._shapes: dict[tuple, tuple] = {}  # decode-step shapes, see _shape
        self._readings: dict[str, float] = {}
        self._open = False

    # --- the block ------------------------------------------------------------------------

    def __enter__(self) -> "Profile":
        if self._open or self.calls:
            raise RuntimeError("a Profile records one block; open a new hetero.profile() for another")
        _sync_device_clocks()
        if self._use_meters:
            from .energy import energy_meters

            self.meters = energy_meters()
            self._readings = {m.name: m.read_j() for m in self.meters if m.available}
        self._open = True
        self.start_ns = time.perf_counter_ns()
        runtime.PROFILERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        self.end_ns = time.perf_counter_ns()
        runtime.PROFILERS.remove(self)
        self._open = False
        for m in self.meters:
            if m.name in self._readings:
                self.meter_joules[m.name] = m.read_j() - self._readings[m.name]

    @property
    def window_s(self) -> float:
        """Seconds the block was open (so far, while it is)."""
        end = self.end_ns if not self._open else time.perf_counter_ns()
        return max(end - self.start_ns, 0) / 1e9

    def collect(self, pipe, record: RunRecord, args, result) -> None:
        """Called by the runtime after each pipeline call while this profile is open."""
        known = self._pipes.get(id(pipe))
        if known is None or known[1] is not pipe:  # holding `pipe` keeps its id from being reused
            known = self._pipes[id(pipe)] = (f"p{len(self._pipes)}", pipe, f"{pipe.method.name} {pipe.placement!r}")
        name, _, label = known
        # the artifacts (intermediate device values) are left to pipe.last_run, not kept here
        kept = RunRecord(record.call, record.steps, record.transfers, record.wall_s, record.start_ns)
        self.calls.append(Call(len(self.calls), name, label, pipe, kept, self._shape(pipe, record.call, args, result)))

    def _shape(self, pipe, call: str, args, result):
        """The call's shapes for the cost model. A decode step's are those of the last one with
        the same memory and query layout, until an append changes the memory (this keeps a
        profiled step's added time to a few microseconds)."""
        if not hasattr(pipe.method, "workload"):
            return None
        from ..cost.emulation import describe_call

        if call != "step":
            memory = result if call == "prepare" else args[0]
            self._shapes = {k: v for k, v in self._shapes.items() if k[1] != id(memory)}
            return describe_call(pipe.method, call, args, result)
        query, memory = args[0], args[1]
        layout = (tuple(query.shape), query.dtype, query.device) if hasattr(query, "shape") else (
            type(query).__name__, len(query) if hasattr(query, "__len__") else None)
        key = (id(pipe), id(memory), *layout)
        shape = self._shapes.get(key)
        if shape is None or shape[0] is not memory:
            shape = self._shapes[key] = (memory, describe_call(pipe.method, call, args, result))
        return shape[1]

    # --- the timeline -----------------------------------------------------------------------

    def events(self) -> list[Event]:
        """Calls, steps and transfers as timeline slices. A modeled step or transfer (no real
        timestamps) is laid out where its emulated call began, after its track's last slice."""
        out: list[Event] = []
        track_end: dict[str, int] = {}

        def place(kind, track, name, timing: Timing, call: Call, args) -> None:
            start, end = timing.span()
            if timing.source == "modeled":
                start, end = _after(track_end.get(track, start), start, end)
            track_end[track] = max(track_end.get(track, end), end)
            out.append(Event(kind, track, name, start, end, timing.source, call.index, args))

        for c in self.calls:
            r = c.record
            out.append(Event("call", f"{c.pipeline}: {c.label}", r.call, r.start_ns,
                             r.start_ns + round(r.wall_s * 1e9), "host-clock", c.index, {"pipeline": c.pipeline}))
            for i, s in enumerate(r.steps):
                place("step", s.device, s.step, s.timing, c, {"op": s.op, "call": r.call, "pipeline": c.pipeline,
                                                               "index": i})
            for t in r.transfers:
                feeds = r.steps[t.feeds].step if 0 <= t.feeds < len(r.steps) else "output"
                place("transfer", f"{t.src} -> {t.dst}", t.what, t.timing, c,
                      {"bytes": t.nbytes, "feeds": feeds, "call": r.call, "pipeline": c.pipeline})
        return out

    def export_trace(self, path) -> Path:
        """Chrome trace-event JSON (opens in Perfetto and chrome://tracing): a process for the
        pipeline calls, one for devices (a track each) and one for transfers (a track per
        link direction). Times are microseconds since the profile opened."""
        from .trace import chrome_trace

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(chrome_trace(self), indent=None))
        return path

    # --- reports ----------------------------------------------------------------------------

    def summary(self):
        """Per-step and per-device totals, the memory-processing share, energy (every figure
        with its source) and, where a model exists, predicted vs measured (a `Summary`)."""
        from .report import summarize

        return summarize(self)

    def to_dict(self) -> dict:
        """Every figure: the summary and each timeline slice."""
        return {"summary": self.summary().to_dict(),
                "events": [{**dataclasses.asdict(e), "start_s": (e.start_ns - self.start_ns) / 1e9,
                            "seconds": e.seconds} for e in self.events()]}

    def save_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return path

    def __repr__(self) -> str:
        state = "open" if self._open else f"{self.window_s:.3g} s"
        return f"Profile({len(self.calls)} calls, {state})"


def profile(meters: bool = True) -> Profile:
    """Collect every pipeline call made inside the block:

        with hetero.profile() as prof:
            out = pipe.step(query, memory)
        print(prof.summary())
        prof.export_trace("trace.json")      # open in https://ui.perfetto.dev
    """
    return Profile(meters=meters)


def _after(track_end: int, start: int, end: int) -> tuple[int, int]:
    shift = max(track_end - start, 0)
    return start + shift, end + shift


def _sync_device_clocks() -> None:
    """Re-map device clocks onto the host's as a profile opens (clocks drift apart)."""
    from ..backends import opencl, torch_backend

    opencl.sync_clocks()  # only queues already open: a new queue syncs as it is made
    torch_backend.sync_clocks()
