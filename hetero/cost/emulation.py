"""Modeled devices at run time: a step placed on `model:<profile>` runs functionally on its
emulator, and its record's time comes from the cost model, with clock "modeled"."""

from __future__ import annotations

from ..records import Timing, TransferRecord
from ..runtime import STEPS


def _modeled(timing: Timing, seconds: float) -> Timing:
    return Timing("modeled", timing.wall_s, timing.host_start_ns, None, seconds)


def model_record(pipeline, record, call: str, args, result) -> None:
    """Replace the measured times of steps on modeled devices by the model's, and the
    transfers touching modeled devices by the model's transfers for this call."""
    from .model import evaluate
    from .placer import make_system

    method, placement = pipeline.method, pipeline.placement
    if call == "prepare":
        memory, query, appended, allocate = result, None, result.max_length, True
    elif call == "append":
        memory, query, appended, allocate = args[0], None, int(args[1].shape[2]), False
    else:
        memory, query, appended, allocate = args[1], args[0], 0, False
    from ..backends import torch_backend

    caller = torch_backend.id_of((args[0] if call == "step" else args[1 if call == "append" else 0]).device)
    system, devs = make_system([d.id for d in placement.devices], home=caller)
    assignment = {s: placement[s] for s in STEPS}
    work = method.workload(method.shapes_of(memory, query), {s: d.backend for s, d in assignment.items()},
                           method.fused(assignment), appended=appended, query=query is not None, allocate=allocate)
    estimate = evaluate(method, work, {s: d.id for s, d in assignment.items()}, system)
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
    added = [TransferRecord(x.what, x.src, x.dst, int(x.nbytes), _modeled(template, x.seconds))
             for x in estimate.transfers if x.src in modeled or x.dst in modeled]
    record.transfers[:] = kept + added
