"""DSA lightning indexer: relevancy + top-k on PoCL against the best torch CPU formulation.

The same math everywhere: scores I(s) = sum_j w_j ReLU(q_j . k_s) over 64 index heads of
dim 128 (float32 index keys), then the top 2,048 tokens. For each context it times, in one
process and interleaved (so machine noise hits all alike):

  - OpenCL (PoCL): hetero's fused relevancy+retrieval op, wall time (enqueue to done) and
    device time (event timestamps);
  - torch CPU: several formulations of the scores (one GEMM over the context, GEMMs over
    chunks of 4K-32K tokens, einsum) each followed by `torch.topk` (no tie rule: a looser,
    faster baseline than hetero's exact one) and hetero's own torch steps (exact ties);
  - host: hetero's torch scores + the C++ shim's top-k.

It reports each time's ratio to the best torch one, the bandwidth efficiency (index-key
bytes / time / the copy bandwidth measured on the device in this run) and the compute
efficiency (FLOPs / time / the float32 matmul peak measured in this run).

    python bench/dsa_indexer.py                            # 8K, 32K, 128K; 15 repeats
    python bench/dsa_indexer.py --contexts 131072 --repeats 30

Writes bench/results/dsa_indexer.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, write_results  # noqa: E402

import hetero  # noqa: E402
from hetero.backends import BACKENDS, opencl  # noqa: E402
from hetero.methods import DSAIndexer  # noqa: E402

HEADS, DIM, TOP_K = 64, 128, 2048


def torch_variants(keys, qw, lengths, n):
    """Formulations of scores + top-k on torch:cpu; the fastest is the baseline."""
    k2 = keys[:, 0, :n]  # [1, n, D]
    q = qw[..., :-1].transpose(1, 2).contiguous()  # [1, D, H]
    w = qw[..., -1:].contiguous()  # [1, H, 1]
    impl = DSAIndexer(index_heads=HEADS, index_dim=DIM, top_k=TOP_K).impl("torch")

    def one_gemm():
        return torch.topk(torch.bmm(torch.bmm(k2, q).relu_(), w)[..., 0], TOP_K, sorted=False)

    def chunked(chunk):
        def run():
            scores = torch.empty(1, n)
            for s in range(0, n, chunk):
                scores[:, s:s + chunk] = torch.bmm(torch.bmm(k2[:, s:s + chunk], q).relu_(), w)[..., 0]
            return torch.topk(scores, TOP_K, sorted=False)
        return run

    def einsum():
        return torch.topk(torch.einsum("bsh,bh->bs", torch.einsum("bsd,bdh->bsh", k2, q).relu_(), w[..., 0]),
                          TOP_K, sorted=False)

    out = {"one GEMM + topk": one_gemm, "einsum + topk": einsum}
    out.update({f"GEMM per {c // 1024}K tokens + topk": chunked(c) for c in (4096, 8192, 16384, 32768) if c < n})
    out["hetero torch steps (exact ties)"] = lambda: impl.retrieval(None, impl.relevancy(None, keys, qw, lengths, n),
                                                                    lengths, TOP_K, 1)
    return out


def flops_peak(repeats: int) -> float:
    """float32 matmul throughput on this CPU, measured now: the best of `repeats` 2048^3
    products (the compute roof; a noisy neighbour only lowers a sample)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        samples.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(samples)


