"""The cost model at run time: what a pipeline call should have cost (for the profiler's
predicted-vs-measured) and, for steps on modeled devices (`model:<profile>`), which run
functionally on an emulator, the times their records report, with clock "modeled"."""

from __future__ import annotations

from dataclasses import dataclass

from ..records import Timing, TransferRecord
from ..runtime import STEPS


@dataclass(frozen=True)
class CallShape:
    """What the cost model needs to know about one pipeline call."""

    call: str  # prepare / append / step
    shapes: dict
    appended: int  # tokens appended per sequence
    query: bool
    allocate: bool
    home: str  # the device the caller's tensors live on


def describe_call(method, call: str, args, result) -> CallShape:
    memory, query, appended, allocate, home = method.describe_call(call, args, result)
    return CallShape(call, method.shapes_of(memory, query), appended, query is not None, allocate, home)


def predict(method, placement, shape: CallShape):
    """The model's Estimate of one call at `placement`, with its System and devices."""
    from .model import evaluate
    from .placer import make_system

    system, devs = make_system([d.id for d in placement.devices], home=shape.home)
    assignment = {s: placement[s] for s in STEPS}
    work = method.workload(shape.shapes, {s: d.backend for s, d in assignment.items()}, method.fused(assignment),
                           appended=shape.appended, query=shape.query, allocate=shape.allocate)
    return evaluate(method, work, {s: d.id for s, d in assignment.items()}, system), system, devs


def _modeled(timing: Timing, seconds: float) -> Timing:
    return Timing("modeled", timing.wall_s, timing.host_start_ns, None, seconds)


def model_record(pipeline, record, call: str, args, result) -> None:
    """Replace the measured times of steps on modeled devices by the model's, and the
    transfers touching modeled devices by the model's transfers for this call."""
    estimate, system, devs = predict(pipeline.method, pipeline.placement,
                                     describe_call(pipeline.method, call, args, result))
    predicted: dict[tuple[str, str], list[float]] = {}
    for t in estimate.tasks:
        predicted.setdefault((t.device, t.task.op), []).append(t.seconds)
    for r in record.steps:
        if devs[r.device].info.get("modeled"):
            queue = predicted.get((r.device, r.op))
            # an operation the workload does not list (e.g. growing the memory) costs one launch
            seconds = queue.pop(0) if queue else system.nodes[r.device].profile.launch
            r.timing = _modeled(r.timing, seconds)
    modeled = {d for d, dev in devs.items() if dev.info.get("modeled")}
    kept = [t for t in record.transfers if t.src not in modeled and t.dst not in modeled]
    template = record.steps[0].timing if record.steps else Timing("modeled", 0.0, 0)

    def feeds(value: str, device: str) -> int:  # the first step record on `device` whose task reads `value`
        ops = {t.task.op for t in estimate.tasks if t.device == device and value in t.task.reads}
        return next((i for i, r in enumerate(record.steps) if r.device == device and r.op in ops), -1)

    added = [TransferRecord(x.what, x.src, x.dst, int(x.nbytes), _modeled(template, x.seconds), feeds(x.what, x.dst))
             for x in estimate.transfers if x.src in modeled or x.dst in modeled]
    record.transfers[:] = kept + added
