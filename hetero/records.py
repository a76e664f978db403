"""What a pipeline call did: one record per step execution and per device crossing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Timing:
    """When a call or transfer ran. `source` names the clock: 'opencl-event' and
    'cuda-event' are device timestamps, 'host-clock' is perf_counter around a synchronous
    call, 'modeled' is the cost model's time for a step on a modeled device. Device
    timestamps are resolved lazily, so recording costs nothing on the hot path."""

    source: str
    wall_s: float
    host_start_ns: int
    # -> (start_ns, end_ns) of the device's work, mapped onto the host perf_counter_ns clock
    _resolve: Callable[[], tuple[int, int]] | None = field(default=None, repr=False)
    _device_s: float | None = field(default=None, repr=False)
    _span: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def seconds(self) -> float:
        """Device time where the backend has timestamps, else the host-measured time."""
        if self._device_s is None:
            start, end = self.span()
            self._device_s = (end - start) / 1e9
        return self._device_s

    def span(self) -> tuple[int, int]:
        """(start, end) in perf_counter nanoseconds, the one clock every record shares: the
        device's own timestamps where it has them, else the host's around the call. A modeled
        time starts where the emulated call started."""
        if self._span is None:
            if self._resolve is not None:
                self._span = self._resolve()
            else:
                seconds = self.wall_s if self._device_s is None else self._device_s
                self._span = (self.host_start_ns, self.host_start_ns + round(seconds * 1e9))
        return self._span


@dataclass
class StepRecord:
    step: str  # prepare / relevancy / retrieval / apply, or "relevancy+retrieval" when fused
    op: str  # the implementation's operation name
    device: str
    timing: Timing

    @property
    def seconds(self) -> float:
        return self.timing.seconds


@dataclass
class TransferRecord:
    what: str
    src: str
    dst: str
    nbytes: int
    timing: Timing
    feeds: int = -1  # index in RunRecord.steps of the step this value was moved for; -1: the call's output

    @property
    def seconds(self) -> float:
        return self.timing.seconds


# the paper's memory processing: the step names (as recorded) of relevancy and retrieval
MEMORY_STEPS = ("relevancy", "retrieval", "relevancy+retrieval")


@dataclass
class RunRecord:
    """Everything one `prepare`, `append` or `step` call did, in order."""

    call: str
    steps: list[StepRecord] = field(default_factory=list)
    transfers: list[TransferRecord] = field(default_factory=list)
    wall_s: float = 0.0
    start_ns: int = 0  # perf_counter_ns when the call began
    artifacts: dict = field(default_factory=dict, repr=False)

    @property
    def step_seconds(self) -> float:
        return sum(r.seconds for r in self.steps)

    @property
    def transfer_seconds(self) -> float:
        return sum(t.seconds for t in self.transfers)

    @property
    def transfer_bytes(self) -> int:
        return sum(t.nbytes for t in self.transfers)

    @property
    def memory_seconds(self) -> float:
        """Memory processing of this call: relevancy + retrieval time and the transfers
        that fed them (what the profile's memory share adds up over decode steps)."""
        memory = [i for i, s in enumerate(self.steps) if s.step in MEMORY_STEPS]
        return sum(self.steps[i].seconds for i in memory) + sum(t.seconds for t in self.transfers if t.feeds in memory)

    def by_step(self) -> dict[str, float]:
        """Seconds per step name (operations of one step summed)."""
        out: dict[str, float] = {}
        for r in self.steps:
            out[r.step] = out.get(r.step, 0.0) + r.seconds
        return out

    def artifact(self, name: str):
        """An intermediate result the method kept (e.g. "page_ids"), as a CPU torch tensor."""
        from .backends import backend_of_value

        value = self.artifacts[name]
        backend = backend_of_value(value)
        return backend.download(value)[0] if backend is not None else value

    def rows(self) -> list[dict]:
        """One dict per record, steps and transfers, for tables and JSON."""
        rows = [dict(kind="step", name=f"{r.step}:{r.op}", device=r.device, seconds=r.seconds,
                     nbytes=0, clock=r.timing.source) for r in self.steps]
        rows += [dict(kind="transfer", name=t.what, device=f"{t.src} -> {t.dst}", seconds=t.seconds,
                      nbytes=t.nbytes, clock=t.timing.source) for t in self.transfers]
        return rows
