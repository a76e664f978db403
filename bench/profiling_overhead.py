"""What profiling costs a pipeline: per decode step, profiling off vs on, per placement.

Small shapes (the runtime's own cost matters most where the steps are short): 1 sequence,
2 KV heads x 4 query heads, head_dim 128, 4,096 tokens, budget 512 tokens, fp32. Off and on
are interleaved step by step so machine noise falls on both alike; each figure is the median
over many steps. "Off" also reports the hook itself: the one check of an empty list that a
pipeline call makes when no profile is open, timed alone. The post-processing a profile does
afterwards (summary, trace export) is reported per recorded call.

    python bench/profiling_overhead.py [--steps 400]

Writes bench/results/profiling_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero import runtime  # noqa: E402
from hetero.demo import placements_present  # noqa: E402
from hetero.methods import PageSparseAttention  # noqa: E402

SHAPES = dict(context=4096, kv_heads=2, q_heads=8, head_dim=128, dtype="float32")


def measure(name, placement, steps: int) -> dict:
    method = PageSparseAttention(budget_tokens=512)
    (keys, values), query = method.example_inputs(SHAPES)
    pipe = hetero.Pipeline(method, placement, validate=False)
    memory = pipe.prepare(keys, values)
    for _ in range(5):
        pipe.step(query, memory)
    off, on = [], []
    prof = hetero.profile(meters=False)
    for _ in range(steps):
        start = time.perf_counter()
        pipe.step(query, memory)
        off.append(time.perf_counter() - start)
        runtime.PROFILERS.append(prof)  # the block's own open/close is not per step: time the call alone
        start = time.perf_counter()
        pipe.step(query, memory)
        on.append(time.perf_counter() - start)
        runtime.PROFILERS.remove(prof)
    prof.start_ns, prof.end_ns = prof.calls[0].record.start_ns, time.perf_counter_ns()
    start = time.perf_counter()
    prof.summary()
    summary_s = time.perf_counter() - start
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_trace(Path(tmp) / "trace.json")
    trace_s = time.perf_counter() - start
    off_m, on_m = statistics.median(off), statistics.median(on)
    return dict(placement=name, detail=repr(pipe.placement), steps=steps, off_s=off_m, on_s=on_m,
                added_s=on_m - off_m, added_ratio=on_m / off_m - 1,
                summary_per_call_s=summary_s / len(prof.calls), trace_per_call_s=trace_s / len(prof.calls))


def hook_cost() -> float:
    """Seconds of the check a pipeline call makes when no profile is open."""
    assert not runtime.PROFILERS
    n = 1_000_000
    empty = timeit.timeit("if PROFILERS: pass", globals={"PROFILERS": runtime.PROFILERS}, number=n) / n
    return empty


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = [measure(name, placement, args.steps) for name, placement in placements_present().items()]
    hook = hook_cost()
    payload = {"machine": machine(), "shapes": SHAPES, "budget_tokens": 512, "steps": args.steps,
               "hook_s": hook, "results": rows, "seconds": time.perf_counter() - started}
    table = md_table(
        ["placement", "step, profiling off", "step, profiling on", "added per step", "added", "hook when off",
         "summary per call", "trace per call"],
        [[r["placement"], f"{r['off_s'] * 1e6:.0f} us", f"{r['on_s'] * 1e6:.0f} us", f"{r['added_s'] * 1e6:.1f} us",
          f"{r['added_ratio']:+.1%}", f"{hook * 1e9:.0f} ns ({hook / r['off_s']:.1e} of a step)",
          f"{r['summary_per_call_s'] * 1e6:.0f} us", f"{r['trace_per_call_s'] * 1e6:.0f} us"] for r in rows])
    info = payload["machine"]
    markdown = (f"# Profiling overhead\n\n{info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']}, "
                f"{info['date']}. Page-sparse decode step, {SHAPES}, budget 512 tokens, validate=False; medians of "
                f"{args.steps} steps, off and on interleaved. 'hook when off' is the only work a pipeline call does "
                f"for profiling when no profile is open.\n\n" + table)
    json_path, md_path = write_results("profiling_overhead", payload, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
