"""`hetero demo`: a registered method end to end on every placement this machine has.

The method's synthetic inputs (`example_inputs`) are prepared on each placement, its decode
step is timed there, and the step is checked against the method's float64 reference
(`reference_step`, computed once): in how many (sequence, KV head) rows the placement
selected the reference's set, and how far its output lies from exact attention over the
entries it selected itself (the reference's output where the sets agree). Page-sparse's
synthetic cache also hides a needle, one token per KV head whose key points along that
group's queries: every row must retrieve its page.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from . import devices as present_devices
from .methods import PageSparseAttention, dense_attention, get_method
from .methods import page_sparse_reference as ref
from .runtime import Pipeline, Placement, PlacementError

# tokens in the demo's memory unless told; at 64K every method's float64 reference takes 1-4 s
# on 2 cores (measured: page-sparse 1.5-2 s, dsa 2.8-3.3 s, seer 0.9-2.2 s), so none needs less
DEFAULT_CONTEXT = 65536
# methods whose retrieval must find the needle page_sparse.synthetic_cache plants (dsa and seer
# use those inputs too, but select by random projections, which need not find it)
PLANTS_NEEDLE: tuple[type, ...] = (PageSparseAttention,)
# max |output - exact attention over the selected entries| per storage dtype
TOLERANCE = {"float32": 1e-4}
LOOSE_TOLERANCE = 1e-2  # float16 / bfloat16 storage


@dataclass
class PlacementResult:
    name: str
    placement: str
    step_ms: float  # median wall time of one decode step
    per_step_ms: dict[str, float]  # median device time per step (or fused pair)
    per_step_device: dict[str, str]
    transfer_bytes: int
    transfer_ms: float
    agreement: float  # fraction of (sequence, KV head) rows that selected the reference's set
    max_error: float  # vs exact attention over the entries this placement selected
    reference_error: float  # vs the reference's output
    needle_found: bool | None  # None: the method's inputs plant no needle
    records: list = field(default_factory=list, repr=False)

    def ok(self, tolerance: float) -> bool:
        return self.agreement == 1.0 and self.max_error <= tolerance and self.needle_found is not False


@dataclass
class DemoResult:
    method: object
    shapes: dict
    results: list[PlacementResult]
    skipped: dict[str, str]  # placement -> why the method cannot run it
    dense_ms: float | None  # dense attention's time (sparse-attention methods only)
    reference_s: float  # seconds the float64 reference took
    needle: np.ndarray | None  # [B, H] planted token per row, or None

    @property
    def tolerance(self) -> float:
        return TOLERANCE.get(self.shapes.get("dtype", "float32"), LOOSE_TOLERANCE)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(r.ok(self.tolerance) for r in self.results)


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


def setup(method="page-sparse", context: int | None = None, batch: int = 1, options: dict | None = None,
          shapes: dict | None = None):
    """(method, complete shapes): the method built by registered name with `options` (or given
    built), at float32 unless `shapes` says otherwise. ValueError / TypeError name a bad name,
    option or shape."""
    if isinstance(method, str):
        method = get_method(method, **(options or {}))
    elif options:
        raise ValueError("options apply to a method given by its registered name")
    given = {"dtype": "float32"} if "dtype" in getattr(method, "SHAPES", {}) else {}
    given.update({"batch": batch, **(shapes or {})})
    if context is not None:
        given[method.CONTEXT_SHAPE] = context
    if method.family == "sparse-attention":
        given.setdefault("context", DEFAULT_CONTEXT)
    return method, method.shapes(**given)


def row_agreement(selected, reference) -> float:
    """Fraction of (sequence, KV head) rows whose selected set (ids >= 0) equals the reference's."""
    selected, reference = np.asarray(selected), np.asarray(reference)
    if selected.shape[:2] != reference.shape[:2]:
        raise ValueError(f"selected ids are {list(selected.shape)} but the reference's {list(reference.shape)}: "
                         f"both must be [batch, kv_heads, width]")
    rows = zip(selected.reshape(-1, selected.shape[-1]), reference.reshape(-1, reference.shape[-1]))
    same = [set(a[a >= 0].tolist()) == set(b[b >= 0].tolist()) for a, b in rows]
    return sum(same) / len(same)


def planted_needle(method, inputs) -> np.ndarray | None:
    """Per (sequence, KV head) row, the token `synthetic_cache` planted (its key is 8x longer
    than any other), for methods whose example inputs come from it; else None."""
    if not isinstance(method, PLANTS_NEEDLE):
        return None
    return inputs[0].float().norm(dim=-1).argmax(-1).numpy()


