"""torch backend: `torch:cpu` always, `torch:cuda:N` per visible GPU.

Values are torch tensors. CUDA calls are timed with CUDA events (device timestamps);
CPU calls are synchronous and timed with the host clock.
"""

from __future__ import annotations

import statistics
import time

import torch

from ..devices import Device
from ..records import Timing

NAME = "torch"


def discover() -> list[Device]:
    found = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(Device(f"torch:cuda:{i}", "gpu", NAME, props.name, torch.device("cuda", i),
                                {"memory_bytes": props.total_memory}))
    found.append(Device("torch:cpu", "cpu", NAME, "torch CPU", torch.device("cpu"),
                        {"threads": torch.get_num_threads()}))
    return found


def holds(value) -> bool:
    return isinstance(value, torch.Tensor)


def device_id(value: torch.Tensor) -> str:
    return id_of(value.device)


def resides_on(value: torch.Tensor, device: Device) -> bool:
    return device.backend == NAME and value.device == device.handle


def id_of(device: torch.device) -> str:
    if device.type == "cuda":
        return f"torch:cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return f"torch:{device.type}"


def upload(tensor: torch.Tensor, device: Device):
    """Move a torch tensor onto `device`; returns (tensor, Timing)."""
    start = time.perf_counter_ns()
    out = tensor.to(device.handle)
    _sync(device.handle, tensor.device)
    end = time.perf_counter_ns()
    return out, Timing("host-clock", (end - start) / 1e9, start)


def download(value: torch.Tensor):
    """To a CPU tensor; returns (tensor, Timing)."""
    start = time.perf_counter_ns()
    out = value.cpu()
    end = time.perf_counter_ns()
    return out, Timing("host-clock", (end - start) / 1e9, start)


def nbytes(value: torch.Tensor) -> int:
    return value.numel() * value.element_size()


def call(device: Device, fn, args):
    """Run fn(device, *args); returns (result, Timing)."""
    if device.kind == "gpu":
        ref, ref_ns = _clock_reference(device.handle)
        begin = torch.cuda.Event(enable_timing=True)
        end_evt = torch.cuda.Event(enable_timing=True)
        host_start = time.perf_counter_ns()
        begin.record()
        result = fn(device, *args)
        end_evt.record()
        wall = (time.perf_counter_ns() - host_start) / 1e9

        def resolve() -> tuple[int, int]:
            end_evt.synchronize()
            return ref_ns + round(ref.elapsed_time(begin) * 1e6), ref_ns + round(ref.elapsed_time(end_evt) * 1e6)

        return result, Timing("cuda-event", wall, host_start, resolve)
    start = time.perf_counter_ns()
    result = fn(device, *args)
    end = time.perf_counter_ns()
    return result, Timing("host-clock", (end - start) / 1e9, start)


_references: dict[int, tuple] = {}  # CUDA device index -> (event, its host time in perf_counter_ns)
REFERENCE_MAX_AGE_NS = 60 * 10**9  # elapsed_time is float milliseconds: re-anchor before precision fades


def _clock_reference(handle: torch.device):
    """A CUDA event recorded on an idle device at a known host time: a step's events are timed
    against it, which puts them on the host clock. Made once (one synchronize) and renewed
    after a minute or by `sync_clocks()`."""
    index = handle.index if handle.index is not None else torch.cuda.current_device()
    ref = _references.get(index)
    if ref is None or time.perf_counter_ns() - ref[1] > REFERENCE_MAX_AGE_NS:
        with torch.cuda.device(index):
            torch.cuda.synchronize()
            event = torch.cuda.Event(enable_timing=True)
            before = time.perf_counter_ns()
            event.record()
            event.synchronize()
            ref = _references[index] = (event, (before + time.perf_counter_ns()) // 2)
    return ref


def sync_clocks() -> None:
    """Re-anchor the CUDA clock references (a profile does this as it starts)."""
    _references.clear()


def copy_bandwidth(device: Device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s, read + write counted (median of `repeats`)."""
    src = torch.zeros(nbytes // 4, dtype=torch.float32, device=device.handle)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device.handle)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device.handle)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[1:])  # the first copy is a warm-up


def _sync(*devices: torch.device) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)
