"""OpenCL backend: every device of every OpenCL platform, as `opencl:<platform>:<device>`.

Values are `pyopencl.array.Array`s. Each device gets one context and one in-order queue with
profiling on, so every kernel and copy carries device timestamps. Programs are built once per
(device, kernel file, defines) and cached. FPGAs cannot compile OpenCL C at run time: for them
(and for any device named in `use_binaries`) the program is loaded from a precompiled binary
(`.xclbin` for AMD/Xilinx, `.aocx` for Intel) found in the configured binary directory.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..devices import Device
from ..records import Timing
from . import host

try:  # the backend is optional: without pyopencl, hetero keeps working on torch
    import pyopencl as cl
    import pyopencl.array as cla
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    cl = None
    _IMPORT_ERROR = exc

NAME = "opencl"
BINARY_SUFFIXES = (".xclbin", ".aocx", ".bin")
_FPGA_VENDOR_HINTS = ("xilinx", "fpga", "altera", "intel(r) fpga")


@dataclass
class _DeviceState:
    context: "cl.Context"
    queue: "cl.CommandQueue"
    programs: dict = field(default_factory=dict)
    clock_offset_ns: int = 0  # host perf_counter_ns minus the device's profiling clock


_states: dict[str, _DeviceState] = {}
_ids_by_ptr: dict[int, str] = {}
_ids_by_queue: dict[int, str] = {}  # a modeled device has its own queue on its emulator's device
_binary_dir: Path | None = None
_binary_only: set[str] = set()


def discover() -> list[Device]:
    if cl is None:
        raise RuntimeError(f"pyopencl is not importable ({_IMPORT_ERROR}); `pip install pyopencl pocl-binary-distribution`")
    found = []
    try:
        platforms = cl.get_platforms()
    except cl.LogicError as exc:  # no ICD loader / no platform
        raise RuntimeError(f"no OpenCL platform ({exc}); `pip install pocl-binary-distribution` gives a CPU device") from exc
    for pi, platform in enumerate(platforms):
        for di, dev in enumerate(platform.get_devices()):
            dev_id = f"opencl:{pi}:{di}"
            _ids_by_ptr[dev.int_ptr] = dev_id
            info = {"platform": platform.name, "vendor": dev.vendor, "compute_units": dev.max_compute_units,
                    "global_memory_bytes": dev.global_mem_size, "local_memory_bytes": dev.local_mem_size,
                    "max_alloc_bytes": dev.max_mem_alloc_size, "version": dev.version}
            found.append(Device(dev_id, _kind(platform, dev), NAME, dev.name.strip(), dev, info))
    return found


def _kind(platform, dev) -> str:
    if dev.type & cl.device_type.GPU:
        return "gpu"
    if dev.type & cl.device_type.CPU:
        return "cpu"
    text = f"{platform.name} {platform.vendor} {dev.vendor}".lower()
    return "fpga" if any(h in text for h in _FPGA_VENDOR_HINTS) else "accelerator"


def state(device: Device) -> _DeviceState:
    st = _states.get(device.id)
    if st is None:
        if device.handle is None:
            raise RuntimeError(f"{device.id} has no OpenCL device to run on (a modeled device needs an emulator: "
                               f"`pip install pocl-binary-distribution`)")
        ctx = cl.Context([device.handle])
        queue = cl.CommandQueue(ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
        st = _states[device.id] = _DeviceState(ctx, queue)
        _ids_by_queue[queue.int_ptr] = device.id
        sync_clock(st)
    return st


def sync_clock(st: _DeviceState, tries: int = 7) -> None:
    """Map the device's profiling clock onto the host's perf_counter_ns. OpenCL timestamps
    use a clock of the implementation's choosing (PoCL's is CLOCK_MONOTONIC_RAW, an FPGA
    board's its own), so an empty marker is timed from the host: its device timestamp falls
    between the host times around it; the tightest of a few tries bounds the error."""
    st.queue.finish()
    best = None
    for _ in range(tries):
        before = time.perf_counter_ns()
        marker = cl.enqueue_marker(st.queue)
        marker.wait()
        after = time.perf_counter_ns()
        if best is None or after - before < best[0]:
            best = (after - before, (before + after) // 2 - marker.profile.start)
    st.clock_offset_ns = best[1]


def sync_clocks() -> None:
    """Re-map every open queue's clock (a profile does this as it starts: clocks drift)."""
    for st in _states.values():
        sync_clock(st)


