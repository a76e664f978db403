"""Sparse-attention decode step vs dense attention: every registered method, per placement, 8K-128K.

Each method (`--methods`, default every sparse-attention one registered in hetero.methods.METHODS) runs with
its default options on its example inputs at its default shapes, fp32: 1 sequence, 8 KV
heads x 4 query heads, head_dim 128 (page-sparse: page 16, budget 2,048 tokens; dsa: top-k
2,048 tokens). For every placement present that the method can run it reports:

- the median decode-step wall time and each step's device time;
- the memory-processing share of the decode step: relevancy + retrieval device time and the
  transfers feeding them, over the step's wall time (median over the steps; the definition
  of `prof.summary().memory_share` in hetero.profiling.report, applied per step);
- the bandwidth efficiency of relevancy + retrieval: the bytes they move by the method's
  cost-model workload (`method.workload`: the RELEVANCY and RETRIEVAL tasks' accesses), over
  their measured device time, as a fraction of the copy bandwidth measured on that device in
  the same run;
- the runtime's own Python overhead per step (and with validate=False).

The dense baseline is the fastest of several torch formulations, timed in the same run.

    python bench/sparse_attention.py                           # every method, 8K / 32K / 128K
    python bench/sparse_attention.py --methods dsa --contexts 8192 --repeats 3

Writes bench/results/<name>.{json,md} (default name sparse_attention).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, median_time, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero.backends import BACKENDS  # noqa: E402
from hetero.demo import placements_present  # noqa: E402
from hetero.methods import METHODS, dense_attention, get_method  # noqa: E402
from hetero.records import MEMORY_STEPS  # noqa: E402
from hetero.runtime import Placement, PlacementError, Step  # noqa: E402


def dense_variants(keys, values, query):
    """Dense attention formulations; the fastest one on this machine is the baseline."""
    b, h, s, d = keys.shape
    q4 = query.view(b, h, -1, d)
    scale = 1 / math.sqrt(d)

    def matmul_gqa():
        w = torch.softmax(torch.matmul(q4, keys.transpose(-1, -2)) * scale, -1)
        return torch.matmul(w, values)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(query[:, :, None], keys, values, enable_gqa=True)

    def einsum_gqa():
        w = torch.softmax(torch.einsum("bhgd,bhsd->bhgs", q4, keys) * scale, -1)
        return torch.einsum("bhgs,bhsd->bhgd", w, values)

    return {"einsum_gqa": einsum_gqa, "matmul_gqa": matmul_gqa, "sdpa_enable_gqa": sdpa_gqa,
            "sdpa_grouped (hetero.methods.dense_attention)": lambda: dense_attention(keys, values, query)}


def memory_bytes(method, shapes, placement) -> float:
    """Bytes relevancy + retrieval move in one decode step, by the method's cost-model workload."""
    backends = {s: placement[s].backend for s in hetero.STEPS}
    work = method.workload(shapes, backends, method.fused(placement), appended=0)
    return sum(a.nbytes for t in work.tasks if t.step in (Step.RELEVANCY, Step.RETRIEVAL) for a in t.accesses)


def timed_steps(pipe, query, memory, repeats):
    """(wall seconds, run record) of `repeats` decode steps."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.step(query, memory)
        out.append((time.perf_counter() - start, pipe.last_run))
    return out


def overhead_s(wall, run) -> float:
    """The runtime's own cost: wall time not spent inside an implementation or a copy."""
    return wall - sum(r.timing.wall_s for r in run.steps) - sum(t.timing.wall_s for t in run.transfers)


