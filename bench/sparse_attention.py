"""Page-sparse decode step vs dense attention, per placement, contexts 8K-128K.

Shape (issue #2): 1 sequence, 8 KV heads x 4 query heads (GQA), head_dim 128, fp32,
page 16, budget 2,048 tokens. For every placement present it reports the median decode-step
time, each step's device time, the runtime's own Python overhead per step, and the achieved
bandwidth of relevancy + retrieval as a fraction of the copy bandwidth measured on the same
device in the same run. The dense baseline is the fastest of several torch formulations,
timed in the same run.

    python bench/sparse_attention.py                 # all contexts, 10 repeats
    python bench/sparse_attention.py --contexts 8192 131072 --repeats 20

Writes bench/results/sparse_attention.{json,md}.
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
from hetero.demo import placements_present, synthetic_cache  # noqa: E402
from hetero.methods import PageSparseAttention, dense_attention  # noqa: E402

KV_HEADS, GROUP, HEAD_DIM, PAGE, BUDGET = 8, 4, 128, 16, 2048


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


def bench_placement(name, placement, method, keys, values, query, repeats):
    pipe = hetero.Pipeline(method, placement)
    memory = pipe.prepare(keys, values)
    for _ in range(2):  # warm-up: kernel builds, lengths moved once
        pipe.step(query, memory)
    walls, runs = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.step(query, memory)
        walls.append(time.perf_counter() - start)
        runs.append(pipe.last_run)
    per_step = {}
    for run in runs:
        for step, seconds in run.by_step().items():
            per_step.setdefault(step, []).append(seconds)
    rr_device = pipe.placement[hetero.Step.RELEVANCY]
    rr = [sum(s for k, s in run.by_step().items() if k in ("relevancy", "retrieval", "relevancy+retrieval"))
          for run in runs]
    # the runtime's own cost: wall time not spent inside an implementation or a copy
    overhead = [w - sum(r.timing.wall_s for r in run.steps) - sum(t.timing.wall_s for t in run.transfers)
                for w, run in zip(walls, runs)]
    # the same with validate=False (no NaN/Inf scan of the query)
    pipe.validate = False
    unchecked = []
    for _ in range(repeats):
        start = time.perf_counter()
        pipe.step(query, memory)
        wall = time.perf_counter() - start
        run = pipe.last_run
        unchecked.append(wall - sum(r.timing.wall_s for r in run.steps) - sum(t.timing.wall_s for t in run.transfers))
    # beyond kernel time: wall minus the device time of steps and copies
    beyond_device = [w - run.step_seconds - run.transfer_seconds for w, run in zip(walls, runs)]
    n_pages = -(-keys.shape[2] // PAGE)
    rr_bytes = keys.shape[0] * KV_HEADS * n_pages * 2 * HEAD_DIM * 4  # page summaries streamed once
    result = {
        "placement": name, "placement_repr": repr(pipe.placement), "relevancy_device": rr_device.id,
        "step_ms": 1e3 * statistics.median(walls), "step_ms_samples": [1e3 * w for w in walls],
        "per_step_ms": {k: 1e3 * statistics.median(v) for k, v in per_step.items()},
        "transfer_ms": 1e3 * statistics.median(r.transfer_seconds for r in runs),
        "transfer_bytes": runs[-1].transfer_bytes,
        "relevancy_retrieval_ms": 1e3 * statistics.median(rr), "relevancy_retrieval_bytes": rr_bytes,
        "relevancy_retrieval_GBps": rr_bytes / statistics.median(rr) / 1e9,
        "runtime_overhead_us": 1e6 * statistics.median(overhead),
        "runtime_overhead_us_validate_false": 1e6 * statistics.median(unchecked),
        "wall_minus_device_us": 1e6 * statistics.median(beyond_device),
    }
    del memory, pipe
    gc.collect()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--name", default="sparse_attention", help="results file stem")
    args = parser.parse_args(argv)

    info = machine()
    copy_bw = {d.id: BACKENDS[d.backend].copy_bandwidth(d) for d in hetero.devices()}
    method = PageSparseAttention(page_size=PAGE, budget_tokens=BUDGET)
    rows = []
    for ctx in args.contexts:
        keys, values, query, _ = synthetic_cache(1, KV_HEADS, GROUP, ctx, HEAD_DIM)
        dense = {name: median_time(fn, args.repeats)[0] for name, fn in dense_variants(keys, values, query).items()}
        best = min(dense, key=dense.get)
        for name, placement in placements_present().items():
            r = bench_placement(name, placement, method, keys, values, query, args.repeats)
            r.update(context=ctx, dense_ms={k: 1e3 * v for k, v in dense.items()}, dense_best=best,
                     dense_best_ms=1e3 * dense[best], speedup_vs_dense=1e3 * dense[best] / r["step_ms"],
                     copy_GBps=copy_bw[r["relevancy_device"]] / 1e9,
                     relevancy_retrieval_copy_fraction=r["relevancy_retrieval_GBps"] * 1e9 / copy_bw[r["relevancy_device"]])
            rows.append(r)
            print(f"{ctx:>7} {name:<45} step {r['step_ms']:8.2f} ms  dense {r['dense_best_ms']:8.2f} ms  "
                  f"x{r['speedup_vs_dense']:5.1f}  rel+ret {r['relevancy_retrieval_GBps']:5.1f} GB/s "
                  f"({100 * r['relevancy_retrieval_copy_fraction']:.0f}% of copy)  overhead {r['runtime_overhead_us']:.0f} us "
                  f"({r['runtime_overhead_us_validate_false']:.0f} unvalidated)",
                  flush=True)
        del keys, values, query
        gc.collect()

    payload = {"benchmark": "sparse_attention", "machine": info, "copy_GBps": {k: v / 1e9 for k, v in copy_bw.items()},
               "shape": {"batch": 1, "kv_heads": KV_HEADS, "q_heads": KV_HEADS * GROUP, "head_dim": HEAD_DIM,
                         "page_size": PAGE, "budget_tokens": BUDGET, "dtype": "float32"},
               "repeats": args.repeats, "results": rows}
    headers = ["context", "placement", "step ms", "dense ms (best)", "speedup", "rel+ret ms", "rel+ret GB/s",
               "% of copy BW", "runtime overhead us (validate=False)", "apply ms"]
    table = [[r["context"], r["placement"], f"{r['step_ms']:.2f}", f"{r['dense_best_ms']:.1f} ({r['dense_best']})",
              f"{r['speedup_vs_dense']:.1f}x", f"{r['relevancy_retrieval_ms']:.2f}", f"{r['relevancy_retrieval_GBps']:.1f}",
              f"{100 * r['relevancy_retrieval_copy_fraction']:.0f}%",
              f"{r['runtime_overhead_us']:.0f} ({r['runtime_overhead_us_validate_false']:.0f})",
              f"{r['per_step_ms'].get('apply', float('nan')):.2f}"] for r in rows]
    copy_lines = "\n".join(f"- copy bandwidth on {k} (read + write): {v / 1e9:.1f} GB/s" for k, v in copy_bw.items())
    markdown = (f"# Page-sparse attention decode step\n\n{info['date']} on {info['cpu']} ({info['cores']} cores), "
                f"torch {info['versions']['torch']}, pyopencl {info['versions']['pyopencl']}, "
                f"PoCL {info['versions']['pocl-binary-distribution']}. Median of {args.repeats} steps.\n"
                f"1 sequence, 8 KV heads x 4 query heads, head_dim 128, fp32, page 16, budget 2,048 tokens.\n\n"
                f"{copy_lines}\n\n" + md_table(headers, table))
    json_path, md_path = write_results(args.name, payload, markdown)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
