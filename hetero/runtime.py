"""The pipeline runtime: a method bound to a placement.

A method describes *what* its four steps compute and in which order (its `prepare`,
`append` and `step` flows call `Run.run(step, op, *args)`); the placement says *where* each
step runs; the backends say *how* values are stored, moved and timed. The runtime moves a
value only when the step that reads it is placed on another device, and records every step
execution and every crossing.
"""

from __future__ import annotations

import time
from enum import Enum
from typing import Mapping

import torch

from .backends import BACKENDS, backend_of_value, torch_backend
from .devices import Device, devices, get_device
from .records import RunRecord, StepRecord, TransferRecord


class Step(str, Enum):
    """The four memory-processing steps every long-context method shares."""

    PREPARE = "prepare"
    RELEVANCY = "relevancy"
    RETRIEVAL = "retrieval"
    APPLY = "apply"

    def __str__(self) -> str:
        return self.value


STEPS = tuple(Step)


class PlacementError(ValueError):
    """A placement that cannot run: unknown step, device absent, or no implementation."""


class Placement(Mapping):
    """Step -> Device, validated against what the method implements on each backend."""

    def __init__(self, assignment: dict[Step, Device]):
        self._by_step = {s: assignment[s] for s in STEPS}

    @classmethod
    def resolve(cls, method, placement) -> "Placement":
        if isinstance(placement, Placement):
            assignment = dict(placement._by_step)
        elif placement is None:
            cuda = [d for d in devices() if d.backend == "torch" and d.kind == "gpu"]
            target = cuda[0] if cuda else get_device("torch:cpu")
            assignment = {s: target for s in STEPS}
        elif placement == "auto":
            raise PlacementError("placement='auto' needs shapes: use Pipeline(method, placement='auto'), which places "
                                 "at prepare(), or hetero.place(method, shapes) and pass its .placement")
        elif isinstance(placement, (str, Device)):
            target = get_device(placement)
            assignment = {s: target for s in STEPS}
        elif isinstance(placement, Mapping):
            assignment = {}
            for key, dev in placement.items():
                try:
                    step = Step(str(key))
                except ValueError:
                    raise PlacementError(f"placement has unknown step {key!r}; steps are {[s.value for s in STEPS]}") from None
                assignment[step] = get_device(dev)
            missing = [s.value for s in STEPS if s not in assignment]
            if missing:
                raise PlacementError(f"placement is missing steps {missing}; give every step a device, "
                                     f"or one device id for all")
        else:
            raise PlacementError(f"placement must be a device id, a hetero.Device, a {{step: device}} dict or None; "
                                 f"got {type(placement).__name__}")
        reasons = [f"{s.value} on {d.id}: {r}" for s, d in assignment.items()
                   for r in method.why_not(s, d)]
        if reasons:
            raise PlacementError(f"{method.name} cannot run this placement:\n  " + "\n  ".join(reasons))
        return cls(assignment)

    def __getitem__(self, step) -> Device:
        return self._by_step[step if type(step) is Step else Step(step)]

    def __iter__(self):
        return iter(self._by_step)

    def __len__(self) -> int:
        return len(self._by_step)

    def __eq__(self, other) -> bool:
        return isinstance(other, Placement) and all(self[s].id == other[s].id for s in STEPS)

    def __hash__(self) -> int:
        return hash(tuple(self[s].id for s in STEPS))

    def dispatch(self, method) -> dict:
        """step -> (device, backend module, method implementation, step name)."""
        return {s: (d, BACKENDS[d.backend], method.impl(d.backend), s.value) for s, d in self._by_step.items()}

    @property
    def devices(self) -> list[Device]:
        """The distinct devices used, in step order."""
        seen: dict[str, Device] = {}
        for d in self._by_step.values():
            seen.setdefault(d.id, d)
        return list(seen.values())

    def __repr__(self) -> str:
        if len(self.devices) == 1:
            return f"Placement(all={self.devices[0].id})"
        return "Placement(" + ", ".join(f"{s.value}={d.id}" for s, d in self._by_step.items()) + ")"


