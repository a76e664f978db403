"""Execution targets present on this machine, under stable id strings.

    torch:cpu, torch:cuda:0, ...      torch backend
    opencl:<platform>:<device>        every OpenCL device (PoCL's CPU device after install)
    host                              the CPU through the C++ host shim
    model:<profile>                   a modeled device: a profile with no hardware behind it,
                                      run functionally on an emulator, timed by the cost model

Discovery never fails because one backend is missing: a backend that cannot be loaded
contributes no devices and says why in `hetero.devices(verbose=True)` / `backend_problems()`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


class DeviceNotFoundError(LookupError):
    """Asked for a device id that is not present on this machine."""


@dataclass(frozen=True, eq=False)
class Device:
    """One execution target. `handle` is the backend's own object (torch.device,
    pyopencl.Device); `kind` is gpu / cpu / fpga / accelerator."""

    id: str
    kind: str
    backend: str
    name: str
    handle: Any = field(repr=False)
    info: dict = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return self.id

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


_problems: dict[str, str] = {}


@functools.lru_cache(maxsize=1)
def _discover() -> tuple[Device, ...]:
    from .backends import BACKENDS

    found: list[Device] = []
    for backend in BACKENDS.values():
        try:
            found.extend(backend.discover())
        except Exception as exc:  # a broken backend must not take the others down
            _problems[backend.NAME] = f"{type(exc).__name__}: {exc}"
    return tuple(found)


def devices() -> list[Device]:
    """Every execution target present, torch devices first."""
    return list(_discover())


def backend_problems() -> dict[str, str]:
    """Why a backend contributed no devices (empty when all loaded)."""
    _discover()
    return dict(_problems)


def get_device(device: "str | Device") -> Device:
    """Look a device up by id (or pass a Device through). Unknown ids raise
    DeviceNotFoundError listing the ids that are present."""
    if isinstance(device, Device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a device id string or a hetero.Device, got {type(device).__name__}")
    if device.startswith("model:"):
        return modeled_device(device.removeprefix("model:"))
    present = _discover()
    for d in present:
        if d.id == device:
            return d
    aliases = {"cpu": "torch:cpu", "cuda": "torch:cuda:0", "opencl": "opencl:0:0"}
    if device in aliases:
        return get_device(aliases[device])
    listing = ", ".join(d.id for d in present) or "none"
    hint = ""
    if device.startswith("opencl") and "opencl" in _problems:
        hint = f" (the OpenCL backend did not load: {_problems['opencl']})"
    elif device.startswith("opencl"):
        hint = " (install an OpenCL platform: `pip install pocl-binary-distribution` gives a CPU device)"
    raise DeviceNotFoundError(f"no device {device!r} on this machine{hint}; present: {listing}")


@functools.lru_cache(maxsize=None)
def modeled_device(profile: str) -> Device:
    """`model:<profile>`: a device profile (e.g. 'u55c') with no hardware behind it. Its steps
    run functionally on an emulating device of the profile's `emulate_on` backend (an FPGA's
    OpenCL kernels on PoCL, a GPU's torch code on torch:cpu); their time and energy come from
    the cost model and are labeled "modeled"."""
    from .cost.profiles import device_profile

    prof = device_profile(profile)
    pick = [d for d in _discover() if d.backend == prof.emulate_on]
    pick.sort(key=lambda d: d.kind != "cpu")  # emulate on a CPU device where there is one
    emulator = pick[0] if pick else None
    return Device(f"model:{prof.name}", prof.kind, prof.emulate_on, f"{prof.title} (modeled)",
                  emulator.handle if emulator else None,
                  {"modeled": True, "profile": prof.name, "emulator": emulator.id if emulator else None})