def bench_placement(name, placement, method, shapes, inputs, query, repeats, copy_bw):
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(*inputs)
    for _ in range(2):  # warm-up: kernel builds, lengths moved once
        pipe.step(query, memory)
    steps = timed_steps(pipe, query, memory, repeats)
    walls = [w for w, _ in steps]
    per_step = {}
    for _, run in steps:
        for step, seconds in run.by_step().items():
            per_step.setdefault(step, []).append(seconds)
    rr = statistics.median(sum(s for k, s in run.by_step().items() if k in MEMORY_STEPS) for _, run in steps)
    pipe.validate = False  # the overhead without the NaN/Inf scan of the query
    unchecked = [overhead_s(w, run) for w, run in timed_steps(pipe, query, memory, repeats)]
    rr_device = pipe.placement[Step.RELEVANCY].id
    rr_bytes = memory_bytes(method, shapes, pipe.placement)
    result = {
        "placement": name, "placement_repr": repr(pipe.placement), "relevancy_device": rr_device,
        "step_ms": 1e3 * statistics.median(walls), "step_ms_samples": [1e3 * w for w in walls],
        "per_step_ms": {k: 1e3 * statistics.median(v) for k, v in per_step.items()},
        "transfer_ms": 1e3 * statistics.median(run.transfer_seconds for _, run in steps),
        "transfer_bytes": steps[-1][1].transfer_bytes,
        "memory_share": statistics.median(run.memory_seconds / wall for wall, run in steps),
        "relevancy_retrieval_ms": 1e3 * rr, "relevancy_retrieval_bytes": rr_bytes,
        "relevancy_retrieval_GBps": rr_bytes / rr / 1e9 if rr else None,
        "copy_GBps": copy_bw[rr_device] / 1e9,
        "relevancy_retrieval_copy_fraction": rr_bytes / rr / copy_bw[rr_device] if rr else None,
        "runtime_overhead_us": 1e6 * statistics.median(overhead_s(w, run) for w, run in steps),
        "runtime_overhead_us_validate_false": 1e6 * statistics.median(unchecked),
    }
    del memory, pipe
    gc.collect()
    return result