_HOST_SCALARS = (int, float, bool, tuple, str, type(None))

# the `hetero.profile()` blocks open now; each sees every pipeline call made inside it
PROFILERS: list = []


class Run:
    """The context a method's flow runs in: executes ops on placed devices, moves values,
    and fills one RunRecord."""

    def __init__(self, method, placement: Placement, call: str, validate: bool = True, dispatch=None):
        self.method = method
        self.validate = validate  # False: skip NaN/Inf scans of per-step inputs
        self.placement = placement
        self.record = RunRecord(call)
        self._moved: dict[tuple[int, str], tuple] = {}
        self._made_on: dict[int, tuple] = {}  # id(result) -> (result, device id): a modeled device's values
        # per step: (device, backend module, implementation, name); a Pipeline passes its own
        self._dispatch = dispatch if dispatch is not None else placement.dispatch(method)

    def device(self, step: Step) -> Device:
        return self._dispatch[step][0]

    def fused(self, first: Step, second: Step, op: str) -> bool:
        """True when both steps sit on one device whose backend implements the fused op."""
        dev, _, impl, _ = self._dispatch[first]
        return dev is self._dispatch[second][0] and hasattr(impl, op)

    def run(self, step: Step, op: str, *args, label: str | None = None):
        """Run `op` of the implementation on `step`'s device; device values among `args` are
        moved there first. Returns the result, resident on that device."""
        dev, backend, impl, name = self._dispatch[step]
        args = [a if type(a) in _HOST_SCALARS else self.to(dev, a) for a in args]
        result, timing = backend.call(dev, getattr(impl, op), args)
        self.record.steps.append(StepRecord(label or name, op, dev.id, timing))
        if dev.info.get("modeled") and result is not None:
            self._made_on[id(result)] = (result, dev.id)
        return result

    def to(self, dev: Device, value, what: str = "", *, output: bool = False):
        """`value` resident on `dev`: unchanged if it is already there (or not a device value),
        else copied, through host memory when no direct path exists, each hop recorded (as
        feeding the step about to run, or as the call's `output`)."""
        src = torch_backend if isinstance(value, torch.Tensor) else backend_of_value(value)
        if src is None or src.resides_on(value, dev):
            return value
        key = (id(value), dev.id)
        if key in self._moved:  # e.g. the query, read by two steps on one device
            return self._moved[key][1]
        what = what or f"{tuple(value.shape)} {value.dtype}"
        moved = value
        made = self._made_on.get(id(value))
        if src is not torch_backend:  # device -> host
            src_id = made[1] if made else src.device_id(value)
            moved, timing = src.download(value)
            self._record(what, src_id, "torch:cpu", src, src.nbytes(value), timing, output)
        if not (dev.backend == "torch" and torch_backend.device_id(moved) == dev.id):  # host -> device
            dst = BACKENDS[dev.backend]
            from_id = made[1] if made and moved is value else torch_backend.device_id(moved)
            nbytes = torch_backend.nbytes(moved)
            moved, timing = dst.upload(moved, dev)
            self._record(what, from_id, dev.id, dst if from_id == "torch:cpu" else None, nbytes, timing, output)
        self._moved[key] = (value, moved)  # holding `value` keeps its id from being reused
        return moved

    def _record(self, what, src_id, dst_id, cpu_peer, nbytes, timing, output):
        if getattr(cpu_peer, "SHARES_CPU_MEMORY", False):
            nbytes = 0  # the host backend and torch:cpu view the same memory
        feeds = -1 if output else len(self.record.steps)  # moved for the step about to run
        self.record.transfers.append(TransferRecord(what, src_id, dst_id, nbytes, timing, feeds))

    def to_torch(self, value, device: torch.device):
        """Bring a result back to the caller's torch device."""
        if isinstance(value, torch.Tensor) and value.device == device:
            return value
        return self.to(get_device(torch_backend.id_of(device)), value, output=True)


