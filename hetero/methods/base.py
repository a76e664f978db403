"""What every method shares: its implementations per backend and what each step needs."""

from __future__ import annotations

from ..devices import Device
from ..runtime import Step


class Method:
    """A long-context technique described as its four steps.

    Subclasses set `name`, `memory_type`, `needs` (for each step, the operations a backend
    implementation must have to run that step) and register one implementation object per
    backend in `implementations`; they write the flows `prepare(run, ...)`,
    `append(run, memory, ...)` and `step(run, query, memory)` in terms of `run.run(step, op, ...)`.
    """

    name = "method"
    memory_type: type = object
    needs: dict[Step, tuple[str, ...]] = {}
    # adjacent steps with a fused operation, used when both sit on one device that has it
    fusions: dict[tuple[Step, Step], str] = {}

    def __init__(self):
        self.implementations: dict[str, object] = {}

    def impl(self, backend: str):
        return self.implementations[backend]

    def fused(self, assignment) -> bool:
        """Whether a placement (step -> Device) runs a fused operation, as `Run.fused` decides."""
        return any(assignment[a] == assignment[b] and hasattr(self.implementations.get(assignment[a].backend), op)
                   for (a, b), op in self.fusions.items())

    def why_not(self, step: Step, device: Device) -> list[str]:
        """Reasons `step` cannot run on `device` (empty when it can)."""
        impl = self.implementations.get(device.backend)
        if impl is None:
            return [f"{self.name} has no {device.backend} implementation (it has {sorted(self.implementations)})"]
        missing = [op for op in self.needs.get(step, ()) if not hasattr(impl, op)]
        return [f"the {device.backend} implementation lacks {', '.join(missing)}"] if missing else []