def queue(device: Device) -> "cl.CommandQueue":
    return state(device).queue


# --- programs -------------------------------------------------------------------------

def kernel_source_dir() -> Path:
    """Where the .cl files are: inside the installed package, else the source tree's
    top-level fpga_kernels/ (editable / PYTHONPATH use)."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "fpga_kernels", here.parent / "fpga_kernels"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"OpenCL kernel sources not found next to {here}; reinstall hetero")


_INCLUDE = re.compile(r'^#include "([\w.]+)"[ \t]*$', re.M)


def kernel_source(kernel_file: str) -> str:
    """The source of `kernel_file` with its `#include "x.clh"` lines (files beside it)
    inlined, each once: one self-contained text, so PoCL's build cache sees every change
    and no include path has to reach the device compiler."""
    seen: set[str] = set()

    def inline(match) -> str:
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(inline, (kernel_source_dir() / name).read_text())

    return _INCLUDE.sub(inline, (kernel_source_dir() / kernel_file).read_text())


def binary_name(kernel_file: str, defines: dict[str, int]) -> str:
    """File stem a precompiled binary must carry: the kernel file's stem plus its defines,
    since an FPGA bitstream is built for fixed compile-time sizes."""
    tag = "_".join(f"{k}{v}" for k, v in sorted(defines.items()))
    return f"{Path(kernel_file).stem}-{tag}"


def use_binaries(directory: str | os.PathLike | None, devices: list[str] = ()) -> None:
    """Load programs from precompiled binaries in `directory` (default: $HETERO_FPGA_BINARY_DIR).
    FPGA devices always load binaries; `devices` forces it for others too (e.g. to check a
    binary-loading flow on PoCL)."""
    global _binary_dir
    _binary_dir = Path(directory) if directory is not None else None
    _binary_only.clear()
    _binary_only.update(devices)
    for st in _states.values():
        st.programs.clear()


def program(device: Device, kernel_file: str, defines: dict[str, int]) -> "cl.Program":
    """The built program for these compile-time defines, built (or loaded) once."""
    st = state(device)
    key = (kernel_file, tuple(sorted(defines.items())))
    prg = st.programs.get(key)
    if prg is None:
        # a real FPGA runs only precompiled programs; a modeled one (model:u55c) runs on its
        # emulator (e.g. PoCL's CPU device), which compiles from source
        if (device.kind == "fpga" and not device.info.get("modeled")) or device.id in _binary_only:
            prg = _load_binary(device, st, kernel_file, defines)
        else:
            source = kernel_source(kernel_file)
            options = [f"-D{k}={v}" for k, v in sorted(defines.items())] + ["-cl-std=CL1.2"]
            try:
                prg = cl.Program(st.context, source).build(options=options)
            except cl.RuntimeError as exc:
                raise RuntimeError(f"building {kernel_file} for {device.id} with {options} failed:\n{exc}") from exc
        st.programs[key] = prg
    return prg


def _load_binary(device: Device, st: _DeviceState, kernel_file: str, defines: dict[str, int]):
    directory = _binary_dir or (Path(os.environ["HETERO_FPGA_BINARY_DIR"]) if os.environ.get("HETERO_FPGA_BINARY_DIR") else None)
    stem = binary_name(kernel_file, defines)
    if directory is None:
        raise RuntimeError(f"{device.id} ({device.name}) loads precompiled programs only: set HETERO_FPGA_BINARY_DIR "
                           f"or call hetero.backends.opencl.use_binaries(dir) to a folder holding {stem}"
                           f"{{{','.join(BINARY_SUFFIXES)}}} (built from fpga_kernels/{kernel_file} with {defines})")
    for suffix in BINARY_SUFFIXES:
        path = directory / (stem + suffix)
        if path.is_file():
            prg = cl.Program(st.context, [device.handle], [path.read_bytes()])
            return prg.build()
    raise FileNotFoundError(f"no precompiled program {stem}{{{','.join(BINARY_SUFFIXES)}}} in {directory} for {device.id}")


def export_binary(device: Device, kernel_file: str, defines: dict[str, int], directory: str | os.PathLike) -> Path:
    """Compile from source on `device` and write the binary under the name `program`
    looks for; on PoCL this exercises the same load path an FPGA bitstream takes."""
    st = state(device)
    source = (kernel_source_dir() / kernel_file).read_text()
    options = [f"-D{k}={v}" for k, v in sorted(defines.items())] + ["-cl-std=CL1.2"]
    prg = cl.Program(st.context, source).build(options=options)
    path = Path(directory) / (binary_name(kernel_file, defines) + ".bin")
    path.write_bytes(prg.get_info(cl.program_info.BINARIES)[0])
    return path


# --- data ----------------------------------------------------------------------------

def holds(value) -> bool:
    return cl is not None and isinstance(value, cla.Array)


def device_id(value) -> str:
    return _ids_by_queue.get(value.queue.int_ptr) or _ids_by_ptr[value.queue.device.int_ptr]


def resides_on(value, device: Device) -> bool:
    st = _states.get(device.id)
    return st is not None and value.queue is st.queue


def nbytes(value) -> int:
    return value.nbytes


def upload(tensor: torch.Tensor, device: Device):
    """Copy a torch tensor into a new device array; returns (array, Timing)."""
    q = queue(device)
    start = time.perf_counter_ns()
    staged = host.host_array(tensor)  # a GPU tensor is staged through host memory
    arr = cla.empty(q, staged.shape, staged.dtype)
    if staged.size:
        evt = cl.enqueue_copy(q, arr.data, staged, is_blocking=False)
        arr.add_event(evt)
        timing = Timing("opencl-event", (time.perf_counter_ns() - start) / 1e9, start,
                        _span([evt], state(device).clock_offset_ns))
    else:
        timing = Timing("host-clock", (time.perf_counter_ns() - start) / 1e9, start)
    return arr, timing


def download(value):
    """Copy a device array into a pooled staging buffer seen as a CPU torch tensor (waits for
    it); returns (tensor, Timing)."""
    start = time.perf_counter_ns()
    out = host.staging(value.shape, value.dtype)
    if out.size:
        evt = cl.enqueue_copy(value.queue, out, value.data, wait_for=value.events, is_blocking=True)
        st = _states.get(_ids_by_queue.get(value.queue.int_ptr, ""))  # None: an array hetero did not make
        offset = st.clock_offset_ns if st is not None else 0
        timing = Timing("opencl-event", (time.perf_counter_ns() - start) / 1e9, start, _span([evt], offset))
    else:
        timing = Timing("host-clock", (time.perf_counter_ns() - start) / 1e9, start)
    return torch.from_numpy(out), timing


def call(device: Device, fn, args):
    """Run fn(device, *args), which enqueues work and returns (result, events)."""
    start = time.perf_counter_ns()
    result, events = fn(device, *args)
    wall = (time.perf_counter_ns() - start) / 1e9
    if not events:
        return result, Timing("host-clock", wall, start)
    return result, Timing("opencl-event", wall, start, _span(events, state(device).clock_offset_ns))


def copy_bandwidth(device: Device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s, read + write counted (median of `repeats` runs of
    a float16-vector copy kernel, timed with profiling events)."""
    q = queue(device)
    n = nbytes // 64
    src = cla.zeros(q, n * 16, np.float32)
    dst = cla.empty_like(src)
    kernel = program(device, "calibrate.cl", {}).copy_f16
    times = []
    for _ in range(repeats + 1):
        evt = kernel(q, (n,), None, src.data, dst.data)
        evt.wait()
        times.append((evt.profile.end - evt.profile.start) / 1e9)
    return 2 * n * 64 / float(np.median(times[1:]))


def _span(events, offset: int):
    """From the first event's device start to the last one's end, on the host clock."""
    def resolve() -> tuple[int, int]:
        cl.wait_for_events(events)
        return (min(e.profile.start for e in events) + offset, max(e.profile.end for e in events) + offset)
    return resolve
