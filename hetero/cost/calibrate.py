"""`hetero calibrate`: measure this machine's devices and write their profiles.

For every present device (or those named) it measures

    memory levels   copy bandwidth over a sweep of sizes (32 KiB .. 512 MiB); plateaus become
                    levels (e.g. L2 / L3 / DRAM), kept only where the bandwidth differs by more
                    than 25% from the next level
    compute         peak float32 FLOP/s (a torch matmul; a PoCL device on the CPU shares the
                    silicon of torch:cpu and gets its figure)
    launch          the median time of a tiny op / tiny kernel
    host link       upload/download through the backend at several sizes, fitted to
                    latency + bytes / bandwidth (devices outside host memory only)
    operations      real pipelines of every registered method (or those named) over a grid
                    of shapes, on the method's own `example_inputs`, each decode step with
                    its one-entry append (`decode_inputs`; none where STEP_APPENDS is 0),
                    every op of every device timed and fitted to
                    time = overhead + roofline / efficiency

Every figure is a robust median (samples farther than k scaled MADs from the median are
rejected, so one noisy sample cannot move the model) and carries a source saying when, on
what and from how many samples it was measured. Power is modeled (no RAPL on most VMs).

The time of an op is what it costs its caller: the device time (OpenCL event timestamps), or
the host's time to issue it when that is longer (PoCL: Python + argument uploads per op), so
a fitted overhead includes each device's per-call dispatch cost.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..devices import Device, devices as present_devices, get_device
from ..runtime import STEPS, Pipeline
from . import profiles as _profiles
from .model import roofline
from .profiles import DeviceProfile, LinkProfile, MemoryLevel, PATTERNS, Profiles

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal samples
LEVEL_GAP = 1.25  # adjacent levels must differ by more than 25% in bandwidth
DEFAULT_EFFICIENCY = {"stream": 0.8, "scan": 0.5, "select": 0.3, "gather": 0.5}


# --- robust statistics ----------------------------------------------------------------

def robust_keep(samples, k: float = 3.0) -> np.ndarray:
    """The samples within k scaled MADs (1.4826 x median absolute deviation) of the median."""
    x = np.asarray(samples, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        raise ValueError("no finite samples")
    med = np.median(x)
    mad = MAD_SCALE * np.median(np.abs(x - med))
    if mad == 0:
        return x[x == med] if np.count_nonzero(x == med) * 2 > x.size else x
    return x[np.abs(x - med) <= k * mad]


def robust_median(samples, k: float = 3.0) -> float:
    """Median after rejecting samples farther than k scaled MADs from the median."""
    return float(np.median(robust_keep(samples, k)))


def robust_fit(roof, measured, k: float = 3.0, iterations: int = 5) -> dict:
    """Fit measured = overhead + roof / efficiency, minimizing relative error, with iterative
    rejection of points whose relative residual lies farther than k scaled MADs from the
    median residual. overhead >= 0 and 0 < efficiency <= 1 (where the free fit says > 1, the
    roofline's bandwidth is underestimated: efficiency is kept at 1 and `clamped` is set).
    Returns overhead, efficiency, kept, n, clamped, rel_errors (of the kept points)."""
    r = np.asarray(roof, dtype=float)
    t = np.asarray(measured, dtype=float)
    if r.shape != t.shape or t.size == 0 or np.any(t <= 0):
        raise ValueError("need equal-length roof and measured, measured > 0")
    keep = np.ones(t.size, dtype=bool)
    overhead, inv_eff, clamped = 0.0, 1.0, False
    for _ in range(iterations):
        overhead, inv_eff, clamped = _fit_once(r[keep], t[keep])
        rel = (overhead + inv_eff * r - t) / t
        if keep.sum() < 4:
            break
        med = np.median(rel[keep])
        mad = MAD_SCALE * np.median(np.abs(rel[keep] - med))
        new_keep = np.abs(rel - med) <= k * max(mad, 0.01)
        if new_keep.sum() < 2 or np.array_equal(new_keep, keep):
            break
        keep = new_keep
    rel = (overhead + inv_eff * r - t) / t
    return {"overhead": overhead, "efficiency": 1.0 / inv_eff, "kept": int(keep.sum()), "n": int(t.size),
            "clamped": clamped, "rel_errors": rel[keep].tolist()}


def _fit_once(r: np.ndarray, t: np.ndarray) -> tuple[float, float, bool]:
    w = 1.0 / t  # relative error: each row divided by its measurement
    max_inv = 1e4  # efficiency >= 1e-4
    if np.max(r / t) < 0.02:  # the roofline is under 2% of every time: efficiency not identifiable
        return max(0.0, float(np.sum((t - r) * w * w) / np.sum(w * w))), 1.0, True
    if r.size >= 2 and np.ptp(r / t) > 1e-9:
        (o, a), *_ = np.linalg.lstsq(np.stack([w, r * w], 1), np.ones_like(t), rcond=None)
    else:
        o, a = -1.0, -1.0
    clamped = False
    if o >= 0 and 1.0 <= a <= max_inv:
        return float(o), float(a), False
    if a < 1.0 and (o >= 0 or r.size < 2):
        clamped = True
    # one parameter at a time under the constraints, the better of the two
    a1 = 1.0 if a < 1.0 or not np.isfinite(a) else min(a, max_inv)
    o1 = max(0.0, float(np.sum((t - a1 * r) * w * w) / np.sum(w * w)))
    denom = float(np.sum((r * w) ** 2))
    a2 = float(np.clip(np.sum(r * w) / denom, 1.0, max_inv)) if denom > 0 else max_inv
    err1 = np.sum(((o1 + a1 * r - t) * w) ** 2)
    err2 = np.sum(((a2 * r - t) * w) ** 2)
    if err2 < 0.5 * err1:  # prefer overhead + roofline unless a pure rate fits much better
        return 0.0, a2, a2 == 1.0
    return o1, a1, clamped or a1 == 1.0 and a < 1.0


# --- machine facts --------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _caches() -> list[tuple[str, int]]:
    """(name, bytes) of the data/unified caches of cpu0, smallest first."""
    out = []
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for index in sorted(base.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = (index / "level").read_text().strip()
            size = (index / "size").read_text().strip()
            mult = {"K": 1024, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            out.append((f"L{level}", int(size.rstrip("KMG")) * mult))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda c: c[1])


def _rapl_readable() -> bool:
    for path in Path("/sys/class/powercap").glob("intel-rapl:*/energy_uj"):
        try:
            path.read_text()
            return True
        except OSError:
            continue
    return False


def _host_memory(dev: Device) -> bool:
    return dev.backend == "host" or (dev.backend == "torch" and dev.kind == "cpu")


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --- measurements ---------------------------------------------------------------------

class _Ctx:
    def __init__(self, k: float, quick: bool, repeats: int, progress, task):
        self.k, self.quick, self.repeats = k, quick, repeats
        self.progress, self.task = progress, task
        self.date = datetime.date.today().isoformat()
        self.cpu = cpu_name()
        self.log: list[tuple[str, str, str]] = []  # (device, what, value)

    def src(self, what: str, n: int) -> str:
        return f"calibrated {self.date} on {self.cpu}: {what}, median of {n} ({self.k:g} MAD outliers rejected)"

    def say(self, text: str, advance: float = 0.0) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=text)
            if advance:
                self.progress.advance(self.task, advance)


def _timed(fn, sync, min_s: float) -> float:
    """Seconds per call of fn, looping until a sample lasts at least min_s."""
    n = 1
    while True:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_s or n >= 1 << 16:
            return elapsed / n
        n = max(n * 2, int(n * min_s / max(elapsed, 1e-9) * 1.2))


def _copy_fn(dev: Device, nbytes: int):
    """(copy callable, sync callable, seconds-of-one-copy sampler) for a copy of nbytes."""
    if dev.backend == "opencl":
        from ..backends import opencl

        q = opencl.queue(dev)
        n = max(nbytes // 64, 1)
        src = opencl.cla.zeros(q, n * 16, np.float32)
        dst = opencl.cla.empty_like(src)
        kernel = opencl.cl.Kernel(opencl.program(dev, "calibrate.cl", {}), "copy_f16")

        def sample() -> float:  # device time of one copy (event timestamps)
            evt = kernel(q, (n,), None, src.data, dst.data)
            evt.wait()
            return (evt.profile.end - evt.profile.start) / 1e9

        return sample, (src, dst)
    handle = dev.handle if dev.backend == "torch" else torch.device("cpu")
    src = torch.zeros(max(nbytes // 4, 1), dtype=torch.float32, device=handle)
    dst = torch.empty_like(src)
    one_src, one_dst = src[:1].clone(), dst[:1].clone()
    sync = (lambda: torch.cuda.synchronize(handle)) if handle.type == "cuda" else (lambda: None)

    def sample() -> float:  # a copy's time less the per-call cost of a one-element copy
        t = _timed(lambda: dst.copy_(src), sync, 2e-3)
        return max(t - _timed(lambda: one_dst.copy_(one_src), sync, 1e-3), t / 10)

    return sample, (src, dst)


def measure_memory(dev: Device, ctx: _Ctx) -> tuple[list[MemoryLevel], dict[str, str], list[dict]]:
    """Copy bandwidth over a size sweep, turned into memory levels (fastest first)."""
    top = 256 << 20 if ctx.quick else 512 << 20
    sizes = []
    size = 32 << 10
    while size <= top:
        sizes.append(size)
        size *= 2
    reps = 5 if ctx.quick else 7
    sweep = []
    for nbytes in sizes:
        sample, keep_alive = _copy_fn(dev, nbytes)
        sample()  # warm-up (first touch, kernel build)
        times = [sample() for _ in range(reps)]
        t = robust_median(times, ctx.k)
        sweep.append({"bytes": nbytes, "working_set": 2 * nbytes, "bandwidth": 2 * nbytes / t, "samples": len(times)})
        del keep_alive
    caches = _caches() if dev.kind == "cpu" else []
    levels = _cache_levels(sweep, caches) if caches else _plateaus(sweep)
    capacity_total = dev.info.get("memory_bytes") or dev.info.get("global_memory_bytes") or _physical_memory()
    out, sources = [], {}
    latency_guess = {"L1": 1.5e-9, "L2": 5e-9, "L3": 20e-9}
    for i, group in enumerate(levels):
        last = i == len(levels) - 1
        bw = float(np.median([p["bandwidth"] for p in group]))
        lo, hi = group[0]["working_set"], group[-1]["working_set"]
        if last:
            name = "DRAM" if dev.kind == "cpu" else "global"
            capacity = float(capacity_total)
            cap_src = f"{'physical memory' if _host_memory(dev) else 'device global memory size'} as reported by the OS/driver"
        else:
            # the cache the plateau's largest working set fits best
            name = next((c for c, b in caches if hi <= b), f"cache{i + 1}")
            capacity = float(hi)
            cap_src = ctx.src(f"largest copy working set (src + dst) on the {fmt_bytes(bw, '/s')} plateau "
                              f"({fmt_bytes(lo)} .. {fmt_bytes(hi)})", len(group))
        if any(o.name == name for o in out):
            name = f"{name}.{i}"
        out.append(MemoryLevel(name, capacity, bw, latency_guess.get(name.split('.')[0], 100e-9)))
        sources[f"memory.{name}.capacity"] = cap_src
        sources[f"memory.{name}.bandwidth"] = ctx.src(
            f"copy bandwidth (read + write) over working sets {fmt_bytes(lo)} .. {fmt_bytes(hi)}, median of the "
            f"plateau's {len(group)} sizes, each the robust median of {reps} copies", reps)
        sources[f"memory.{name}.latency"] = ("estimate, not measured by hetero calibrate: typical x86 load-to-use "
                                             "latency for this level (used only by ops without a calibrated fit)")
    return out, sources, sweep


def _cache_levels(sweep: list[dict], caches: list[tuple[str, int]]) -> list[list[dict]]:
    """CPU levels from the OS's cache sizes: the sizes whose working set lies between the
    previous cache and this one form its plateau; working sets beyond twice the last cache
    form DRAM; adjacent levels within 25% in bandwidth are merged."""
    bounds = [(name, size) for name, size in caches if name != "L1"]
    groups: list[list[dict]] = []
    lower = next((size for name, size in caches if name == "L1"), 0)
    for name, size in bounds:
        group = [p for p in sweep if lower < p["working_set"] <= size]
        if group:
            groups.append(group)
        lower = size
    dram = [p for p in sweep if p["working_set"] >= 2 * lower]
    groups.append(dram or sweep[-1:])
    out: list[list[dict]] = []
    for g in groups:
        med = float(np.median([p["bandwidth"] for p in g]))
        if out:
            prev = float(np.median([p["bandwidth"] for p in out[-1]]))
            if max(med, prev) / min(med, prev) <= LEVEL_GAP or med > prev:  # too close, or not slower
                out[-1] = out[-1] + g
                continue
        out.append(g)
    return out


def _plateaus(sweep: list[dict]) -> list[list[dict]]:
    """Consecutive sizes grouped where bandwidth stays within 25% of the group's median; then
    adjacent groups merged until each differs by more than 25% from the next."""
    groups: list[list[dict]] = []
    for point in sweep:
        if groups:
            med = float(np.median([p["bandwidth"] for p in groups[-1]]))
            if max(med, point["bandwidth"]) / min(med, point["bandwidth"]) <= LEVEL_GAP:
                groups[-1].append(point)
                continue
        groups.append([point])
    # a lone transition size between two plateaus joins its nearer neighbour
    merged = True
    while merged and len(groups) > 1:
        merged = False
        meds = [float(np.median([p["bandwidth"] for p in g])) for g in groups]
        for i in range(len(groups) - 1):
            a, b = meds[i], meds[i + 1]
            if max(a, b) / min(a, b) <= LEVEL_GAP or min(len(groups[i]), len(groups[i + 1])) == 1 and len(groups) > 2:
                if len(groups[i]) == 1 and i > 0 and len(groups[i + 1]) > 1 and max(a, b) / min(a, b) > LEVEL_GAP:
                    # a lone point: join the neighbour with the closer bandwidth
                    prev = meds[i - 1]
                    j = i - 1 if abs(math.log(a / prev)) < abs(math.log(a / b)) else i + 1
                    lo, hi = sorted((i, j))
                    groups[lo:hi + 1] = [groups[lo] + groups[hi]]
                else:
                    groups[i:i + 2] = [groups[i] + groups[i + 1]]
                merged = True
                break
    # levels must get slower as they grow: a faster group after a slower one joins it
    out: list[list[dict]] = []
    for g in groups:
        med = float(np.median([p["bandwidth"] for p in g]))
        if out and med >= float(np.median([p["bandwidth"] for p in out[-1]])) / LEVEL_GAP:
            out[-1] = out[-1] + g
        else:
            out.append(g)
    return out


def fmt_bytes(n: float, suffix: str = "") -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}{suffix}"
    return f"{n:.3g} B{suffix}"


def measure_flops(ctx: _Ctx) -> tuple[float, str]:
    """Peak float32 FLOP/s of the CPU: a torch float32 matmul (all torch threads)."""
    n = 512 if ctx.quick else 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.matmul(a, b, out=c)
    reps = 5 if ctx.quick else 9
    times = [_timed(lambda: torch.matmul(a, b, out=c), lambda: None, 0.02) for _ in range(reps)]
    t = robust_median(times, ctx.k)
    return 2 * n ** 3 / t, ctx.src(f"torch float32 matmul {n}x{n} ({torch.get_num_threads()} threads)", reps)


def measure_launch(dev: Device, ctx: _Ctx) -> tuple[float, str]:
    reps = 9 if ctx.quick else 15
    if dev.backend == "opencl":
        from ..backends import opencl

        q = opencl.queue(dev)
        src = opencl.cla.zeros(q, 16, np.float32)
        dst = opencl.cla.empty_like(src)
        kernel = opencl.cl.Kernel(opencl.program(dev, "calibrate.cl", {}), "copy_f16")
        kernel(q, (1,), None, src.data, dst.data).wait()

        def tiny():
            kernel(q, (1,), None, src.data, dst.data).wait()

        what = "a one-work-item kernel, enqueue to completion (host clock)"
    elif dev.backend == "host":
        from ..backends import host

        scores = np.zeros((1, 16), np.float32)
        host._host.topk(scores, 1)

        def tiny():
            host._host.topk(scores, 1)

        what = "a 16-element top-k through the C++ shim (host clock)"
    else:
        x = torch.zeros(1, device=dev.handle)
        y = torch.empty_like(x)

        def tiny():
            torch.add(x, x, out=y)

        what = "a one-element torch add (host clock)"
    times = [_timed(tiny, lambda: None, 2e-3) for _ in range(reps)]
    return robust_median(times, ctx.k), ctx.src(what, reps)


def measure_link(dev: Device, ctx: _Ctx) -> tuple[LinkProfile, list[dict]]:
    """Upload/download through the backend at several sizes (wall time to completion, what
    the caller pays), fitted to latency + bytes / bandwidth."""
    from ..backends import BACKENDS

    backend = BACKENDS[dev.backend]
    sizes = [4 << 10, 256 << 10, 4 << 20, 32 << 20] if ctx.quick else [4 << 10, 64 << 10, 1 << 20, 8 << 20, 32 << 20, 128 << 20]
    reps = 5 if ctx.quick else 7
    points = []
    for nbytes in sizes:
        tensor = torch.ones(nbytes // 4, dtype=torch.float32)
        arr, _ = backend.upload(tensor, dev)
        backend.download(arr)
        ups, downs = [], []
        for _ in range(reps):
            start = time.perf_counter()
            arr, _ = backend.upload(tensor, dev)
            if hasattr(arr, "finish"):
                arr.finish()
            ups.append(time.perf_counter() - start)
            start = time.perf_counter()
            backend.download(arr)
            downs.append(time.perf_counter() - start)
        points.append({"bytes": nbytes, "upload_s": robust_median(ups, ctx.k), "download_s": robust_median(downs, ctx.k)})
    # latency: the smallest size (its bytes take well under a microsecond); bandwidth: the
    # largest sizes' bytes over their time less that latency, upload and download together
    latency = robust_median([points[0]["upload_s"], points[0]["download_s"]], ctx.k)
    rates = [p["bytes"] / max(p[d] - latency, 1e-9) for p in points[-2:] for d in ("upload_s", "download_s")]
    bandwidth = robust_median(rates, ctx.k)
    src = ctx.src(f"upload/download through the {dev.backend} backend, wall time to completion (what the caller "
                  f"pays); latency from {fmt_bytes(sizes[0])} transfers, bandwidth from the {fmt_bytes(sizes[-2])} "
                  f"and {fmt_bytes(sizes[-1])} ones less that latency", reps)
    name = f"{dev.id} host link"
    link = LinkProfile(name, "host", bandwidth, latency, 0.0, (dev.id, "host"),
                       {"bandwidth": src, "latency": src,
                        "energy_per_byte": "modeled, no RAPL: about 20 pJ/bit per DRAM access (Horowitz, ISSCC 2014: "
                                           "1.3-2.6 nJ per 64-bit DRAM access) x read + write of a host-side copy"})
    link.energy_per_byte = 2 * 20e-12 * 8
    return link, points


# --- operations -----------------------------------------------------------------------

def op_seconds(record) -> float:
    """What a step record cost its caller: device time, or the host's issue time if longer."""
    return max(record.timing.wall_s, record.seconds)


def calibration_grid(quick: bool) -> list[dict]:
    """Shapes the op fits are measured at (the bench's held-out grid avoids these)."""
    if quick:
        return [dict(batch=1, kv_heads=8, q_heads=32, context=2048), dict(batch=1, kv_heads=8, q_heads=32, context=24576),
                dict(batch=2, kv_heads=8, q_heads=16, context=4096)]
    return ([dict(batch=1, kv_heads=8, q_heads=32, context=c) for c in (2048, 16384, 65536)]
            + [dict(batch=2, kv_heads=8, q_heads=16, context=c) for c in (4096, 24576)]
            + [dict(batch=1, kv_heads=4, q_heads=8, context=49152)])


def op_placements(device_ids: list[str], method=None) -> list[dict[str, str]]:
    """All-on-d for every device (fused ops), and splits of relevancy and retrieval across
    devices (unfused ops of every device). With `method`, a step it cannot run on its device
    runs on the first listed device that can (a placement no device completes is left out)."""
    out = [{s.value: d for s in STEPS} for d in device_ids]
    n = len(device_ids)
    if n > 1:
        for i, d in enumerate(device_ids):
            out.append({"prepare": d, "relevancy": d, "retrieval": device_ids[(i + 1) % n], "apply": d})
    if method is None:
        return out
    runs = {(s.value, d): not method.why_not(s, get_device(d)) for s in STEPS for d in device_ids}
    runnable = []
    for placement in out:
        placement = {s: d if runs[(s, d)] else next((e for e in device_ids if runs[(s, e)]), None)
                     for s, d in placement.items()}
        if None not in placement.values() and placement not in runnable:
            runnable.append(placement)
    return runnable


def calibratable(method) -> bool:
    """Whether calibration can run the decode steps of `method` (a class or an instance): its
    step appends nothing (STEP_APPENDS 0), or it sets TOKEN_AXES or has its own `decode_inputs`."""
    from ..methods import Method

    cls = method if isinstance(method, type) else type(method)
    return not cls.STEP_APPENDS or bool(cls.TOKEN_AXES) or cls.decode_inputs is not Method.decode_inputs


def method_shapes(method, shape: dict) -> dict:
    """A grid shape in `method`'s terms, defaults filled in: the grid's `context` is the
    method's CONTEXT_SHAPE (tokens, entries, documents), head_dim 128, float32; grid
    shapes the method does not take are left out."""
    given = {method.CONTEXT_SHAPE if k == "context" else k: v for k, v in shape.items()}
    takes = method.shapes()
    return method.shapes(**{k: v for k, v in {**given, "head_dim": 128, "dtype": "float32"}.items() if k in takes})


def decode_case(method, shape: dict, seed: int = 0):
    """(prepare inputs, query, appends) of `method` at a grid shape: its `example_inputs` and 4
    one-entry appends from its `decode_inputs` (none where a decode step appends nothing)."""
    inputs, query = method.example_inputs(method_shapes(method, shape), seed)
    return inputs, query, decode_inputs_for(method, inputs, seed)


def decode_inputs_for(method, inputs, seed: int = 0) -> list[tuple]:
    """4 one-entry appends for decode steps on memory prepared from `inputs` (none where a
    decode step appends nothing)."""
    return method.decode_inputs(inputs, 4, seed) if method.STEP_APPENDS else []


def measure_decode(method, placement, inputs, query, new, repeats: int, warmup: int = 2, pipe=None, memory=None):
    """Decode steps (append the next of `new`, if any, + step) of one placement, with the
    memory prepared from `inputs` unless `pipe` and `memory` are given. Returns
    {"ops": {(device, op): [seconds per sample, one list per occurrence order]}, "wall": [s],
     "pipe", "memory"}; per-op samples pool every occurrence of the op within a decode step."""
    if pipe is None:
        pipe = Pipeline(method, placement)
        memory = pipe.prepare(*inputs)
    ops: dict[tuple[str, str], list[float]] = {}
    walls = []
    for i in range(warmup + repeats):
        runs = []
        if new:
            pipe.append(memory, *new[i % len(new)])
            runs.append(pipe.last_run)
        pipe.step(query, memory)
        runs.append(pipe.last_run)
        if i < warmup:
            continue
        walls.append(sum(run.wall_s for run in runs))
        for r in (record for run in runs for record in run.steps):
            ops.setdefault((r.device, r.op), []).append(op_seconds(r))
    return {"ops": ops, "wall": walls, "pipe": pipe, "memory": memory}


def measure_round_robin(method, runs: list[tuple], inputs, query, new, rounds: int, steps: int, seed: int = 0,
                        after_round=None) -> list[dict]:
    """Decode steps of several prepared placements, `runs` = [(pipe, memory)], visited
    round-robin in a new random order each round (1 untimed + `steps` timed decode steps a
    visit): the machine's speed drifts for minutes at a time on shared cores, and
    interleaving spreads a slow spell over every placement instead of biasing a few. A memory
    shared by several pipelines is re-bound to each before its visit. Returns per run
    {"ops": {(device, op): [s]}, "wall": [s]}; `after_round(r)` is called after round r."""
    out: list[dict] = [{"ops": {}, "wall": []} for _ in runs]
    rng = np.random.default_rng(seed)
    for r in range(rounds):
        for i in rng.permutation(len(runs)):
            pipe, memory = runs[i]
            memory.placement = pipe.placement
            m = measure_decode(method, None, inputs, query, new, steps, warmup=1, pipe=pipe, memory=memory)
            for key, samples in m["ops"].items():
                out[i]["ops"].setdefault(key, []).extend(samples)
            out[i]["wall"] += m["wall"]
        if after_round is not None:
            after_round(r)
    return out


def workload_for(method, placement: dict[str, str], shapes: dict):
    devs = {s: get_device(placement[s.value]) for s in STEPS}
    backends = {s: d.backend for s, d in devs.items()}
    return method.workload(shapes, backends, method.fused(devs), appended=method.STEP_APPENDS, query=True), devs


def task_rooflines(method, placement: dict[str, str], shapes: dict, profiles: dict[str, DeviceProfile]):
    """{(device, op): (roofline seconds of one occurrence, access pattern)} for a decode step's workload."""
    work, devs = workload_for(method, placement, shapes)
    out: dict[tuple[str, str], tuple[float, str]] = {}
    for task in work.tasks:
        dev = devs[task.step].id
        out[(dev, task.op)] = roofline(task, profiles[dev])[0], task.pattern
    return out


def measure_ops(method, device_ids: list[str], profiles: dict[str, DeviceProfile], ctx: _Ctx,
                grid: list[dict], per_visit: int = 2) -> tuple[list[dict], list[dict]]:
    """Points (method, device, op, pattern, shapes, roofline, measured seconds, samples) over
    the grid, and the whole decode steps (method, placement, shapes, wall seconds, samples).
    At each shape every placement is prepared once, then measured round-robin
    (`measure_round_robin`) until each has `ctx.repeats` samples."""
    points, steps = [], []
    placements = op_placements(device_ids, method)
    rounds = max(2, -(-ctx.repeats // per_visit))
    for shape in grid:
        inputs, query, new = decode_case(method, shape)
        shapes = method_shapes(method, shape)
        roofs: dict[tuple[str, str], tuple[float, str]] = {}
        where = f"{method.name} ops at {method.CONTEXT_SHAPE} {shape['context']:,}, batch {shape['batch']}"
        runs = []
        for placement in placements:
            ctx.say(f"{where}: preparing {_label(placement)}")
            pipe = Pipeline(method, placement)
            runs.append((pipe, pipe.prepare(*inputs)))
            roofs.update(task_rooflines(method, placement, shapes, profiles))
        ctx.say(f"{where}: {rounds} rounds over {len(runs)} placements")
        measured = measure_round_robin(method, runs, inputs, query, new, rounds, per_visit,
                                       after_round=lambda r: ctx.say("", advance=len(runs) / rounds))
        seen: dict[tuple[str, str], list[float]] = {}
        for m in measured:
            for key, samples in m["ops"].items():
                seen.setdefault(key, []).extend(samples)
        steps += [{"method": method.name, "placement": placement, "shapes": shapes, "grid_shape": dict(shape),
                   "wall_s": robust_median(m["wall"], ctx.k), "samples": len(m["wall"])}
                  for placement, m in zip(placements, measured)]
        for (dev, op), samples in seen.items():
            if (dev, op) not in roofs:
                continue
            roof, pattern = roofs[(dev, op)]
            points.append({"method": method.name, "device": dev, "op": op, "pattern": pattern, "shapes": dict(shape),
                           "roofline_s": roof, "measured_s": robust_median(samples, ctx.k), "samples": len(samples)})
        runs.clear()
        del inputs, query, new
        gc.collect()
    return points, steps


def fit_handoffs(steps: list[dict], methods: dict, built: dict[str, DeviceProfile],
                 links: list[LinkProfile]) -> dict[str, dict]:
    """Per device, the time a decode step loses when a task runs there right after one on
    another device, beyond what the op fits and transfers predict: least squares (soft L1,
    so a stray point counts little) of measured - predicted step time on the number of device
    changes into each device, with a free offset per method and shape (the runtime's own
    per-call cost, which every placement there pays). {device: {"seconds", "changes", "steps"}}."""
    from scipy.optimize import least_squares

    from .model import Node, System, device_changes, evaluate

    by_link = {link.name: link for link in links}
    nodes = [Node(d, prof, get_device(d).backend, False, by_link.get(prof.host_link)) for d, prof in built.items()]
    system = System(nodes, "torch:cpu" if "torch:cpu" in built else next(iter(built)))
    devices = list(built)
    groups: dict[tuple, int] = {}
    rows, residuals = [], []
    for rec in steps:
        method = methods[rec["method"]]
        work, devs = workload_for(method, rec["placement"], rec["shapes"])
        if any(devs[s].id not in built for s in STEPS):
            continue
        est = evaluate(method, work, {s: devs[s].id for s in STEPS}, system)
        changes = device_changes([devs[t.step].id for t in work.tasks])
        into = [sum(1 for _, b in changes if b == d) for d in devices]
        group = groups.setdefault((rec["method"], tuple(sorted(rec["grid_shape"].items()))), len(groups))
        rows.append((group, into))
        residuals.append(rec["wall_s"] - est.serial_seconds)
    if not rows:
        return {}
    x = np.zeros((len(rows), len(groups) + len(devices)))
    for i, (group, into) in enumerate(rows):
        x[i, group] = 1.0
        x[i, len(groups):] = into
    y = np.asarray(residuals)
    scale = float(np.median(np.abs(y))) or 1e-4
    lower = np.r_[np.full(len(groups), -np.inf), np.zeros(len(devices))]
    fit = least_squares(lambda c: (x @ c - y) / scale, np.zeros(x.shape[1]), bounds=(lower, np.inf), loss="soft_l1")
    changes = x[:, len(groups):].sum(axis=0)
    return {d: {"seconds": float(fit.x[len(groups) + j]), "changes": int(changes[j]), "steps": len(rows)}
            for j, d in enumerate(devices) if changes[j] > 0}


def _label(placement: dict[str, str]) -> str:
    ids = set(placement.values())
    if len(ids) == 1:
        return f"all on {next(iter(ids))}"
    return f"relevancy={placement['relevancy']}, retrieval={placement['retrieval']}"


def fit_ops(points: list[dict], ctx: _Ctx) -> dict[str, dict]:
    """{device: {"Method.op": fit dict}} from measured points."""
    out: dict[str, dict] = {}
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["device"], f"{p['method']}.{p['op']}"), []).append(p)
    for (dev, op), group in sorted(groups.items()):
        fit = robust_fit([p["roofline_s"] for p in group], [p["measured_s"] for p in group], ctx.k)
        fit["shapes"] = len(group)
        fit["samples"] = sum(p["samples"] for p in group)
        fit["pattern"] = group[0]["pattern"]
        out.setdefault(dev, {})[op] = fit
    return out


# --- the whole calibration ------------------------------------------------------------

def _keep_other_fits(path: Path, built: dict[str, DeviceProfile], methods: set[str]) -> dict[str, list[str]]:
    """Carry the op fits of methods not calibrated now over from the profile at `path` (a
    `--methods` run refreshes those methods and keeps the rest), with their own sources.
    Returns {device: [kept "Method.op", ...]}."""
    if not path.is_file():
        return {}
    try:
        old = _profiles.load(path)
    except _profiles.ProfileError:
        return {}  # an unreadable old profile is replaced, not merged
    kept: dict[str, list[str]] = {}
    for dev_id, prof in built.items():
        before = old.devices.get(dev_id)
        if before is None:
            continue
        for op, fit in before.ops.items():
            if op.split(".")[0] in methods or op in prof.ops:
                continue
            prof.ops[op] = fit
            for field_name in ("overhead", "efficiency"):
                key = f"ops.{op}.{field_name}"
                if key in before.sources:
                    prof.sources[key] = before.sources[key]
            kept.setdefault(dev_id, []).append(op)
    return kept


POWER_SOURCE = ("modeled, no RAPL: {what} (a ~200 W TDP server Xeon with ~40 vCPUs is ~5 W per vCPU busy; "
                "idle ~30% of that); CPU-resident devices share part 'host-cpu', so the CPU is counted once")


def calibrate(devices=None, methods=None, quick: bool = False, path=None, progress=None, repeats: int | None = None,
              grid: list[dict] | None = None, k: float = 3.0) -> Profiles:
    """Measure the present devices and write their profiles (TOML) to `path` (default
    `hetero.cost.profiles.MACHINE_PROFILE`), then reload the profile registry.

    Args:
        devices: device ids to calibrate (default every present device; modeled ones are skipped).
        methods: the methods whose ops are fitted: registered names or Method objects (default
            every registered method calibration can run, see `calibratable`, with its default
            options; the others are listed in `.report["skipped_methods"]`). Fits of other
            methods already in the profile at `path` are kept (`.report["kept_fits"]`).
        quick: a smaller sweep and grid.
        path: where to write the TOML.
        progress: a rich Progress to report to (optional).
        repeats: decode steps per placement and shape (default 7, 5 with quick).
        grid: shapes for the op fits (default `calibration_grid(quick)`).
        k: outlier rejection threshold in scaled MADs.
    Returns the Profiles written; `.report` on it holds what was measured.
    """
    from ..methods import METHODS, get_method

    start = time.perf_counter()
    skipped = []
    if not methods:  # every registered method calibration can run
        methods = [name for name, cls in METHODS.items() if calibratable(cls)]
        skipped = [name for name in METHODS if name not in methods]
    methods = [get_method(m) if isinstance(m, str) else m for m in methods]
    for method in methods:
        if not calibratable(method):
            raise ValueError(f"{method.name} cannot be calibrated: its decode step appends, and it sets no "
                             f"TOKEN_AXES and has no decode_inputs")
    devs = [get_device(d) for d in devices] if devices else list(present_devices())
    devs = [d for d in devs if not d.info.get("modeled")]
    if not devs:
        raise ValueError("no present device to calibrate")
    repeats = repeats or (5 if quick else 7)
    grid = grid if grid is not None else calibration_grid(quick)
    for method in methods:  # every shape valid for every method (e.g. context >= DSA's top_k), before measuring
        for shape in grid:
            method_shapes(method, shape)
    ids = [d.id for d in devs]
    total = 3 * len(devs) + 1 + sum(len(grid) * len(op_placements(ids, m)) for m in methods) + 1
    task = progress.add_task("calibrating", total=total) if progress is not None else None
    ctx = _Ctx(k, quick, repeats, progress, task)
    report: dict = {"date": ctx.date, "cpu": ctx.cpu, "devices": ids, "rapl_readable": _rapl_readable(),
                    "quick": quick, "repeats": repeats, "grid": grid,
                    "methods": [m.name for m in methods], "skipped_methods": skipped, "memory_sweeps": {},
                    "links": {}}

    ctx.say("peak FLOP/s (torch float32 matmul)")
    flops, flops_src = measure_flops(ctx)
    ctx.say("", advance=1)
    host_sweep = None
    built: dict[str, DeviceProfile] = {}
    links: list[LinkProfile] = []
    for dev in devs:
        sources: dict[str, str] = {}
        ctx.say(f"{dev.id}: memory levels (copy sweep)")
        if _host_memory(dev) and host_sweep is not None:  # torch:cpu and host: one memory
            levels, level_src, sweep = host_sweep
            level_src = {k2: v + " (host memory, measured once for torch:cpu and host with torch copies)"
                         for k2, v in level_src.items()}
        else:
            levels, level_src, sweep = measure_memory(dev if dev.backend != "host" else get_device("torch:cpu"), ctx)
            if _host_memory(dev):
                host_sweep = (levels, level_src, sweep)
        sources.update(level_src)
        report["memory_sweeps"][dev.id] = sweep
        ctx.say(f"{dev.id}: launch latency", advance=1)
        launch, sources["launch"] = measure_launch(dev, ctx)
        ctx.say(f"{dev.id}: link", advance=1)
        if dev.kind == "cpu":
            sources["compute.float32"] = flops_src if dev.backend != "opencl" else \
                flops_src.replace("torch float32 matmul", "same CPU as torch:cpu (PoCL runs on it): torch float32 matmul")
            compute = {"float32": flops}
        else:
            compute = {"float32": flops * 10}
            sources["compute.float32"] = "estimate: not measured for non-CPU devices by this calibration; 10x the CPU"
        host_link = None
        if not _host_memory(dev):
            link, lpoints = measure_link(dev, ctx)
            links.append(link)
            host_link = link.name
            report["links"][link.name] = {"bandwidth": link.bandwidth, "latency": link.latency, "points": lpoints}
        ctx.say("", advance=1)
        cpu = dev.kind == "cpu"
        idle, active = (3.0, 10.0) if cpu else (30.0, 150.0)
        what = ("2 vCPUs of this CPU: 10 W busy, 3 W idle" if cpu else
                "a non-CPU device: 150 W busy, 30 W idle, a rough accelerator figure")
        sources["idle_power"] = sources["active_power"] = POWER_SOURCE.format(what=what)
        built[dev.id] = DeviceProfile(
            name=dev.id, title=dev.name, kind=dev.kind if dev.kind in _profiles.KINDS else "accelerator",
            launch=launch, idle_power=idle, active_power=active, compute=compute, memory=levels,
            efficiency=dict(DEFAULT_EFFICIENCY), emulate_on=dev.backend, host_link=host_link,
            part="host-cpu" if cpu else "", sources=sources)

    # op fits against the uncalibrated (no ops) rooflines just measured
    points, steps = [], []
    for method in methods:
        method_points, method_steps = measure_ops(method, ids, built, ctx, grid)
        points += method_points
        steps += method_steps
    fits = fit_ops(points, ctx)
    ctx.say("fitting")
    report["op_points"] = points
    report["fits"] = {d: {op: {k2: v for k2, v in f.items() if k2 != "rel_errors"} | {
        "median_abs_rel_error": float(np.median(np.abs(f["rel_errors"])))} for op, f in fs.items()}
        for d, fs in fits.items()}
    for dev_id, prof in built.items():
        by_pattern: dict[str, list[float]] = {}
        for op, fit in fits.get(dev_id, {}).items():
            note = (" (the free fit gave efficiency > 1: the roofline's level bandwidth is underestimated for this "
                    "op, efficiency kept at 1 and the overhead absorbs the rest)" if fit["clamped"] else "")
            src = ctx.src(f"time = overhead + roofline / efficiency fitted to decode steps at {fit['shapes']} shapes "
                          f"({fit['samples']} samples; least squares on relative error, {fit['kept']}/{fit['n']} shapes "
                          f"kept after iterative {k:g}-MAD rejection){note}", fit["samples"])
            prof.ops[op] = _profiles.OpFit(fit["overhead"], min(max(fit["efficiency"], 1e-4), 1.0))
            prof.sources[f"ops.{op}.overhead"] = src
            prof.sources[f"ops.{op}.efficiency"] = src
            by_pattern.setdefault(fit["pattern"], []).append(prof.ops[op].efficiency)
        for pattern in PATTERNS:
            if by_pattern.get(pattern):
                prof.efficiency[pattern] = float(np.median(by_pattern[pattern]))
                prof.sources[f"efficiency.{pattern}"] = (
                    f"calibrated {ctx.date} on {ctx.cpu}: median of the fitted efficiencies of this device's "
                    f"{pattern} ops ({len(by_pattern[pattern])}, of {', '.join(m.name for m in methods)})")
            else:
                prof.sources[f"efficiency.{pattern}"] = (
                    f"default {DEFAULT_EFFICIENCY[pattern]:g}: no {pattern} op of "
                    f"{', '.join(m.name for m in methods)} was fitted on this device (hetero calibrate)")
    # handoffs: what whole decode steps lose at device changes beyond the fitted ops
    handoff = fit_handoffs(steps, {m.name: m for m in methods}, built, links)
    report["handoffs"] = handoff
    report["decode_steps"] = [{k2: v for k2, v in rec.items() if k2 != "shapes"} for rec in steps]
    for dev_id, prof in built.items():
        h = handoff.get(dev_id)
        prof.handoff = h["seconds"] if h else 0.0
        prof.sources["handoff"] = (
            f"calibrated {ctx.date} on {ctx.cpu}: fitted to {h['steps']} whole decode steps ({h['changes']} changes "
            f"into this device) as measured minus predicted step time per change, with an offset per method and "
            f"shape (soft-L1 least squares, >= 0)") if h else (
            f"0: no decode step measured by hetero calibrate {ctx.date} changed into this device")
    ctx.say("writing", advance=1)
    path = Path(path) if path is not None else _profiles.MACHINE_PROFILE
    path.parent.mkdir(parents=True, exist_ok=True)
    report["kept_fits"] = _keep_other_fits(path, built, {m.name for m in methods})
    header = (f"# hetero calibrate, {ctx.date} on {ctx.cpu} ({os.cpu_count()} CPUs), devices {', '.join(ids)}"
              f"{' (quick)' if quick else ''}\n# RAPL readable: {report['rapl_readable']}; power is modeled.\n\n")
    text = header + _profiles.dumps(list(built.values()), links)
    path.write_text(text)
    _profiles.reload()
    result = _profiles.load(path)  # what was written reads back
    report["path"] = str(path)
    report["seconds"] = time.perf_counter() - start
    result.report = report
    return result
