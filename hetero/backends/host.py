"""host backend: the CPU through hetero's C++ shim (`hetero._host`), as device `host`.

Values are numpy arrays in 4 KiB-aligned buffers from the shim's pool, the form FPGA DMA
engines want. Every transfer that goes through host memory (an OpenCL download, a GPU
tensor on its way to OpenCL) lands in such a staging buffer (`staging`), reused across
steps; a buffer returns to the pool only once no array or tensor viewing it is alive.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..devices import Device
from ..records import Timing

try:
    from .. import _host
except ImportError as exc:  # a source checkout without the compiled shim: numpy staging
    _host = None
    _IMPORT_ERROR = exc

NAME = "host"


def discover() -> list[Device]:
    if _host is None:
        raise RuntimeError(f"the C++ host shim is not built ({_IMPORT_ERROR}); install hetero with pip to build it")
    info = _host.build_info()
    return [Device("host", "cpu", NAME, f"C++ host shim ({info['threads']} threads, {info['score_kernel']})", None,
                   dict(info))]


def staging(shape, dtype) -> np.ndarray:
    """An uninitialised array in a pooled, 4 KiB-aligned host buffer."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if _host is None or count == 0:
        return np.empty(shape, dtype)
    buf = _host.default_pool().acquire(count * dtype.itemsize)
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


def numpy_dtype(dtype: torch.dtype):
    """Host storage for a torch dtype: bfloat16 has no numpy type and is held as float32 (exactly)."""
    return {torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}.get(dtype, np.float32)


def holds(value) -> bool:
    return isinstance(value, np.ndarray)


def device_id(value) -> str:
    return "host"


def resides_on(value, device: Device) -> bool:
    return device.backend == NAME


def nbytes(value) -> int:
    return value.nbytes


# A CPU torch tensor and a host array are the same memory: crossing between them moves no bytes.
SHARES_CPU_MEMORY = True


def host_array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's values in host memory: a view of a contiguous CPU tensor; anything else
    (a GPU tensor, a strided or bfloat16 one) copied into a staging array."""
    tensor = tensor.detach()
    if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype != torch.bfloat16:
        return tensor.numpy()
    out = staging(tuple(tensor.shape), numpy_dtype(tensor.dtype))  # bfloat16 -> float32, exact
    torch.from_numpy(out).copy_(tensor)
    return out


def upload(tensor: torch.Tensor, device: Device):
    """`host_array` of the tensor; returns (array, Timing)."""
    start = time.perf_counter_ns()
    out = host_array(tensor)
    end = time.perf_counter_ns()
    return out, Timing("host-clock", (end - start) / 1e9, start)


def download(value: np.ndarray):
    """Host memory is already the CPU's: a zero-copy torch view."""
    start = time.perf_counter_ns()
    out = torch.from_numpy(value)
    end = time.perf_counter_ns()
    return out, Timing("host-clock", (end - start) / 1e9, start)


def call(device: Device, fn, args):
    start = time.perf_counter_ns()
    result = fn(device, *args)
    end = time.perf_counter_ns()
    return result, Timing("host-clock", (end - start) / 1e9, start)


def copy_bandwidth(device: Device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Measured copy bandwidth of host memory in bytes/s, read + write counted."""
    from ..devices import get_device
    from . import torch_backend

    return torch_backend.copy_bandwidth(get_device("torch:cpu"), nbytes, repeats)
