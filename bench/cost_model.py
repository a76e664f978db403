"""How good is the cost model on this machine: per-op accuracy on held-out shapes, and the
placer's regret against every placement measured.

Accuracy: with this machine's calibrated profile (`hetero calibrate`; `--calibrate` re-runs
it), every op of every device is run on shapes NOT in the calibration grid and compared with
`task_cost`'s prediction: per-point error, median / 90th percentile / max |relative error|.

Regret: for each context (batch 1, 8 KV heads, 32 query heads, head_dim 128, float32, page
16, budget 2,048 tokens, as bench/sparse_attention.py), every placement of
PageSparseAttention over the present devices (3^4 = 81) is measured (a decode step = append
1 token + step, wall time, robust median), round-robin in a new random order each round so
the machine's slow spells hit every placement alike. Two choices are scored: the model's
alone (`hetero.place(..., objective="latency")`) and the model refined by measuring its
5 best-predicted placements (`refine=5`, its own separate measurement); regret =
measured(chosen) / min measured - 1, both from this bench's measurements. The chosen and the
fastest measured placements are re-measured interleaved in confirmation rounds, so the
minimum is not just the luckiest sample. Spearman rank correlation of predicted vs measured
over all placements is reported too.

Memory is prepared once per (relevancy device, apply device) pair: the page summaries live on
the relevancy device and the KV cache on the apply device, so placements that differ only in
where prepare/retrieval run hold identical memory (the memory is re-bound to each pipeline).

    cd /tmp && python /work/main/bench/cost_model.py              # uses ~/.cache/hetero/machine.toml
    python bench/cost_model.py --calibrate                         # calibrate first

Writes bench/results/cost_model.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero.cost import calibrate as cal  # noqa: E402
from hetero.cost import profiles  # noqa: E402
from hetero.cost.model import task_cost  # noqa: E402
from hetero.cost.placer import node_for  # noqa: E402
from hetero.methods import PageSparseAttention  # noqa: E402
from hetero.runtime import STEPS, Pipeline, Step  # noqa: E402

PAGE, BUDGET = 16, 2048
REFINE = 5  # hetero.place(..., refine=REFINE): the best-predicted placements measured before choosing
HELD_OUT = [dict(batch=1, kv_heads=8, q_heads=32, context=8192), dict(batch=1, kv_heads=8, q_heads=32, context=32768),
            dict(batch=1, kv_heads=8, q_heads=32, context=131072), dict(batch=2, kv_heads=8, q_heads=16, context=12288),
            dict(batch=1, kv_heads=4, q_heads=16, context=98304)]


def spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def accuracy(method, ids, repeats, k) -> list[dict]:
    nodes = {d: node_for(d) for d in ids}
    calibrated_grid = [tuple(sorted(s.items())) for s in cal.calibration_grid(False) + cal.calibration_grid(True)]
    points = []
    for shape in HELD_OUT:
        assert tuple(sorted(shape.items())) not in calibrated_grid
        inputs, query, new = cal.decode_case(method, shape)
        shapes = method.shapes(**shape, head_dim=128, dtype="float32")
        measured: dict[tuple[str, str], list[float]] = {}
        predicted: dict[tuple[str, str], float] = {}
        for placement in cal.op_placements(ids):
            t0 = time.perf_counter()
            m = cal.measure_decode(method, placement, inputs, query, new, repeats)
            for key, samples in m["ops"].items():
                measured.setdefault(key, []).extend(samples)
            work, devs = cal.workload_for(method, placement, shapes)
            for task in work.tasks:
                dev = devs[task.step].id
                predicted[(dev, task.op)] = task_cost(task, nodes[dev], method.name).seconds
            print(f"  accuracy {shape}: {cal._label(placement)} ({time.perf_counter() - t0:.1f} s)", flush=True)
            del m
            gc.collect()
        for (dev, op), samples in sorted(measured.items()):
            if (dev, op) not in predicted:
                continue
            meas = cal.robust_median(samples, k)
            pred = predicted[(dev, op)]
            points.append({"device": dev, "op": op, "shapes": shape, "measured_s": meas, "predicted_s": pred,
                           "error": pred / meas - 1, "samples": len(samples)})
        del inputs, query, new
        gc.collect()
    return points


def regret(method, ids, context, rounds, per_visit, confirm_rounds, k) -> dict:
    shapes = method.shapes(batch=1, kv_heads=8, q_heads=32, head_dim=128, context=context, dtype="float32")
    t0 = time.perf_counter()
    plan = hetero.place(method, shapes, devices=ids, objective="latency")
    place_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    refined = hetero.place(method, shapes, devices=ids, objective="latency", refine=REFINE)
    refine_s = time.perf_counter() - t0
    by_assignment = {tuple(e.assignment[s] for s in STEPS): e for e in plan.ranked + plan.infeasible}
    chosen = tuple(plan.chosen.assignment[s] for s in STEPS)
    chosen_refined = tuple(refined.chosen.assignment[s] for s in STEPS)
    inputs, query, new = cal.decode_case(method, dict(batch=1, kv_heads=8, q_heads=32, context=context))
    combos = list(itertools.product(ids, repeat=len(STEPS)))
    pipes, memories = {}, {}
    for combo in combos:
        placement = dict(zip((s.value for s in STEPS), combo))
        pipes[combo] = Pipeline(method, placement)
        group = (placement["relevancy"], placement["apply"])
        if group not in memories:
            # room for every append of the run: no 25% growth copy of a 1 GB cache mid-measurement
            memories[group] = pipes[combo].prepare(*inputs, capacity=context + 2048)
    samples: dict[tuple, list[float]] = {c: [] for c in combos}

    def measure(group: list[tuple], n_rounds: int, seed: int) -> None:
        """Round-robin rounds over `group`; placements that differ only in where prepare and
        retrieval run share one memory (same summaries and cache), re-bound to each."""
        runs = [(pipes[c], memories[(pipes[c].placement[Step.RELEVANCY].id, pipes[c].placement[Step.APPLY].id)])
                for c in group]
        for combo, m in zip(group, cal.measure_round_robin(method, runs, inputs, query, new, n_rounds, per_visit,
                                                            seed=seed)):
            samples[combo] += m["wall"]

    measure(combos, rounds, context)
    # confirmation: the chosen and the fastest measured placements again, interleaved
    first = {c: cal.robust_median(s, k) for c, s in samples.items()}
    finalists = list(dict.fromkeys([chosen, chosen_refined] + sorted(first, key=first.get)[:5]))
    measure(finalists, confirm_rounds, context + 1)
    measured = {c: cal.robust_median(s, k) for c, s in samples.items()}
    best = min(measured, key=measured.get)

    def interval(combo) -> list[float]:
        """90% bootstrap interval of median(combo) / median(fastest) - 1 (the noise on a regret)."""
        boot = np.random.default_rng(1)
        a, b = (np.asarray(cal.robust_keep(samples[c], k)) for c in (combo, best))
        ratio = (np.median(a[boot.integers(0, len(a), (2000, len(a)))], axis=1)
                 / np.median(b[boot.integers(0, len(b), (2000, len(b)))], axis=1))
        return [float(np.percentile(ratio, 5) - 1), float(np.percentile(ratio, 95) - 1)]
    rows = []
    for combo in combos:
        est = by_assignment.get(combo)
        rows.append({"placement": dict(zip((s.value for s in STEPS), combo)), "measured_s": measured[combo],
                     "samples": len(samples[combo]), "predicted_s": est.seconds if est else None,
                     "feasible": bool(est and est.feasible), "chosen": combo == chosen,
                     "chosen_refined": combo == chosen_refined, "fastest": combo == best})
    pairs = [(r["predicted_s"], r["measured_s"]) for r in rows if r["predicted_s"] is not None]
    rho = spearman([p for p, _ in pairs], [m for _, m in pairs])
    pipes.clear()
    memories.clear()  # free the caches before the next context
    gc.collect()
    return {"context": context, "chosen": dict(zip((s.value for s in STEPS), chosen)),
            "chosen_label": plan.chosen.label(), "chosen_measured_s": measured[chosen],
            "chosen_predicted_s": plan.chosen.seconds, "fastest": dict(zip((s.value for s in STEPS), best)),
            "fastest_measured_s": measured[best], "regret": measured[chosen] / measured[best] - 1,
            "chosen_rank_measured": sorted(measured.values()).index(measured[chosen]) + 1,
            "refined": dict(zip((s.value for s in STEPS), chosen_refined)), "refined_label": refined.chosen.label(),
            "refined_measured_s": measured[chosen_refined], "regret_refined": measured[chosen_refined] / measured[best] - 1,
            "refined_rank_measured": sorted(measured.values()).index(measured[chosen_refined]) + 1,
            "regret_interval": interval(chosen), "regret_refined_interval": interval(chosen_refined),
            "refine_s": refine_s, "refine_measured": refined.measured,
            "spearman": rho, "placements": len(combos), "place_s": place_s, "finalists": len(finalists), "rows": rows}


def _ms(s):
    return f"{s * 1e3:.2f}"


def _regret(value: float, interval: list[float]) -> str:
    return f"{value:.1%} ({interval[0]:+.1%} to {interval[1]:+.1%})"


def _short(p: dict) -> str:
    ids = set(p.values())
    if len(ids) == 1:
        return f"all {next(iter(ids))}"
    return "/".join(p[s.value] for s in STEPS)


# glibc returns freed large blocks to the OS (mmap / heap trim), so torch's 16 MB page-gather
# temporaries fault their pages in again on some calls: sparse_attention on torch:cpu then
# flips between ~3 ms and ~9.5 ms at 8K context. Pinning the thresholds makes the allocator
# state steady for the calibration and the measurements alike (--no-malloc-tuning to skip).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--no-malloc-tuning" not in argv and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *argv], {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="run `hetero calibrate` first (default: only "
                        "when no machine profile exists)")
    parser.add_argument("--repeats", type=int, default=7, help="decode steps per placement (default 7)")
    parser.add_argument("--rounds", type=int, default=8, help="round-robin rounds over every placement (default 8)")
    parser.add_argument("--per-visit", type=int, default=3, help="timed decode steps per placement per round (default 3)")
    parser.add_argument("--confirm", type=int, default=8, help="confirmation rounds of the finalists (default 8)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-regret", action="store_true")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc's malloc thresholds alone")
    args = parser.parse_args(argv)
    k = 3.0
    start = time.perf_counter()
    info = machine()
    ids = [d.id for d in hetero.devices() if not d.info.get("modeled")]
    method = PageSparseAttention(page_size=PAGE, budget_tokens=BUDGET)
    calibration = None
    if args.calibrate or not profiles.MACHINE_PROFILE.is_file():
        print("calibrating ...", flush=True)
        result = cal.calibrate(devices=ids)
        calibration = {k2: v for k2, v in result.report.items() if k2 in ("seconds", "date", "grid", "repeats", "fits")}
        print(f"calibrated in {result.report['seconds']:.0f} s -> {profiles.MACHINE_PROFILE}", flush=True)
    profiles.reload()
    missing = [d for d in ids if d not in profiles.known_profiles().devices]
    if missing:
        print(f"no calibrated profile for {missing}; run with --calibrate", file=sys.stderr)
        return 1
    profile_text = profiles.MACHINE_PROFILE.read_text()
    header_line = profile_text.splitlines()[0] if profile_text else ""

    points = []
    if not args.skip_accuracy:
        print("accuracy on held-out shapes ...", flush=True)
        points = accuracy(method, ids, args.repeats, k)
    errors = np.abs([p["error"] for p in points]) if points else np.array([np.nan])
    acc = {"points": len(points), "median_abs_error": float(np.median(errors)),
           "p90_abs_error": float(np.percentile(errors, 90)), "max_abs_error": float(np.max(errors)),
           "within_15pct": int(np.sum(errors <= 0.15)) if points else 0}
    if points:
        print(f"accuracy: {acc['points']} points, median |err| {acc['median_abs_error']:.1%}, p90 "
              f"{acc['p90_abs_error']:.1%}, max {acc['max_abs_error']:.1%}", flush=True)

    regrets = []
    if not args.skip_regret:
        for ctx in args.contexts:
            t0 = time.perf_counter()
            print(f"regret at context {ctx:,}: measuring {len(ids) ** 4} placements ...", flush=True)
            r = regret(method, ids, ctx, args.rounds, args.per_visit, args.confirm, k)
            regrets.append(r)
            print(f"  chosen {r['chosen_label']}: {_ms(r['chosen_measured_s'])} ms measured "
                  f"({_ms(r['chosen_predicted_s'])} predicted), fastest {_short(r['fastest'])} "
                  f"{_ms(r['fastest_measured_s'])} ms; regret {r['regret']:.1%}, rank {r['chosen_rank_measured']}, "
                  f"Spearman {r['spearman']:.2f}; refine={REFINE} chose {_short(r['refined'])}: regret "
                  f"{r['regret_refined']:.1%} ({time.perf_counter() - t0:.0f} s)", flush=True)

    total_s = time.perf_counter() - start
    payload = {"benchmark": "cost_model", "machine": info,
               "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}, "profile": str(profiles.MACHINE_PROFILE),
               "profile_header": header_line, "calibration": calibration, "method": repr(method),
               "repeats": args.repeats, "rounds": args.rounds, "per_visit": args.per_visit,
               "confirm_rounds": args.confirm, "refine": REFINE, "outlier_rejection_k_mad": k,
               "held_out_shapes": HELD_OUT, "accuracy": acc, "accuracy_points": points,
               "regret": regrets, "seconds": total_s}
    md = [f"# Cost model accuracy and placer regret\n\n{info['date']} on {info['cpu']} ({info['cores']} cores), "
          f"devices {', '.join(ids)}; profile `{profiles.MACHINE_PROFILE}` ({header_line.lstrip('# ')}).\n"
          f"{method!r}, float32, head_dim 128. Measured times are robust medians ({k:g}-MAD outliers rejected) of "
          f"{args.repeats} decode steps (append 1 token + step). An op's time is what it costs its caller: device "
          f"time, or the host's issue time where longer. Bench runtime {total_s:.0f} s. glibc malloc thresholds: "
          f"{', '.join(f'{k}={os.environ.get(k)}' for k in MALLOC_ENV)} (pinned so torch's 16 MB gather temporaries "
          f"do not fault their pages in again on some calls, which makes torch:cpu sparse_attention bimodal, "
          f"~3 vs ~9.5 ms at 8K).\n"]
    if points:
        md.append(f"\n## Per-op accuracy on held-out shapes\n\n{acc['points']} points (device x op x shape, shapes not in "
                  f"the calibration grid): median |error| **{acc['median_abs_error']:.1%}**, 90th percentile "
                  f"**{acc['p90_abs_error']:.1%}**, max **{acc['max_abs_error']:.1%}**; {acc['within_15pct']} of "
                  f"{acc['points']} within 15%. Error = predicted / measured - 1.\n\n")
        md.append(md_table(["shape (B, H, Hq, ctx)", "device", "op", "measured ms", "predicted ms", "error"],
                           [[f"{p['shapes']['batch']}, {p['shapes']['kv_heads']}, {p['shapes']['q_heads']}, "
                             f"{p['shapes']['context']:,}", p["device"], p["op"], f"{p['measured_s'] * 1e3:.3f}",
                             f"{p['predicted_s'] * 1e3:.3f}", f"{p['error']:+.0%}"] for p in points]))
    if regrets:
        md.append(f"\n## Placer regret (every placement measured)\n\n1 sequence, 8 KV heads x 32 query heads. "
                  f"Every placement measured round-robin: {args.rounds} rounds x (1 untimed + {args.per_visit} timed "
                  f"decode steps), the finalists {args.confirm} more rounds. Regret = measured(chosen) / min measured "
                  f"- 1, with a 90% bootstrap interval of the chosen's median over the fastest's (the noise on "
                  f"it). *model*: `hetero.place(..., objective='latency')`; *refine={REFINE}*: the same, then its "
                  f"{REFINE} best-predicted placements measured (`refine={REFINE}`, a separate measurement) and the "
                  f"fastest taken. Spearman = rank correlation of predicted vs measured decode-step time over all "
                  f"placements (predicted excludes the runtime's per-call Python overhead, about 0.3 ms per call, "
                  f"which every placement pays).\n\n")
        md.append(md_table(["context", "placements", "chosen (model)", "ms measured (predicted)", "regret (model)",
                            "rank", "chosen (refine)", "ms measured", "regret (refine)", "fastest measured",
                            "fastest ms", "Spearman"],
                           [[f"{r['context']:,}", r["placements"], _short(r["chosen"]),
                             f"{_ms(r['chosen_measured_s'])} ({_ms(r['chosen_predicted_s'])})",
                             _regret(r["regret"], r["regret_interval"]), r["chosen_rank_measured"], _short(r["refined"]),
                             _ms(r["refined_measured_s"]), _regret(r["regret_refined"], r["regret_refined_interval"]), _short(r["fastest"]), _ms(r["fastest_measured_s"]),
                             f"{r['spearman']:.2f}"] for r in regrets]))
        for r in regrets:
            top = sorted(r["rows"], key=lambda x: x["measured_s"])[:8]
            md.append(f"\n### context {r['context']:,}: fastest measured placements (prepare/relevancy/retrieval/apply)\n\n")
            md.append(md_table(["placement", "measured ms", "predicted ms", "samples", ""],
                               [[_short(x["placement"]), _ms(x["measured_s"]),
                                 _ms(x["predicted_s"]) if x["predicted_s"] else "-", x["samples"],
                                 ", ".join(w for w, on in (("chosen (model)", x["chosen"]),
                                                           ("chosen (refine)", x["chosen_refined"])) if on)]
                                for x in top]))
    json_path, md_path = write_results("cost_model", payload, "".join(md))
    print(f"wrote {json_path} and {md_path} ({total_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