class Pipeline:
    """A method bound to a placement.

    `validate=False` skips the NaN/Inf scans of each step's query and each append's new
    entries (shape, dtype and device checks always run; `prepare` always scans): on a
    2-core machine those scans are most of the runtime's per-step cost.

    >>> pipe = hetero.Pipeline(PageSparseAttention(), placement={"prepare": "torch:cpu",
    ...     "relevancy": "opencl:0:0", "retrieval": "opencl:0:0", "apply": "torch:cpu"})
    >>> memory = pipe.prepare(keys, values)
    >>> out = pipe.step(query, memory)
    >>> pipe.last_run.rows()
    """

    def __init__(self, method, placement=None, validate: bool = True, *, shapes: dict | None = None,
                 objective: str = "latency", devices=None, refine: int = 0):
        self.method = method
        self.validate = bool(validate)
        self.last_run: RunRecord | None = None
        self.plan = None  # the placer's Plan when placement="auto"
        self.placement: Placement | None = None
        self._auto = None
        if isinstance(placement, str) and placement == "auto":
            # placed at prepare(), when the memory's shapes are known; `shapes` adds what the
            # inputs do not tell (e.g. q_heads) or overrides them
            from .cost.placer import OBJECTIVES

            if objective not in OBJECTIVES:
                raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
            self._auto = dict(shapes=dict(shapes or {}), objective=objective, devices=devices, refine=refine)
        else:
            self._bind(Placement.resolve(method, placement))

    def _bind(self, placement: "Placement") -> None:
        self.placement = placement
        self._dispatch = placement.dispatch(self.method)
        self._modeled = any(d.info.get("modeled") for d in placement.devices)

    def __repr__(self) -> str:
        where = repr(self.placement) if self.placement is not None else "placement='auto' (chosen at prepare)"
        return f"Pipeline({self.method!r}, {where})"

    def _call(self, name: str, flow, *args, **kwargs):
        run = Run(self.method, self.placement, name, self.validate, self._dispatch)
        start = time.perf_counter_ns()
        result = flow(run, *args, **kwargs)
        run.record.start_ns, run.record.wall_s = start, (time.perf_counter_ns() - start) / 1e9
        if self._modeled:  # steps on modeled devices: time and energy from the cost model
            from .cost.emulation import model_record

            model_record(self, run.record, name, args, result)
        self.last_run = run.record
        if PROFILERS:  # the only cost of profiling when it is off
            for profiler in PROFILERS:
                profiler.collect(self, run.record, args, result)
        return result

    def prepare(self, *inputs, **options):
        """Build the memory (e.g. keys, values) and keep each part resident on the device of
        the step that reads it. With placement="auto", the placer chooses the placement here,
        from the shapes of the inputs (`pipe.plan.explain()` says why)."""
        if self._auto is not None:
            from .cost.placer import place

            auto = self._auto
            shapes = {**self.method.input_shapes(*inputs, **options), **auto["shapes"]}
            self.plan = place(self.method, shapes, auto["devices"], auto["objective"], refine=auto["refine"])
            self._bind(Placement.resolve(self.method, self.plan.placement))
        memory = self._call("prepare", self.method.prepare, *inputs, **options)
        memory.placement = self.placement
        return memory

    def append(self, memory, *inputs, **options):
        """Extend `memory` by new entries without rebuilding it. A failed append leaves the
        memory as it was."""
        self._check_memory(memory)
        return self._call("append", self.method.append, memory, *inputs, **options)

    def step(self, query, memory):
        """relevancy -> retrieval -> apply for one query; returns a tensor on the query's device."""
        self._check_memory(memory)
        return self._call("step", self.method.step, query, memory)

    def _check_memory(self, memory) -> None:
        if self.placement is None:
            raise ValueError("this pipeline chooses its placement at prepare(); call pipe.prepare(...) first")
        placement = getattr(memory, "placement", None)
        if placement is self.placement:
            return
        if placement is None or not isinstance(memory, self.method.memory_type):
            raise ValueError(f"memory must come from this pipeline's prepare(); got {type(memory).__name__}")
        if placement != self.placement:
            raise ValueError(f"memory was prepared for {placement!r}, but this pipeline runs {self.placement!r}; "
                             f"prepare it again with this pipeline")
