"""The seed paper's scenario, modeled: page-sparse attention on an AMD MI210 + Alveo U55C.

For contexts 4K-1M and batch 1-32 (one attention layer: 8 KV heads x 4 query heads, head
dim 128, float16, page 16, budget 2,048 tokens), the placer chooses among every step ->
device assignment over the shipped `mi210` and `u55c` profiles joined by the seed paper's
measured GPU<->FPGA peer-to-peer link; the GPU is home (queries come from it, outputs return
to it). Reported beside the choice: the GPU-only baseline, the memory-step speedup, an
end-to-end estimate (the memory step plus the layer's dense work: an 8B-class model's
0.44 GB of weights per layer read at 90% of HBM bandwidth), and the energy ratio.

Two GPU implementations are costed: hetero's torch code as it is (its operations issue 12-25
kernels each, so a GPU running it is launch-bound at short contexts), and a what-if where
each GPU operation is one fused kernel, as in the paper's hand-written GPU baselines.

    python bench/paper_scenario.py      # writes bench/results/paper_scenario.{json,md,png}
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, md_table, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero.cost import Workload  # noqa: E402
from hetero.methods import PageSparseAttention  # noqa: E402

GPU, FPGA = "model:mi210", "model:u55c"
CONTEXTS = (4096, 16384, 65536, 131072, 262144, 1048576)
BATCHES = (1, 8, 32)
DENSE_LAYER_BYTES = 0.44e9  # an 8B-parameter model's float16 weights per layer (32 layers)
PAPER = {"memory-step speedup (LServe)": "1.2-5.6x", "end-to-end speedup": "1.04-2.2x", "energy saving": "1.11-4.7x"}


def fused_gpu_kernels(work: Workload, placed: dict) -> Workload:
    """What-if: every operation on a GPU is one kernel launch."""
    tasks = [dataclasses.replace(t, launches=1) if placed[t.step].kind == "gpu" else t for t in work.tasks]
    return dataclasses.replace(work, tasks=tasks)


def dense_layer_seconds() -> float:
    hbm = max(hetero.cost.device_profile("mi210").memory, key=lambda lv: lv.capacity)
    return DENSE_LAYER_BYTES / (hbm.bandwidth * 0.9)


def fpga_steps(assignment) -> str:
    on = [s.value for s, d in assignment.items() if d == FPGA]
    return "+".join(on) if on else "none (GPU only)"


def gpu_variant(scan_efficiency: float) -> str:
    """A modeled MI210 whose relevancy/top-k reach `scan_efficiency` of its HBM bandwidth."""
    base = hetero.cost.device_profile("mi210")
    name = f"mi210-scan{scan_efficiency:g}"
    efficiency = {**base.efficiency, "scan": scan_efficiency, "select": scan_efficiency}
    sources = {**base.sources, "efficiency.scan": "sensitivity sweep", "efficiency.select": "sensitivity sweep"}
    hetero.cost.known_profiles().devices[name] = dataclasses.replace(base, name=name, efficiency=efficiency,
                                                                     sources=sources)
    return f"model:{name}"


def sensitivity(method) -> list[dict]:
    """Where relevancy+retrieval go as the GPU's efficiency on them falls below the paper's ~30%
    bound (GPU operations fused, batch 1 and 8)."""
    rows = []
    for eff in (0.3, 0.25, 0.2, 0.15, 0.1):
        gpu = gpu_variant(eff)
        for batch in (1, 8):
            placed = {}
            for context in CONTEXTS:
                shapes = dict(batch=batch, context=context, kv_heads=8, q_heads=32, head_dim=128, dtype="float16")
                try:
                    plan = hetero.place(method, shapes, devices=[gpu, FPGA], home=gpu, adjust=fused_gpu_kernels,
                                        links={(gpu, FPGA): "gpu-fpga-p2p-seed"})
                except hetero.cost.ProfileError:
                    placed[context] = "infeasible"
                    continue
                c = plan.chosen
                on = "FPGA" if c.assignment[hetero.Step.RELEVANCY] == FPGA else "GPU"
                placed[context] = f"{on} {plan.baselines[gpu].seconds / c.seconds:.2f}x"
            rows.append(dict(gpu_scan_efficiency=eff, batch=batch, relevancy_on=placed))
    return rows


def run() -> dict:
    method = PageSparseAttention(page_size=16, budget_tokens=2048)
    dense = dense_layer_seconds()
    rows = []
    for variant, adjust in (("as implemented", None), ("fused GPU kernels (what-if)", fused_gpu_kernels)):
        for batch in BATCHES:
            for context in CONTEXTS:
                shapes = dict(batch=batch, context=context, kv_heads=8, q_heads=32, head_dim=128, dtype="float16")
                row = dict(variant=variant, batch=batch, context=context)
                try:
                    plan = hetero.place(method, shapes, devices=[GPU, FPGA], home=GPU, adjust=adjust)
                    energy_plan = hetero.place(method, shapes, devices=[GPU, FPGA], home=GPU, adjust=adjust,
                                               objective="energy")
                except hetero.cost.ProfileError as exc:
                    row.update(infeasible=str(exc).splitlines()[-1].strip())
                    rows.append(row)
                    continue
                chosen, gpu = plan.chosen, plan.baselines.get(GPU)
                gpu_ok = gpu is not None and gpu.feasible
                rel = {e.assignment[hetero.Step.RELEVANCY]: e for e in plan.ranked[::-1]}  # best per relevancy device
                why = {d: next(t.bound for t in e.tasks if t.task.op.startswith("relevancy")) for d, e in rel.items()}
                row.update(
                    on_fpga=fpga_steps(chosen.assignment), latency_us=chosen.seconds * 1e6,
                    energy_mj=chosen.energy_j * 1e3,
                    gpu_only_us=gpu.seconds * 1e6 if gpu_ok else None,
                    memory_speedup=gpu.seconds / chosen.seconds if gpu_ok else None,
                    end_to_end_speedup=(gpu.seconds + dense) / (chosen.seconds + dense) if gpu_ok else None,
                    energy_ratio=gpu.energy_j / chosen.energy_j if gpu_ok else None,
                    energy_objective_on_fpga=fpga_steps(energy_plan.chosen.assignment),
                    energy_objective_saving=gpu.energy_j / energy_plan.chosen.energy_j if gpu_ok else None,
                    relevancy_bound={d.removeprefix("model:"): b for d, b in why.items()},
                    gpu_only_infeasible=None if gpu_ok else (gpu.reasons[0] if gpu else "GPU cannot run every step"))
                rows.append(row)
    return dict(machine=machine(), dense_layer_us=dense * 1e6, paper=PAPER, rows=rows, sensitivity=sensitivity(method))


def _fmt(x, spec=".2f", suffix="x"):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown(result: dict) -> str:
    out = [f"# The paper's scenario, modeled: MI210 + U55C (shipped profiles, seed-paper P2P link)\n",
           f"One attention layer, 8 KV x 4 query heads, head dim 128, float16, page 16, budget 2,048 tokens. "
           f"End-to-end adds {result['dense_layer_us']:.0f} us of dense layer work on the GPU. "
           f"Paper (secondary): " + "; ".join(f"{k} {v}" for k, v in result["paper"].items()) + ".\n"]
    for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
        out.append(f"\n## GPU code: {variant}\n")
        table = []
        for r in (r for r in result["rows"] if r["variant"] == variant):
            if "infeasible" in r:
                table.append([r["batch"], f"{r['context']:,}", "infeasible: " + r["infeasible"], "", "", "", "", "", ""])
                continue
            table.append([r["batch"], f"{r['context']:,}", r["on_fpga"], f"{r['latency_us']:.0f}",
                          _fmt(r["gpu_only_us"], ".0f", ""), _fmt(r["memory_speedup"]), _fmt(r["end_to_end_speedup"]),
                          _fmt(r["energy_ratio"]),
                          ", ".join(f"{d}: {b}" for d, b in r["relevancy_bound"].items())])
        out.append(md_table(["batch", "context", "steps on the FPGA (latency objective)", "us", "GPU-only us",
                             "memory-step speedup", "end-to-end", "energy saving", "relevancy bound by"], table))
    out.append("\n## Sensitivity: where relevancy runs as the GPU's efficiency on relevancy/top-k falls "
               "(fused GPU kernels; speedup over GPU-only)\n")
    out.append(md_table(["GPU scan/select efficiency", "batch", *[f"{c:,}" for c in CONTEXTS]],
                        [[r["gpu_scan_efficiency"], r["batch"], *[r["relevancy_on"][c] for c in CONTEXTS]]
                         for r in result["sensitivity"]]))
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, style in (("as implemented", "-"), ("fused GPU kernels (what-if)", "--")):
        for batch in BATCHES:
            rows = [r for r in result["rows"] if r["variant"] == variant and r["batch"] == batch
                    and r.get("memory_speedup")]
            ctx = [r["context"] for r in rows]
            axes[0].plot(ctx, [r["memory_speedup"] for r in rows], style, marker="o", label=f"batch {batch}, {variant}")
            axes[1].plot(ctx, [r["energy_ratio"] for r in rows], style, marker="o", label=f"batch {batch}, {variant}")
    for ax, title in zip(axes, ("memory-step speedup over GPU-only", "energy saving over GPU-only")):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("context (tokens)")
        ax.set_title(title)
    axes[0].axhspan(1.2, 5.6, color="tab:green", alpha=0.1, label="paper: LServe 1.2-5.6x")
    axes[1].axhspan(1.11, 4.7, color="tab:green", alpha=0.1, label="paper: 1.11-4.7x")
    axes[0].legend(fontsize=6)
    axes[1].legend(fontsize=6)
    fig.suptitle("page-sparse attention, MI210 + U55C (modeled)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    result = run()
    write_results("paper_scenario", result, markdown(result))
    plot(result, RESULTS / "paper_scenario.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