def run_context(n: int, repeats: int, cl_dev, copy_bw: dict, peak: float) -> list[dict]:
    rng = np.random.default_rng(n)
    keys_np = rng.standard_normal((1, 1, n, DIM)).astype(np.float32)
    qw_np = rng.standard_normal((1, HEADS, DIM + 1)).astype(np.float32)
    lengths_np = np.array([n], np.int32)
    keys, qw, lengths = (torch.from_numpy(a) for a in (keys_np, qw_np, lengths_np))
    method = DSAIndexer(index_heads=HEADS, index_dim=DIM, top_k=TOP_K)
    fns = {f"torch:cpu {name}": fn for name, fn in torch_variants(keys, qw, lengths, n).items()}
    host_impl = method.impl("host")
    fns["host: torch scores + shim top-k"] = lambda: host_impl.retrieval(
        None, host_impl.relevancy(None, keys_np, qw_np, lengths_np, n), lengths_np, TOP_K, 1)
    device_times: list[float] = []
    if cl_dev is not None:
        impl, queue = method.impl("opencl"), opencl.queue(cl_dev)
        ck, cq, cl_len = (opencl.cla.to_device(queue, a) for a in (keys_np, qw_np, lengths_np))

        def cl_fused():
            ids, events = impl.relevancy_retrieval(cl_dev, ck, cq, cl_len, n, TOP_K, 1)
            events[-1].wait()
            device_times.append((events[-1].profile.end - events[0].profile.start) * 1e-9)
            return ids
        fns[f"{cl_dev.id}: hetero fused relevancy+top-k"] = cl_fused
        expected = np.sort(torch.topk(torch.bmm(torch.bmm(keys[:, 0], qw[..., :-1].transpose(1, 2)).relu_(),
                                                qw[..., -1:])[..., 0], TOP_K).indices.numpy())
        got = cl_fused().get()[0, 0]
        assert (got == expected).mean() > 0.999, "OpenCL selection disagrees with torch"
    for fn in fns.values():  # warm-up: kernels built, buffers faulted in
        fn()
    device_times.clear()
    samples = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    torch_best = min((name for name in fns if name.startswith("torch:cpu")), key=lambda k: statistics.median(samples[k]))
    best_s = statistics.median(samples[torch_best])
    key_bytes, flops = n * DIM * 4, 2 * n * HEADS * (DIM + 1)
    rows = []
    for name, times in samples.items():
        device = name.split(":")[0] if not name.startswith("opencl") else cl_dev.id
        device = "torch:cpu" if device == "torch" else device
        med = statistics.median(times)
        rows.append({"context": n, "implementation": name, "median_ms": 1e3 * med, "min_ms": 1e3 * min(times),
                     "samples_ms": [1e3 * t for t in times], "vs_best_torch": med / best_s,
                     "best_torch": name == torch_best,
                     "bandwidth_GBps": key_bytes / med / 1e9,
                     "bandwidth_efficiency": key_bytes / med / copy_bw[device],
                     "compute_efficiency": flops / med / peak})
    if device_times:
        med = statistics.median(device_times)
        rows.append({"context": n, "implementation": f"{cl_dev.id}: hetero fused (device time)", "median_ms": 1e3 * med,
                     "min_ms": 1e3 * min(device_times), "vs_best_torch": med / best_s, "best_torch": False,
                     "bandwidth_GBps": key_bytes / med / 1e9, "bandwidth_efficiency": key_bytes / med / copy_bw[cl_dev.id],
                     "compute_efficiency": flops / med / peak})
    for r in rows:
        print(f"{n:>7} {r['implementation']:<52} {r['median_ms']:8.2f} ms  x{r['vs_best_torch']:.2f} of best torch  "
              f"bw {r['bandwidth_efficiency']:.0%}  compute {r['compute_efficiency']:.0%}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    cl = [d for d in hetero.devices() if d.backend == "opencl"]
    cl_dev = cl[0] if cl else None
    if cl_dev is None:
        print(f"no OpenCL device ({hetero.backend_problems().get('opencl')}): torch and host only")
    copy_bw = {d.id: BACKENDS[d.backend].copy_bandwidth(d) for d in hetero.devices()}
    peak = flops_peak(9)
    rows = [r for n in args.contexts for r in run_context(n, args.repeats, cl_dev, copy_bw, peak)]
    info = machine()
    payload = {"machine": info, "index_heads": HEADS, "index_dim": DIM, "top_k": TOP_K, "repeats": args.repeats,
               "copy_GBps": {k: v / 1e9 for k, v in copy_bw.items()}, "float32_matmul_GFLOPs": peak / 1e9,
               "rows": rows}
    table = md_table(["context", "implementation", "median ms", "x best torch", "GB/s", "of copy bw", "of matmul peak"],
                     [[f"{r['context']:,}", ("**" + r["implementation"] + "**") if r["best_torch"] else r["implementation"],
                       f"{r['median_ms']:.2f}", f"{r['vs_best_torch']:.2f}", f"{r['bandwidth_GBps']:.1f}",
                       f"{r['bandwidth_efficiency']:.0%}", f"{r['compute_efficiency']:.0%}"] for r in rows])
    md = (f"# DSA indexer: relevancy + top-{TOP_K} ({HEADS} index heads x {DIM}, float32 keys)\n\n"
          f"{info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']} ({info['torch_threads']} threads), "
          f"{info['date']}; median of {args.repeats} interleaved runs. Bold: the best torch formulation (the baseline).\n"
          + "\n".join(f"- copy bandwidth on {k} (read + write): {v / 1e9:.1f} GB/s" for k, v in copy_bw.items())
          + f"\n- float32 matmul (2048^3, best of 9) on torch:cpu: {peak / 1e9:.0f} GFLOP/s\n\n" + table
          + "\nThe scores are a [context x 128] x [128 x 64] GEMM: 64 FLOP per byte of index key, so on this CPU "
            "the step is compute-bound and the bandwidth efficiency is low by construction.\n")
    for path in write_results("dsa_indexer", payload, md):
        print("wrote", path)


if __name__ == "__main__":
    main()