def run_placement(name, placement, method, inputs, query, reference, needle, repeats, on_progress=None):
    pipe = Pipeline(method, placement)
    memory = pipe.prepare(*inputs)
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
    ref_selected, ref_out = reference[:2]
    if method.family == "retrieval":  # ranked documents: compare sets, and scores at the ids it chose
        selected = out.ids.numpy()[:, None, :]
        agreement = row_agreement(selected, ref_selected)
        valid = out.ids.numpy() >= 0
        expected = np.where(valid, np.take_along_axis(reference[2], np.maximum(out.ids.numpy(), 0), 1), -np.inf)
        out_scores = out.scores.double().numpy()
        error = float(np.abs(out_scores - expected)[valid].max(initial=0.0))
        ref_error = float(np.abs(out_scores - ref_out)[valid].max(initial=0.0)) if agreement == 1.0 else error
        return _result(name, pipe, walls, runs, agreement, error, ref_error, None)
    if method.family == "memory":  # a readout of the whole bank: the output is the check
        error = float(np.abs(out.detach().cpu().double().numpy() - ref_out).max())
        return _result(name, pipe, walls, runs, 1.0, error, error, None)
    selected = last.artifact("selected").numpy()
    agreement = row_agreement(selected, ref_selected)
    attention = getattr(method, "attention", method)  # the page-sparse attention its apply runs
    expected = ref_out
    if agreement < 1.0:  # the fair check: exact attention over what this placement selected
        keys, values = inputs[0], inputs[1]
        scale = attention.scale if attention.scale is not None else keys.shape[-1] ** -0.5
        expected = ref.sparse_attention(keys.float().numpy(), values.float().numpy(), query.double().numpy(),
                                        selected, [keys.shape[2]] * keys.shape[0], attention.page_size, scale)
    needle_found = None
    if needle is not None:
        blocks = needle // attention.page_size
        needle_found = bool((selected == blocks[..., None]).any(-1).all())
    out = out.detach().cpu().double().numpy()
    return _result(name, pipe, walls, runs, agreement, float(np.abs(out - expected).max()),
                   float(np.abs(out - ref_out).max()), needle_found)


def _result(name, pipe, walls, runs, agreement, max_error, reference_error, needle_found) -> PlacementResult:
    last = runs[-1]
    per_step: dict[str, list[float]] = {}
    devices: dict[str, str] = {}
    for run in runs:
        for step, seconds in run.by_step().items():
            per_step.setdefault(step, []).append(seconds)
        for r in run.steps:
            devices[r.step] = r.device
    return PlacementResult(
        name=name, placement=repr(pipe.placement), step_ms=1e3 * statistics.median(walls),
        per_step_ms={k: 1e3 * statistics.median(v) for k, v in per_step.items()}, per_step_device=devices,
        transfer_bytes=last.transfer_bytes, transfer_ms=1e3 * statistics.median(r.transfer_seconds for r in runs),
        agreement=agreement, max_error=max_error, reference_error=reference_error, needle_found=needle_found,
        records=last.rows())


def time_dense(keys, values, query, repeats: int) -> float:
    dense_attention(keys, values, query)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dense_attention(keys, values, query)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_demo(method="page-sparse", context: int | None = None, batch: int = 1, options: dict | None = None,
             shapes: dict | None = None, repeats: int = 5, progress=None, seed: int = 0) -> DemoResult:
    """`method` (a registered name built with `options`, or a built method) on its example
    inputs at `shapes` (default: its own, at float32 and DEFAULT_CONTEXT tokens), on every
    placement present that it can run; `progress`: a rich Progress."""
    method, shapes = setup(method, context, batch, options, shapes)
    inputs, query = method.example_inputs(shapes, seed)
    chosen, skipped = {}, {}
    for name, placement in placements_present().items():
        try:
            Placement.resolve(method, placement)
            chosen[name] = placement
        except PlacementError as exc:
            skipped[name] = str(exc)
    task = progress.add_task("float64 reference", total=len(chosen) * repeats + repeats + 1) if progress else None
    advance = (lambda: progress.advance(task)) if progress else None
    start = time.perf_counter()
    reference = method.reference_step(inputs, query)
    if method.family == "retrieval":  # every document's score too: the fair check of another selection
        reference = (*reference, method.reference_scores(inputs, query))
    reference_s = time.perf_counter() - start
    if progress:
        progress.advance(task)
    needle = planted_needle(method, inputs)
    results = []
    for name, placement in chosen.items():
        if progress:
            progress.update(task, description=f"placement {name}")
        results.append(run_placement(name, placement, method, inputs, query, reference, needle, repeats, advance))
    dense_ms = None
    if method.family == "sparse-attention":
        if progress:
            progress.update(task, description="dense baseline")
        dense_ms = time_dense(inputs[0], inputs[1], query, repeats)
    if progress:
        progress.advance(task, repeats)
    return DemoResult(method, shapes, results, skipped, dense_ms, reference_s, needle)
