"""What every method shares: its implementations per backend and what each step needs."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

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
    family = "sparse-attention"  # "retrieval" or "memory": what `hetero demo` checks, which benchmark runs it
    CONTEXT_SHAPE = "context"  # the shape `--context` sets: the memory's size (tokens, documents, entries)
    # entries one call of the steady state appends before its step: a decoder appends its token
    # (1); a retriever answers queries over a fixed corpus (0). The placer costs that call.
    STEP_APPENDS = 1
    memory_type: type = object
    needs: dict[Step, tuple[str, ...]] = {}
    # adjacent steps with a fused operation, used when both sit on one device that has it
    fusions: dict[tuple[Step, Step], str] = {}
    # the token axis of each `prepare` input, in `example_inputs` order (e.g. 2 for keys [B, H, S, D])
    TOKEN_AXES: tuple[int, ...] = ()

    def __init__(self):
        self.implementations: dict[str, object] = {}

    def impl(self, backend: str):
        return self.implementations[backend]

    def fused(self, assignment) -> bool:
        """Whether a placement (step -> Device) runs a fused operation, as `Run.fused` decides."""
        return any(assignment[a] == assignment[b] and hasattr(self.implementations.get(assignment[a].backend), op)
                   for (a, b), op in self.fusions.items())

    def decode_inputs(self, inputs, count: int, seed: int = 0) -> list[tuple]:
        """`count` one-token appends shaped like the `prepare` inputs `inputs` (one token on
        each input's `TOKEN_AXES` axis): random normal, in each input's dtype and on its device."""
        if len(inputs) != len(self.TOKEN_AXES):
            raise ValueError(f"{self.name} takes {len(self.TOKEN_AXES)} prepare inputs, got {len(inputs)}")
        gen = torch.Generator().manual_seed(seed)
        shapes = [x.shape[:axis] + (1,) + x.shape[axis + 1:] for x, axis in zip(inputs, self.TOKEN_AXES)]
        return [tuple(torch.randn(shape, generator=gen).to(x.device, x.dtype) for x, shape in zip(inputs, shapes))
                for _ in range(count)]

    def why_not(self, step: Step, device: Device) -> list[str]:
        """Reasons `step` cannot run on `device` (empty when it can)."""
        impl = self.implementations.get(device.backend)
        if impl is None:
            return [f"{self.name} has no {device.backend} implementation (it has {sorted(self.implementations)})"]
        missing = [op for op in self.needs.get(step, ()) if not hasattr(impl, op)]
        return [f"the {device.backend} implementation lacks {', '.join(missing)}"] if missing else []

    def describe_call(self, call: str, args, result):
        """What the cost model needs to know of one pipeline call: (memory, query or None,
        entries appended per sequence, whether the memory was allocated, the torch device id
        the caller's inputs live on). This default reads the KV-cache methods' signatures:
        prepare(keys [B, H, S, D], ...), append(memory, keys, ...), step(query, memory)."""
        from ..backends import torch_backend

        if call == "prepare":
            memory, query, appended, allocate, given = result, None, result.max_length, True, args[0]
        elif call == "append":
            memory, query, appended, allocate, given = args[0], None, int(args[1].shape[2]), False, args[1]
        else:
            memory, query, appended, allocate, given = args[1], args[0], 0, False, args[0]
        return memory, query, appended, allocate, torch_backend.id_of(given.device)


def weight_matrices(weights, names: tuple[str, ...]) -> dict:
    """A method's projection weights given by the caller: exactly the keys `names`, each a
    finite 2-D float matrix (torch tensor or array), returned as float32 CPU tensors. The
    method then checks their shapes against its options."""
    if not isinstance(weights, Mapping) or set(weights) != set(names):
        got = sorted(weights) if isinstance(weights, Mapping) else type(weights).__name__
        raise ValueError(f"weights must be a dict with keys {list(names)}, got {got}")
    out = {}
    for name in names:
        w = weights[name]
        try:
            w = w.detach().cpu() if isinstance(w, torch.Tensor) else torch.from_numpy(np.asarray(w))
        except TypeError as exc:
            raise ValueError(f"weights[{name!r}] must be a float matrix (torch tensor or array): {exc}") from None
        if w.dim() != 2 or not w.dtype.is_floating_point:
            raise ValueError(f"weights[{name!r}] must be a 2-D float matrix, got {w.dtype} {list(w.shape)}")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights[{name!r}] contains NaN or Inf")
        out[name] = w.float().contiguous()
    return out