def bench_method(name, contexts, repeats, copy_bw, dense_cache) -> tuple[dict, list[dict]]:
    method = get_method(name)
    info = {"method": name, "repr": repr(method), "shapes": {}}
    rows = []
    for ctx in contexts:
        given = {"context": ctx, **({"dtype": "float32"} if "dtype" in method.SHAPES else {})}
        shapes = info["shapes"][ctx] = method.shapes(**given)
        inputs, query = method.example_inputs(shapes)
        keys, values = inputs[0], inputs[1]
        key = (tuple(keys.shape), tuple(query.shape), keys.dtype)
        if key not in dense_cache:
            dense_cache[key] = {v: median_time(fn, repeats)[0] for v, fn in dense_variants(keys, values, query).items()}
        dense = dense_cache[key]
        best = min(dense, key=dense.get)
        for where, placement in placements_present().items():
            row = {"method": name, "context": ctx, "placement": where}
            try:
                Placement.resolve(method, placement)
            except PlacementError as exc:
                print(f"{name:<12} {ctx:>7} {where:<12} skipped: {exc}", flush=True)
                continue
            try:
                row.update(bench_placement(where, placement, method, shapes, inputs, query, repeats, copy_bw))
            except Exception as exc:  # a broken method or placement is reported, the run goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
                print(f"{name:<12} {ctx:>7} {where:<12} FAILED {row['error']}", flush=True)
                rows.append(row)
                continue
            row.update(dense_ms={k: 1e3 * v for k, v in dense.items()}, dense_best=best,
                       dense_best_ms=1e3 * dense[best], speedup_vs_dense=1e3 * dense[best] / row["step_ms"])
            rows.append(row)
            print(f"{name:<12} {ctx:>7} {where:<12} step {row['step_ms']:8.2f} ms  dense {row['dense_best_ms']:8.2f} ms"
                  f"  x{row['speedup_vs_dense']:5.1f}  memory share {row['memory_share']:4.0%}  rel+ret "
                  f"{_fmt(row['relevancy_retrieval_GBps'], '.1f')} GB/s "
                  f"({_fmt(row['relevancy_retrieval_copy_fraction'], '.0%')} of copy)  "
                  f"overhead {row['runtime_overhead_us']:.0f} us", flush=True)
        del inputs, query, keys, values
        gc.collect()
    return info, rows


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(info, args, copy_bw, methods, rows) -> str:
    headers = ["context", "placement", "step ms", "device ms per step", "dense ms (best)", "speedup",
               "memory share", "rel+ret ms", "rel+ret GB/s", "% of copy BW", "runtime overhead us (validate=False)"]
    text = (f"# Sparse-attention decode step per method and placement\n\n{info['date']} on {info['cpu']} "
            f"({info['cores']} cores), torch {info['versions']['torch']}, pyopencl {info['versions']['pyopencl']}, "
            f"PoCL {info['versions']['pocl-binary-distribution']}, hetero {info['versions']['hetero']}. "
            f"Median of {args.repeats} steps.\n\n"
            + "\n".join(f"- copy bandwidth on {k} (read + write): {v / 1e9:.1f} GB/s" for k, v in copy_bw.items())
            + "\n- memory share: relevancy + retrieval device time and the transfers feeding them, over the decode "
              "step's wall time (median over the steps)\n- rel+ret GB/s: the bytes the method's cost model says relevancy + "
              "retrieval move, over their measured time; % of copy BW: that over the relevancy device's copy "
              "bandwidth\n")
    for m in methods:
        shapes = next(iter(m["shapes"].values()), {})
        fixed = ", ".join(f"{k}={v}" for k, v in shapes.items() if k != "context")
        text += f"\n## {m['method']}: {m['repr']}\n\n{fixed}\n\n"
        if m.get("error"):
            text += f"not run: {m['error']}\n"
            continue
        table = []
        for r in (r for r in rows if r["method"] == m["method"]):
            if "error" in r:
                table.append([r["context"], r["placement"], f"FAILED: {r['error']}"] + [""] * (len(headers) - 3))
                continue
            steps = ", ".join(f"{k.replace('relevancy+retrieval', 'rel+ret')} {v:.2f}" for k, v in r["per_step_ms"].items())
            table.append([r["context"], r["placement"], f"{r['step_ms']:.2f}", steps,
                          f"{r['dense_best_ms']:.1f} ({r['dense_best']})", f"{r['speedup_vs_dense']:.1f}x",
                          f"{r['memory_share']:.0%}", f"{r['relevancy_retrieval_ms']:.2f}",
                          _fmt(r["relevancy_retrieval_GBps"], ".1f"), _fmt(r["relevancy_retrieval_copy_fraction"], ".0%"),
                          f"{r['runtime_overhead_us']:.0f} ({r['runtime_overhead_us_validate_false']:.0f})"])
        text += md_table(headers, table)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=[n for n, m in METHODS.items() if m.family == "sparse-attention"],
                        help="registered method names (default: every sparse-attention one)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--repeats", type=int, default=10, help="decode steps timed per placement (default 10)")
    parser.add_argument("--name", default="sparse_attention", help="results file stem")
    args = parser.parse_args(argv)

    info = machine()
    copy_bw = {d.id: BACKENDS[d.backend].copy_bandwidth(d) for d in hetero.devices()}
    methods, rows, dense_cache = [], [], {}
    for name in args.methods:
        if name not in METHODS:
            print(f"{name}: not registered in hetero.methods.METHODS ({', '.join(METHODS)}); skipped", flush=True)
            continue
        try:
            method_info, method_rows = bench_method(name, args.contexts, args.repeats, copy_bw, dense_cache)
        except Exception as exc:  # e.g. its example inputs fail: the other methods still run
            method_info, method_rows = {"method": name, "repr": name, "shapes": {}}, []
            method_info["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{name}: FAILED {method_info['error']}", flush=True)
        methods.append(method_info)
        rows += method_rows

    payload = {"benchmark": "sparse_attention", "machine": info, "copy_GBps": {k: v / 1e9 for k, v in copy_bw.items()},
               "repeats": args.repeats, "contexts": args.contexts, "methods": methods, "results": rows}
    json_path, md_path = write_results(args.name, payload, markdown(info, args, copy_bw, methods, rows))
    print(f"wrote {json_path} and {md_path}")
    failed = [m["method"] for m in methods if m.get("error")] + [f"{r['method']} {r['context']} {r['placement']}"
                                                                  for r in rows if "error" in r]
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
