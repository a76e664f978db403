"""The C++ host shim (hetero._host) against torch and numpy on the same machine, same run.

    python bench/host_shim.py                  # 15 repeats per measurement
    python bench/host_shim.py --repeats 30

Measures (medians of --repeats runs after a warm-up):
  * copy bandwidth: numpy and torch copies of 256 MB (bytes read + written);
  * gather of 2,048 tokens (128 pages of 16) per KV head from a [1, 8, 131072, 128] float32
    cache: host.gather_pages (pooled output, and into a given array) vs torch.index_select on
    the page-blocked view (fresh output, and out=) vs numpy.take, with its bandwidth (bytes
    read + written) as a fraction of the copy bandwidth;
  * top-k: host.topk vs torch.topk for (R, N, k) in (8, 8192, 128), (64, 8192, 128),
    (256, 4096, 64), (8, 131072, 2048);
  * page-sparse relevancy, B=1, H=8, G=4, D=128, 8,192 pages of 16 (a 67 MB float32 summary),
    k=128: host.page_scores vs the torch bmm of [min | max] x [min(q, 0) | max(q, 0)], and
    host.page_topk vs that bmm + torch.topk, with the summary read rate against the copy
    bandwidth.

Every host result is checked against its torch counterpart before it is timed. The machine
may be shared: compare the ratios of one run, not absolute times across runs.
Writes bench/results/host_shim.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, md_table, median_time, write_results  # noqa: E402

import hetero._host as host  # noqa: E402

MB = 1e6


def timed(fn, repeats):
    med, samples = median_time(fn, repeats, warmup=2)
    return {"median_s": med, "min_s": min(samples), "max_s": max(samples), "repeats": len(samples)}


def copy_bandwidth(repeats):
    n = 256 * 1024 * 1024 // 4
    a = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    b = np.empty_like(a)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {}
    for name, fn in (("numpy", lambda: np.copyto(b, a)), ("torch", lambda: tb.copy_(ta))):
        t = timed(fn, repeats)
        t["GBps"] = 2 * a.nbytes / t["median_s"] / 1e9
        out[name] = t
    out["best_GBps"] = max(out["numpy"]["GBps"], out["torch"]["GBps"])
    return out


def bench_gather(repeats, copy_gbps):
    batch, heads, seq, dim, page, k = 1, 8, 131072, 128, 16, 128
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((batch, heads, seq, dim), dtype=np.float32)
    pages = seq // page
    ids = np.sort(np.stack([rng.choice(pages, k, replace=False) for _ in range(batch * heads)]), -1)
    ids = ids.reshape(batch, heads, k).astype(np.int32)
    tcache = torch.from_numpy(cache)
    flat = torch.from_numpy((np.arange(batch * heads)[:, None] * pages + ids.reshape(batch * heads, k)).reshape(-1))
    flat = flat.long()
    blocked = tcache.view(-1, page, dim)
    np_blocked = cache.reshape(-1, page, dim)
    np_flat = flat.numpy()
    shape = (batch, heads, k * page, dim)
    out_np = np.empty(shape, np.float32)
    out_t = torch.empty(batch * heads * k, page, dim)
    out_take = np.empty((batch * heads * k, page, dim), np.float32)

    want = blocked.index_select(0, flat).view(shape).numpy()
    assert np.array_equal(host.gather_pages(cache, ids, page), want)
    assert np.array_equal(np.take(np_blocked, np_flat, axis=0).reshape(shape), want)

    variants = {
        "host.gather_pages (pooled out)": lambda: host.gather_pages(cache, ids, page),
        "host.gather_pages (out=)": lambda: host.gather_pages(cache, ids, page, out=out_np),
        "torch.index_select": lambda: blocked.index_select(0, flat),
        "torch.index_select (out=)": lambda: torch.index_select(blocked, 0, flat, out=out_t),
        "numpy.take": lambda: np.take(np_blocked, np_flat, axis=0),
        "numpy.take (out=)": lambda: np.take(np_blocked, np_flat, axis=0, out=out_take),
    }
    moved = 2 * want.nbytes  # read + written
    rows = {}
    for name, fn in variants.items():
        t = timed(fn, repeats)
        t["GBps"] = moved / t["median_s"] / 1e9
        t["fraction_of_copy"] = t["GBps"] / copy_gbps
        rows[name] = t
    return {"shape": {"cache": list(cache.shape), "pages_per_head": k, "page": page, "tokens_per_head": k * page,
                      "bytes_moved": moved}, "variants": rows}


def bench_topk(repeats):
    out = []
    for rows, n, k in ((8, 8192, 128), (64, 8192, 128), (256, 4096, 64), (8, 131072, 2048)):
        x = np.random.default_rng(rows * n + k).standard_normal((rows, n), dtype=np.float32)
        t = torch.from_numpy(x)
        hv, hi = host.topk(x, k)
        tv, ti = torch.topk(t, k, dim=-1)
        # Same values; indices may differ from torch's only inside runs of equal values (torch
        # leaves that order unspecified, the shim gives the lower index first).
        assert np.array_equal(hv, tv.numpy()) and np.array_equal(np.take_along_axis(x, hi, 1), hv)
        host_t = timed(lambda: host.topk(x, k), repeats)
        torch_t = timed(lambda: torch.topk(t, k, dim=-1), repeats)
        out.append({"rows": rows, "n": n, "k": k, "host": host_t, "torch": torch_t,
                    "speedup": torch_t["median_s"] / host_t["median_s"]})
    return out


def torch_relevancy(summary, query, lengths, n_pages, page):
    """The torch formulation: one bmm of [min | max] x [min(q, 0) | max(q, 0)], max over the
    group, -inf past each sequence's end."""
    batch, heads, _, _, dim = summary.shape
    group = query.shape[1] // heads
    pages = summary[:, :, :n_pages].flatten(0, 1).flatten(-2)
    q = query.reshape(batch * heads, group, dim)
    weights = torch.cat([q.clamp(max=0), q.clamp(min=0)], -1).transpose(1, 2)
    scores = torch.bmm(pages, weights).amax(-1).view(batch, heads, n_pages)
    valid = torch.arange(n_pages) < ((lengths + page - 1) // page)[:, None]
    return scores.masked_fill_(~valid[:, None, :], -math.inf)


def torch_page_topk(summary, query, lengths, n_pages, page, k, sink, local):
    """bmm relevancy, then retrieval with torch.topk: forced pages ranked first, the rest by score."""
    scores = torch_relevancy(summary, query, lengths, n_pages, page)
    n = ((lengths + page - 1) // page)[:, None, None]
    idx = torch.arange(n_pages)
    forced = ((idx < sink) | (idx >= n - local)) & (idx < n)
    ranked = scores.masked_fill(forced, math.inf)
    return torch.topk(ranked, k, dim=-1).indices.sort(-1).values


def bench_pages(repeats, copy_gbps):
    batch, heads, group, dim, n_pages, page, k, sink, local = 1, 8, 4, 128, 8192, 16, 128, 1, 2
    rng = np.random.default_rng(2)
    mn = rng.standard_normal((batch, heads, n_pages, dim), dtype=np.float32)
    summary = np.stack([mn, mn + np.abs(rng.standard_normal(mn.shape, dtype=np.float32))], axis=3)
    query = rng.standard_normal((batch, heads * group, dim), dtype=np.float32)
    lengths = np.full(batch, n_pages * page, np.int64)
    ts, tq, tl = torch.from_numpy(summary), torch.from_numpy(query), torch.from_numpy(lengths)

    hs = host.page_scores(summary, query, lengths, n_pages, page)
    tsc = torch_relevancy(ts, tq, tl, n_pages, page).numpy()
    np.testing.assert_allclose(hs, tsc, rtol=1e-4, atol=1e-3)
    hi = host.page_topk(summary, query, lengths, n_pages, page, k, sink, local)
    ti = torch_page_topk(ts, tq, tl, n_pages, page, k, sink, local).numpy()
    agree = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(hi.reshape(-1, k), ti.reshape(-1, k))]))
    assert agree > 0.97, agree  # float rounding may swap near-ties at the k-th place

    half = summary.astype(np.float16)
    variants = {
        "host.page_scores": lambda: host.page_scores(summary, query, lengths, n_pages, page),
        "torch bmm relevancy": lambda: torch_relevancy(ts, tq, tl, n_pages, page),
        "host.page_topk": lambda: host.page_topk(summary, query, lengths, n_pages, page, k, sink, local),
        "torch bmm + topk": lambda: torch_page_topk(ts, tq, tl, n_pages, page, k, sink, local),
        "host.page_topk (float16 summary)": lambda: host.page_topk(half, query, lengths, n_pages, page, k, sink,
                                                                    local),
    }
    rows = {}
    for name, fn in variants.items():
        t = timed(fn, repeats)
        nbytes = half.nbytes if "float16" in name else summary.nbytes
        t["summary_read_GBps"] = nbytes / t["median_s"] / 1e9
        t["fraction_of_copy"] = t["summary_read_GBps"] / copy_gbps
        rows[name] = t
    return {"shape": {"batch": batch, "kv_heads": heads, "group": group, "head_dim": dim, "pages": n_pages,
                      "page": page, "k": k, "sink_pages": sink, "local_pages": local,
                      "summary_bytes": summary.nbytes},
            "agreement_with_torch_ids": agree, "variants": rows}


