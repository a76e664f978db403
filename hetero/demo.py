"""`hetero demo`: page-sparse attention end to end on every placement this machine has.

A long synthetic KV cache hides a needle: one token per KV head whose key points along that
group's queries. Each placement must retrieve the needle's page in every (sequence, KV head)
row, and its output must equal exact attention over the tokens it retrieved.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import devices as present_devices
from .methods import PageSparseAttention, dense_attention
from .methods.page_sparse import synthetic_cache  # noqa: F401  (re-exported: the benchmarks use it)
from .methods import page_sparse_reference as ref
from .runtime import Pipeline


@dataclass
class PlacementResult:
    name: str
    placement: str
    step_ms: float  # median wall time of one decode step
    per_step_ms: dict[str, float]  # median device time per step (or fused pair)
    per_step_device: dict[str, str]
    transfer_bytes: int
    transfer_ms: float
    needle_found: bool
    max_error: float  # vs exact attention over the retrieved tokens
    records: list = field(default_factory=list, repr=False)


def placements_present() -> dict[str, object]:
    """Each single-device placement, plus the paper's split when OpenCL is present:
    relevancy+retrieval (fused) on the OpenCL device, prepare and apply on torch."""
    found = {d.id: d.id for d in present_devices()}
    torch_dev = next(d.id for d in present_devices() if d.backend == "torch")
    opencl = [d.id for d in present_devices() if d.backend == "opencl"]
    if opencl:
        found["mixed"] = {
            "prepare": torch_dev, "relevancy": opencl[0], "retrieval": opencl[0], "apply": torch_dev}
    return found


def run_placement(name, placement, method, keys, values, query, needle, repeats, on_progress=None):
    pipe = Pipeline(method, placement)
    memory = pipe.prepare(keys, values)
    pipe.step(query, memory)  # warm-up: builds kernels, moves lengths once
    walls, runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        out = pipe.step(query, memory)
        walls.append(time.perf_counter() - start)
        runs.append(pipe.last_run)
        if on_progress:
            on_progress()
    last = runs[-1]
    page_ids = last.artifact("page_ids").numpy()
    needle_found = bool((page_ids == needle // method.page_size).any(axis=-1).all())
    scale = 1.0 / keys.shape[-1] ** 0.5
    expected = ref.sparse_attention(keys.numpy(), values.numpy(), query.numpy(), page_ids,
                                    [keys.shape[2]] * keys.shape[0], method.page_size, scale)
    per_step: dict[str, list[float]] = {}
    devices: dict[str, str] = {}
    for run in runs:
        for name_, seconds in run.by_step().items():
            per_step.setdefault(name_, []).append(seconds)
        for r in run.steps:
            devices[r.step] = r.device
    return PlacementResult(
        name=name, placement=repr(pipe.placement), step_ms=1e3 * statistics.median(walls),
        per_step_ms={k: 1e3 * statistics.median(v) for k, v in per_step.items()}, per_step_device=devices,
        transfer_bytes=last.transfer_bytes, transfer_ms=1e3 * statistics.median(r.transfer_seconds for r in runs),
        needle_found=needle_found, max_error=float(np.abs(out.numpy() - expected).max()), records=last.rows())


def time_dense(keys, values, query, repeats: int) -> float:
    dense_attention(keys, values, query)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dense_attention(keys, values, query)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(seq: int = 65536, batch: int = 1, kv_heads: int = 8, group: int = 4, head_dim: int = 128,
             page_size: int = 16, budget_tokens: int = 2048, repeats: int = 5, progress=None):
    """Returns (results per placement, dense baseline ms, needle token, config dict)."""
    keys, values, query, needle = synthetic_cache(batch, kv_heads, group, seq, head_dim)
    method = PageSparseAttention(page_size=page_size, budget_tokens=budget_tokens)
    chosen = placements_present()
    task = progress.add_task("demo", total=len(chosen) * repeats + repeats) if progress else None
    advance = (lambda: progress.advance(task)) if progress else None
    results = []
    for name, placement in chosen.items():
        if progress:
            progress.update(task, description=f"placement {name}")
        results.append(run_placement(name, placement, method, keys, values, query, needle, repeats, advance))
    if progress:
        progress.update(task, description="dense baseline")
    dense_ms = time_dense(keys, values, query, repeats)
    if progress:
        progress.advance(task, repeats)
    config = dict(batch=batch, kv_heads=kv_heads, q_heads=kv_heads * group, seq=seq, head_dim=head_dim,
                  page_size=page_size, budget_tokens=budget_tokens, repeats=repeats)
    return results, dense_ms, needle, config

