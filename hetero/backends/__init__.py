"""One module per backend: discovery, placing data on a device, timing a call.

Each backend module exposes the same small interface (see `torch_backend` for the
simplest one): NAME, discover(), holds(value), device_id(value), resides_on(value, device),
upload(tensor, device),
download(value), nbytes(value) and call(device, fn, args) -> (result, Timing).
"""

from __future__ import annotations

from . import host, opencl, torch_backend

BACKENDS = {m.NAME: m for m in (torch_backend, opencl, host)}


def backend_of_value(value):
    """The backend module whose array type `value` is, or None for host scalars."""
    for backend in BACKENDS.values():
        if backend.holds(value):
            return backend
    return None