def ms(t):
    return f"{t['median_s'] * 1e3:.3f}"


def markdown(info, copy, gather, topk, pages):
    lines = [f"# Host shim benchmark\n\n{info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']} "
             f"({info['torch_threads']} threads), shim threads {host.num_threads()}, relevancy kernel "
             f"{host.build_info()['score_kernel']}. {info['date']}. Medians of {copy['numpy']['repeats']} runs.\n",
             f"Copy bandwidth (256 MB, read + write): numpy {copy['numpy']['GBps']:.1f} GB/s, "
             f"torch {copy['torch']['GBps']:.1f} GB/s.\n",
             "## Gather: 128 pages of 16 tokens per KV head from [1, 8, 131072, 128] float32\n"]
    base = gather["variants"]["torch.index_select"]["median_s"]
    lines.append(md_table(["variant", "ms", "GB/s (read + write)", "of copy bandwidth", "vs torch.index_select"],
                          [[name, ms(t), f"{t['GBps']:.1f}", f"{t['fraction_of_copy']:.0%}",
                            f"{base / t['median_s']:.2f}x"] for name, t in gather["variants"].items()]))
    lines.append("\nThe 8 MB output stays in the last-level cache between calls while the 256 MB copy goes to DRAM "
                 "both ways, so a gather can exceed the copy's rate: its reads of the scattered pages are the DRAM "
                 "traffic.\n")
    lines.append("\n## Top-k (float32 rows; values sorted descending, ties to the lower index)\n")
    lines.append(md_table(["R", "N", "k", "host.topk ms", "torch.topk ms", "host speedup"],
                          [[r["rows"], r["n"], r["k"], ms(r["host"]), ms(r["torch"]), f"{r['speedup']:.2f}x"]
                           for r in topk]))
    s = pages["shape"]
    lines.append(f"\n## Page-sparse relevancy: B={s['batch']}, H={s['kv_heads']}, G={s['group']}, "
                 f"D={s['head_dim']}, {s['pages']} pages of {s['page']} ({s['summary_bytes'] / MB:.0f} MB summary), "
                 f"k={s['k']}\n")
    v = pages["variants"]
    rows = []
    for name, t in v.items():
        ref = {"host.page_scores": "torch bmm relevancy", "host.page_topk": "torch bmm + topk",
               "host.page_topk (float16 summary)": "torch bmm + topk"}.get(name)
        rows.append([name, ms(t), f"{t['summary_read_GBps']:.1f}", f"{t['fraction_of_copy']:.0%}",
                     f"{v[ref]['median_s'] / t['median_s']:.2f}x" if ref else ""])
    lines.append(md_table(["variant", "ms", "summary read GB/s", "of copy bandwidth (r+w)", "vs torch"], rows))
    lines.append("\nThe summary is only read (no write), so its rate is compared with a copy's read + write rate.\n")
    lines.append(f"\nhost.page_topk and torch agree on {pages['agreement_with_torch_ids']:.1%} of the chosen pages "
                 "(float32 rounding differs between a bmm and the shim's loop near the k-th score).\n")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    repeats = max(10, args.repeats)
    info = machine()
    info["host_shim"] = host.build_info()
    copy = copy_bandwidth(repeats)
    gather = bench_gather(repeats, copy["best_GBps"])
    topk = bench_topk(repeats)
    pages = bench_pages(repeats, copy["best_GBps"])
    payload = {"machine": info, "copy_bandwidth": copy, "gather": gather, "topk": topk, "page_sparse": pages}
    md = markdown(info, copy, gather, topk, pages)
    json_path, md_path = write_results("host_shim", payload, md)
    print(md)
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
