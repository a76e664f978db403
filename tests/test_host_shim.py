"""The C++ host shim (hetero._host): buffers, gather/scatter, top-k and page-sparse relevancy
against numpy references and hetero.methods.page_sparse_reference, bad input, and threads."""

from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hetero._host as host
from hetero.methods import page_sparse_reference as ref

DEFAULT_ISA = host.build_info()["score_kernel"]
# Every variant of the relevancy kernel this CPU can run (the widest is the default).
ISAS = [isa for isa in ("avx512", "avx2", "baseline") if host._set_score_isa(isa)]
host._set_score_isa(DEFAULT_ISA)


class use_isa:
    def __init__(self, isa):
        self.isa = isa

    def __enter__(self):
        assert host._set_score_isa(self.isa)

    def __exit__(self, *exc):
        host._set_score_isa(DEFAULT_ISA)


def dyadic(rng, shape, levels=9):
    """Values in {-2, -1.5, ..., 2} (or fewer levels): float32 products and sums of these are
    exact, so scores equal the float64 reference bit for bit and ties are real ties."""
    return ((rng.integers(0, levels, size=shape) - levels // 2) / 2).astype(np.float32)


# ---- build ---------------------------------------------------------------------------


def test_shim_reports_its_build():
    info = host.build_info()
    assert info["compiler"] and info["cplusplus"] >= 201703
    assert info["hardware_threads"] >= 1
    assert info["threads"] >= 1
    assert info["score_kernel"] in ("avx512", "avx2", "baseline")
    assert host.num_threads() >= 1


def test_set_num_threads_round_trip():
    before = host.num_threads()
    try:
        host.set_num_threads(1)
        assert host.num_threads() == 1
        x = np.random.default_rng(0).standard_normal((4, 50000), dtype=np.float32)
        v1, i1 = host.topk(x, 10)
        host.set_num_threads(0)
        v2, i2 = host.topk(x, 10)
        assert np.array_equal(i1, i2) and np.array_equal(v1, v2)
        with pytest.raises(ValueError):
            host.set_num_threads(-1)
    finally:
        host.set_num_threads(before)


# ---- buffers ---------------------------------------------------------------------------


def test_buffers_are_page_aligned_and_viewable():
    pool = host.BufferPool()
    for n in (0, 1, 100, 4096, 4097, 1 << 20):
        buf = pool.acquire(n)
        assert buf.address % 4096 == 0 and buf.nbytes == n == len(buf) and buf.capacity >= max(n, 1)
        a = np.asarray(buf)
        assert a.dtype == np.uint8 and a.shape == (n,) and a.flags.writeable
        if n:
            assert a.ctypes.data == buf.address
            a[:] = 7
            assert bytes(memoryview(buf)[:1]) == b"\x07"
    buf = pool.acquire(1024)
    f = np.frombuffer(buf, np.float32)
    f[:] = np.arange(256)
    t = torch.frombuffer(buf, dtype=torch.float32)
    assert t.data_ptr() == buf.address and t[255].item() == 255.0
    t[0] = -1
    assert f[0] == -1


def test_live_view_keeps_its_buffer_out_of_the_pool():
    pool = host.BufferPool()
    buf = pool.acquire(8192)
    addr = buf.address
    view = np.frombuffer(buf, np.uint8)  # the view holds a reference to the buffer
    view[:] = 7
    del buf
    gc.collect()
    assert pool.stats()["in_use_buffers"] == 1 and pool.stats()["free_buffers"] == 0
    other = pool.acquire(8192)  # must not be the memory still viewed
    other_addr = other.address
    assert other_addr != addr
    np.frombuffer(other, np.uint8)[:] = 9
    assert (view == 7).all()
    torch_view = torch.frombuffer(other, dtype=torch.uint8)
    del other
    gc.collect()
    third = pool.acquire(8192)
    assert third.address not in (addr, torch_view.data_ptr())
    del view, torch_view
    gc.collect()
    stats = pool.stats()
    assert stats["free_buffers"] == 2 and stats["in_use_buffers"] == 1
    again = pool.acquire(8192)  # now reused
    assert again.address in (addr, other_addr)
    assert pool.stats()["hits"] == 1


def test_pool_reuses_and_reports():
    pool = host.BufferPool()
    a = pool.acquire(10000)
    addr = a.address
    del a
    s = pool.stats()
    assert s["free_buffers"] == 1 and s["misses"] == 1 and s["hits"] == 0
    assert s["allocated_bytes"] == s["free_bytes"] == 12288 and s["in_use_bytes"] == 0
    b = pool.acquire(9000)  # fits the free 12 KiB block
    assert b.address == addr and pool.stats()["hits"] == 1
    c = pool.acquire(100)  # a small request does not take a much larger block
    assert c.address != addr
    del b, c
    pool.clear()
    assert pool.stats()["allocated_bytes"] == 0 and pool.stats()["free_buffers"] == 0
    pool.max_cached_bytes = 4096
    d = pool.acquire(100000)
    del d
    assert pool.stats()["free_buffers"] == 0  # over the cache limit: freed
    with pytest.raises(ValueError):
        pool.acquire(-1)
    with pytest.raises(ValueError):
        host.BufferPool(-5)


def test_buffer_outlives_its_pool():
    pool = host.BufferPool()
    buf = pool.acquire(4096)
    view = np.frombuffer(buf, np.uint8)
    del pool, buf
    gc.collect()
    view[:] = 3
    assert view.sum() == 3 * 4096


def test_pool_is_thread_safe():
    pool = host.BufferPool()
    seen_live = []
    lock = threading.Lock()

    def work(i):
        held = []
        for j in range(200):
            b = pool.acquire(4096 * (1 + (i + j) % 4))
            a = np.frombuffer(b, np.uint8)
            a[:] = i
            held.append((a, i))
            if len(held) > 3:
                arr, val = held.pop(0)
                assert (arr == val).all()  # nobody else wrote into a live buffer
        with lock:
            seen_live.extend(held)
        return True

    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(work, range(8)))
    assert all((arr == val).all() for arr, val in seen_live)
    del seen_live
    gc.collect()
    assert pool.stats()["in_use_buffers"] == 0


def test_default_pool_backs_gather_output():
    pool = host.default_pool()
    assert pool is host.default_pool() or pool.stats() == host.default_pool().stats()
    cache = np.ones((1, 1, 32, 8), np.float32)
    out = host.gather_pages(cache, np.array([[[1, 0]]], np.int32), 16)
    assert out.ctypes.data % 4096 == 0 and out.flags.writeable and out.flags.c_contiguous
    assert isinstance(out.base, host.HostBuffer)
    before = pool.stats()["in_use_buffers"]
    del out
    gc.collect()
    assert pool.stats()["in_use_buffers"] == before - 1


# ---- gather / scatter ------------------------------------------------------------------


def gather_reference(cache, ids, page):
    b, h, s, d = cache.shape
    k = ids.shape[-1]
    out = np.zeros((b, h, k * page, d), cache.dtype)
    for bi in range(b):
        for hi in range(h):
            for i, p in enumerate(ids[bi, hi]):
                if p >= 0:
                    block = cache[bi, hi, p * page: min((p + 1) * page, s)]
                    out[bi, hi, i * page: i * page + len(block)] = block
    return out


@given(st.data())
def test_gather_matches_reference(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    b, h = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    page = data.draw(st.sampled_from([1, 3, 16]))
    s = data.draw(st.integers(1, 80))
    d = data.draw(st.sampled_from([1, 5, 64]))
    dtype = data.draw(st.sampled_from([np.float32, np.float16, np.uint16]))
    n_pages = -(-s // page)
    k = data.draw(st.integers(0, 6))
    cache = (rng.standard_normal((b, h, s, d)) * 100).astype(dtype)
    ids = rng.integers(-1, n_pages, size=(b, h, k)).astype(data.draw(st.sampled_from([np.int32, np.int64])))
    want = gather_reference(cache, ids, page)
    got = host.gather_pages(cache, ids, page)
    assert got.dtype == cache.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    out = np.full(want.shape, 5, dtype)
    assert host.gather_pages(cache, ids, page, out=out) is out
    np.testing.assert_array_equal(out, want)


def test_gather_large_multithreaded_and_torch_inputs():
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((2, 4, 4000, 64), dtype=np.float32)  # 250 pages of 16 per head
    ids = np.sort(rng.choice(250, size=(2, 4, 100)), axis=-1).astype(np.int32)
    ids[:, :, -3:] = -1
    want = gather_reference(cache, ids, 16)
    np.testing.assert_array_equal(host.gather_pages(cache, ids, 16), want)
    out = torch.zeros(want.shape)
    host.gather_pages(torch.from_numpy(cache), torch.from_numpy(ids), 16, out=out)
    np.testing.assert_array_equal(out.numpy(), want)
    # The torch formulation the bench compares with gives the same blocks.
    flat = (torch.arange(8).view(2, 4, 1) * 250 + torch.from_numpy(ids).clamp(min=0).long()).flatten()
    sel = torch.from_numpy(cache).view(-1, 16, 64).index_select(0, flat).view(want.shape).numpy()
    valid = np.repeat(ids >= 0, 16, axis=-1)[..., None]
    np.testing.assert_array_equal(np.where(valid, sel, 0), want)


def test_gather_partial_last_page_is_zero_filled():
    cache = np.arange(1 * 1 * 10 * 2, dtype=np.float32).reshape(1, 1, 10, 2) + 1
    out = host.gather_pages(cache, np.array([[[2, -1, 0]]], np.int32), 4)
    np.testing.assert_array_equal(out[0, 0, :2], cache[0, 0, 8:10])
    assert (out[0, 0, 2:8] == 0).all()
    np.testing.assert_array_equal(out[0, 0, 8:12], cache[0, 0, 0:4])


def test_gather_rejects_bad_input():
    cache = np.zeros((1, 2, 32, 8), np.float32)
    ids = np.zeros((1, 2, 3), np.int32)
    with pytest.raises(IndexError, match="page_ids"):
        host.gather_pages(cache, np.full((1, 2, 3), 2, np.int32), 16)  # 2 pages only
    with pytest.raises(IndexError, match="page_ids"):
        host.gather_pages(cache, np.full((1, 2, 3), -2, np.int32), 16)
    with pytest.raises(TypeError, match="cache"):
        host.gather_pages(cache.astype(np.float64), ids, 16)
    with pytest.raises(TypeError, match="page_ids"):
        host.gather_pages(cache, ids.astype(np.float32), 16)
    with pytest.raises(TypeError, match="page_ids"):
        host.gather_pages(cache, ids.astype(np.uint32), 16)
    with pytest.raises(ValueError, match="C-contiguous"):
        host.gather_pages(np.zeros((1, 2, 32, 16), np.float32)[..., ::2], ids, 16)
    with pytest.raises(ValueError, match="4-D"):
        host.gather_pages(cache[0], ids, 16)
    with pytest.raises(ValueError, match="page_ids must have shape"):
        host.gather_pages(cache, np.zeros((2, 2, 3), np.int32), 16)
    with pytest.raises(ValueError, match="page_size"):
        host.gather_pages(cache, ids, 0)
    with pytest.raises(ValueError, match="out must have shape"):
        host.gather_pages(cache, ids, 16, out=np.zeros((1, 2, 47, 8), np.float32))
    with pytest.raises(TypeError, match="out must have the cache's dtype"):
        host.gather_pages(cache, ids, 16, out=np.zeros((1, 2, 48, 8), np.float16))
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros((1, 2, 48, 8), np.float32)
        ro.flags.writeable = False
        host.gather_pages(cache, ids, 16, out=ro)
    shared = np.zeros(2 * 48 * 8, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        host.gather_pages(shared[: 2 * 32 * 8].reshape(1, 2, 32, 8), ids, 16, out=shared.reshape(1, 2, 48, 8))
    with pytest.raises(TypeError, match="out"):
        host.gather_pages(cache, ids, 16, out=[0.0])
    with pytest.raises(TypeError, match="out"):
        host.gather_pages(cache, ids, 16, out=torch.zeros((1, 2, 48, 8), requires_grad=True))
    with pytest.raises(TypeError):
        host.gather_pages(None, ids, 16)
    with pytest.raises(TypeError, match="native byte order"):
        host.gather_pages(cache.astype(">f4"), ids, 16)
    ok = host.gather_pages(cache, ids, 16)  # the failures wrote nothing and broke nothing
    assert ok.shape == (1, 2, 48, 8)


def test_scatter_tokens():
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float16, np.uint16):
        cache = (rng.standard_normal((3, 2, 40, 8)) * 10).astype(dtype)
        new = (rng.standard_normal((3, 2, 5, 8)) * 10).astype(dtype)
        start = np.array([0, 35, 17], np.int64)
        want = cache.copy()
        for b in range(3):
            want[b, :, start[b]: start[b] + 5] = new[b]
        host.scatter_tokens(cache, new, start.astype(np.int32))
        np.testing.assert_array_equal(cache, want)
    big = np.zeros((1, 8, 4096, 64), np.float32)  # multithreaded path
    new = rng.standard_normal((1, 8, 1024, 64), dtype=np.float32)
    host.scatter_tokens(torch.from_numpy(big), torch.from_numpy(new), torch.tensor([3000]))
    np.testing.assert_array_equal(big[:, :, 3000:4024], new)
    assert (big[:, :, :3000] == 0).all() and (big[:, :, 4024:] == 0).all()


def test_scatter_rejects_bad_input():
    cache = np.zeros((2, 2, 16, 4), np.float32)
    new = np.ones((2, 2, 3, 4), np.float32)
    with pytest.raises(IndexError, match="start"):
        host.scatter_tokens(cache, new, np.array([0, 14]))
    with pytest.raises(IndexError, match="start"):
        host.scatter_tokens(cache, new, np.array([-1, 0]))
    with pytest.raises(ValueError, match="start must have shape"):
        host.scatter_tokens(cache, new, np.array([0]))
    with pytest.raises(TypeError, match="start"):
        host.scatter_tokens(cache, new, np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="new"):
        host.scatter_tokens(cache, new.astype(np.float16), np.array([0, 0]))
    with pytest.raises(ValueError, match="new must have shape"):
        host.scatter_tokens(cache, np.ones((2, 2, 3, 5), np.float32), np.array([0, 0]))
    with pytest.raises(ValueError, match="overlap"):
        flat = np.zeros(2 * 2 * 16 * 4, np.float32)
        host.scatter_tokens(flat.reshape(2, 2, 16, 4), flat[: 2 * 2 * 3 * 4].reshape(2, 2, 3, 4), np.array([0, 0]))
    with pytest.raises(TypeError, match="cache"):
        host.scatter_tokens([[0.0]], new, np.array([0, 0]))
    ro = cache.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        host.scatter_tokens(ro, new, np.array([0, 0]))
    assert (cache == 0).all()


# ---- top-k -----------------------------------------------------------------------------


def topk_reference(x, k):
    idx = np.stack([np.lexsort((np.arange(x.shape[1]), -row))[:k] for row in x]).astype(np.int32)
    return np.take_along_axis(x, idx, 1), idx


def check_topk(x, k):
    v, i = host.topk(x, k)
    wv, wi = topk_reference(x, k)
    assert v.dtype == np.float32 and i.dtype == np.int32 and v.shape == i.shape == (x.shape[0], k)
    np.testing.assert_array_equal(i, wi)
    np.testing.assert_array_equal(v, wv)


values_with_ties = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, 1e30, -1e30, float("-inf"), float("inf"), 3.0])


@given(st.data())
def test_topk_matches_sorting_by_value_then_index(data):
    rows = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 200))
    k = data.draw(st.integers(1, n))
    if data.draw(st.booleans()):
        x = np.array(data.draw(st.lists(values_with_ties, min_size=rows * n, max_size=rows * n)), np.float32)
    else:
        x = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).standard_normal(rows * n).astype(np.float32)
    check_topk(x.reshape(rows, n), k)


@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (3, 7, 7), (8, 8192, 128), (5, 4096, 64), (2, 300000, 100),
                                      (1, 200000, 5000), (3, 70000, 1), (4, 20000, 20000), (300, 512, 32)])
def test_topk_shapes(rows, n, k):
    rng = np.random.default_rng(rows * n + k)
    check_topk(rng.standard_normal((rows, n), dtype=np.float32), k)


@pytest.mark.parametrize("n", [17, 5000, 200000])
def test_topk_adversarial(n):
    k = min(n, 100)
    check_topk(np.zeros((2, n), np.float32), k)  # all equal: the first k indices
    check_topk(np.full((2, n), -np.inf, np.float32), k)
    ramp = np.arange(n, dtype=np.float32)
    check_topk(np.stack([ramp, ramp[::-1].copy()]), k)  # every element beats the last
    plateau = np.repeat(np.arange(n // 10 + 1, dtype=np.float32), 10)[:n]
    check_topk(np.stack([plateau, -plateau]), k)
    sign = np.zeros((1, n), np.float32)
    sign[0, ::2] = -0.0  # -0.0 ties with +0.0: lower index first
    check_topk(sign, k)
    mixed = np.random.default_rng(n).choice(np.array([-np.inf, 0.0, 1.0], np.float32), size=(3, n))
    check_topk(mixed, k)


def test_topk_rejects_bad_input():
    x = np.zeros((2, 10), np.float32)
    for k in (0, -1, 11):
        with pytest.raises(ValueError, match="k must be"):
            host.topk(x, k)
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        host.topk(bad, 2)
    big = np.random.default_rng(0).standard_normal((1, 300000), dtype=np.float32)
    big[0, 250000] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        host.topk(big, 10)
    with pytest.raises(TypeError, match="float32"):
        host.topk(x.astype(np.float64), 2)
    with pytest.raises(ValueError, match="2-D"):
        host.topk(x.reshape(2, 5, 2), 2)
    with pytest.raises(ValueError, match="C-contiguous"):
        host.topk(np.zeros((4, 10), np.float32)[::2], 2)
    with pytest.raises(ValueError, match="k must be"):
        host.topk(np.zeros((3, 0), np.float32), 1)
    v, i = host.topk(np.zeros((0, 5), np.float32), 2)
    assert v.shape == i.shape == (0, 2)


@given(st.data())
def test_merge_topk(data):
    rows = data.draw(st.integers(1, 4))
    parts = data.draw(st.integers(1, 5))
    span = data.draw(st.integers(1, 50))
    kin = data.draw(st.integers(1, span))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = rng.choice(np.array([-np.inf, -1, 0, 0.5, 1, 2], np.float32), size=(rows, parts * span))
    pv, pi = zip(*[host.topk(np.ascontiguousarray(x[:, p * span:(p + 1) * span]), kin) for p in range(parts)])
    pi = [i + p * span for p, i in enumerate(pi)]
    k = data.draw(st.integers(1, parts * kin))
    v, i = host.merge_topk(np.stack(pv), np.stack(pi).astype(np.int32), k)
    # The best k of the union of the lists, ranked by (-value, index)...
    uv, ui = np.concatenate(pv, axis=1), np.concatenate(pi, axis=1)
    order = np.stack([np.lexsort((ui[r], -uv[r]))[:k] for r in range(rows)])
    np.testing.assert_array_equal(i, np.take_along_axis(ui, order, 1))
    np.testing.assert_array_equal(v, np.take_along_axis(uv, order, 1))
    if k <= kin:  # ...which is the global top k when every list holds at least k
        wv, wi = topk_reference(x, k)
        np.testing.assert_array_equal(i, wi)
        np.testing.assert_array_equal(v, wv)


def test_merge_topk_rejects_bad_input():
    v = np.zeros((2, 3, 4), np.float32)
    i = np.zeros((2, 3, 4), np.int32)
    with pytest.raises(ValueError, match="k must be"):
        host.merge_topk(v, i, 9)
    with pytest.raises(ValueError, match="same shape"):
        host.merge_topk(v, i[:, :, :3].copy(), 2)
    with pytest.raises(TypeError, match="indices"):
        host.merge_topk(v, i.astype(np.int64), 2)
    with pytest.raises(ValueError, match="3-D"):
        host.merge_topk(v[0], i[0], 2)
    bad = v.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        host.merge_topk(bad, i, 2)


# ---- page-sparse relevancy and retrieval ------------------------------------------------


def make_case(rng, batch, heads, group, dim, page, lengths, levels=9, extra_pages=0, keys=None):
    lengths = [int(n) for n in lengths]
    seq = max(max(lengths), 1)
    if keys is None:
        keys = dyadic(rng, (batch, heads, seq, dim), levels)
    mn, mx = ref.page_minmax(keys, lengths, page)
    n_pages = mn.shape[2]
    summary = np.empty((batch, heads, n_pages + extra_pages, 2, dim), np.float32)
    summary[:, :, :, 0] = np.inf
    summary[:, :, :, 1] = -np.inf
    summary[:, :, :n_pages, 0] = mn
    summary[:, :, :n_pages, 1] = mx
    query = dyadic(rng, (batch, heads * group, dim), levels)
    scores = ref.relevancy(mn, mx, query, lengths, page)
    return summary, query, np.array(lengths, np.int64), n_pages, page, scores


def check_pages(summary, query, lengths, n_pages, page, scores, k, sink, local):
    got = host.page_scores(summary, query, lengths, n_pages, page)
    assert got.dtype == np.float32 and got.shape == scores.shape
    np.testing.assert_array_equal(got, scores.astype(np.float32))
    want = ref.retrieval(scores, list(lengths), page, k, sink, local)
    ids = host.page_topk(summary, query, lengths, n_pages, page, k, sink, local)
    assert ids.dtype == np.int32 and ids.shape == want.shape
    np.testing.assert_array_equal(ids, want)
    # float16 summaries of dyadic values are exact: the same answers.
    half = summary.astype(np.float16)
    np.testing.assert_array_equal(host.page_scores(half, query, lengths.astype(np.int32), n_pages, page), got)
    np.testing.assert_array_equal(host.page_topk(half, query, lengths, n_pages, page, k, sink, local), want)


@pytest.mark.parametrize("isa", ISAS)
@given(data=st.data())
def test_page_scores_and_topk_match_reference(isa, data):
    with use_isa(isa):
        page_case(data)


def page_case(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    batch = data.draw(st.integers(1, 3))
    heads = data.draw(st.integers(1, 3))
    group = data.draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    dim = data.draw(st.sampled_from([1, 3, 16, 20, 33, 64]))
    page = data.draw(st.sampled_from([1, 2, 5, 16]))
    lengths = [data.draw(st.integers(0, 200)) for _ in range(batch)]
    lengths[data.draw(st.integers(0, batch - 1))] = data.draw(st.integers(1, 200))
    levels = data.draw(st.sampled_from([3, 9]))  # 3 levels: plateaus of equal scores
    summary, query, lengths, n_pages, _, scores = make_case(rng, batch, heads, group, dim, page, lengths, levels,
                                                         extra_pages=data.draw(st.integers(0, 3)))
    k = data.draw(st.integers(1, n_pages))
    sink = data.draw(st.integers(0, k))
    local = data.draw(st.integers(0, k - sink))
    check_pages(summary, query, lengths, n_pages, page, scores, k, sink, local)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_page_topk_large_rows_chunked(isa, group):
    """Thousands of pages per row: several chunks per row across threads, then the merge."""
    rng = np.random.default_rng(group)
    lengths = [40000, 23333]  # pages of 8: 5000 and 2917 (a partial last page)
    summary, query, lengths, n_pages, _, scores = make_case(rng, 2, 2, group, 24, 8, lengths, levels=5)
    with use_isa(isa):
        for k, sink, local in [(100, 1, 2), (300, 0, 0), (64, 32, 32), (2917, 3, 3)]:
            check_pages(summary, query, lengths, n_pages, 8, scores, k, sink, local)


def test_page_topk_float_inputs_close_to_reference():
    """Random (non-dyadic) floats: scores within float32 rounding of the float64 reference."""
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((2, 4, 3000, 128)).astype(np.float32)
    summary, query, lengths, n_pages, _, _ = make_case(rng, 2, 4, 4, 128, 16, [3000, 2500], keys=keys)
    query = rng.standard_normal(query.shape).astype(np.float32)
    mn, mx = summary[:, :, :, 0].astype(np.float64), summary[:, :, :, 1].astype(np.float64)
    want = ref.relevancy(mn, mx, query, list(lengths), 16)
    got = host.page_scores(summary, query, lengths, n_pages, 16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    ids = host.page_topk(summary, query, lengths, n_pages, 16, 40, 1, 2)
    np.testing.assert_array_equal(ids, ref.retrieval(got.astype(np.float64), list(lengths), 16, 40, 1, 2))


def test_page_topk_adversarial():
    rng = np.random.default_rng(3)
    # All keys equal: every score ties, so the lowest non-forced pages win.
    keys = np.ones((1, 2, 100, 8), np.float32)
    case = make_case(rng, 1, 2, 4, 8, 4, [100], keys=keys)
    check_pages(*case, 10, 1, 2)
    check_pages(*case, 25, 0, 0)  # k = n_pages: all of them
    # Single page, single token.
    check_pages(*make_case(rng, 1, 1, 1, 4, 16, [1]), 1, 0, 0)
    check_pages(*make_case(rng, 1, 1, 1, 4, 16, [1]), 1, 1, 0)
    # Sink + local cover exactly k (nothing chosen by score), and cover everything.
    check_pages(*make_case(rng, 2, 2, 2, 8, 2, [40, 7]), 6, 3, 3)
    check_pages(*make_case(rng, 1, 1, 2, 8, 2, [12]), 6, 3, 3)
    # Different lengths per batch, one empty sequence.
    check_pages(*make_case(rng, 3, 2, 4, 16, 4, [0, 57, 13]), 5, 1, 1)
    # -inf scores on valid pages (keys at -inf with a positive query).
    keys = dyadic(rng, (1, 1, 64, 4))
    keys[:, :, 16:32] = -np.inf
    s, q, lengths, n_pages, _, _ = make_case(rng, 1, 1, 1, 4, 8, [64], keys=keys)
    q[:] = 1.0
    scores = ref.relevancy(s[:, :, :, 0].astype(np.float64), s[:, :, :, 1].astype(np.float64), q, [64], 8)
    assert np.isneginf(scores[0, 0, 2:4]).all()
    check_pages(s, q, lengths, n_pages, 8, scores, 3, 0, 0)
    check_pages(s, q, lengths, n_pages, 8, scores, 7, 0, 0)


def test_page_functions_accept_torch_tensors():
    rng = np.random.default_rng(4)
    summary, query, lengths, n_pages, _, scores = make_case(rng, 1, 2, 4, 16, 4, [50])
    got = host.page_scores(torch.from_numpy(summary), torch.from_numpy(query), torch.from_numpy(lengths), n_pages, 4)
    np.testing.assert_array_equal(got, scores.astype(np.float32))


def test_page_functions_reject_bad_input():
    rng = np.random.default_rng(5)
    s, q, lengths, n_pages, _, _ = make_case(rng, 2, 2, 4, 8, 4, [20, 9])  # 5 pages
    fns = [lambda *a, **kw: host.page_scores(*a, **kw),
           lambda *a, **kw: host.page_topk(*a, k=2, sink_pages=1, local_pages=1, **kw)]
    for fn in fns:
        with pytest.raises(TypeError, match="summary"):
            fn(s.astype(np.float64), q, lengths, n_pages, 4)
        with pytest.raises(TypeError, match="query"):
            fn(s, q.astype(np.float16), lengths, n_pages, 4)
        with pytest.raises(ValueError, match="summary must be 5-D"):
            fn(s[0], q, lengths, n_pages, 4)
        with pytest.raises(ValueError, match="axis 3"):
            fn(np.ascontiguousarray(np.concatenate([s, s], axis=3)), q, lengths, n_pages, 4)
        with pytest.raises(ValueError, match="C-contiguous"):
            fn(np.ascontiguousarray(np.concatenate([s, s], axis=-1))[..., ::2], q, lengths, n_pages, 4)
        with pytest.raises(ValueError, match="query must have shape"):
            fn(s, q[:, :7].copy(), lengths, n_pages, 4)  # 7 query heads for 2 KV heads
        with pytest.raises(ValueError, match="query must have shape"):
            fn(s, q[:1].copy(), lengths, n_pages, 4)
        with pytest.raises(ValueError, match="lengths"):
            fn(s, q, np.array([21, 9]), n_pages, 4)  # 21 tokens > 5 pages of 4
        with pytest.raises(ValueError, match="lengths"):
            fn(s, q, np.array([-1, 9]), n_pages, 4)
        with pytest.raises(ValueError, match="lengths must have shape"):
            fn(s, q, np.array([9]), n_pages, 4)
        with pytest.raises(TypeError, match="lengths"):
            fn(s, q, np.array([9.0, 9.0]), n_pages, 4)
        with pytest.raises(ValueError, match="n_pages"):
            fn(s, q, lengths, n_pages + 1, 4)
        with pytest.raises(ValueError, match="page_size"):
            fn(s, q, lengths, n_pages, 0)
    with pytest.raises(ValueError, match="k must be"):
        host.page_topk(s, q, lengths, n_pages, 4, 0, 0, 0)
    with pytest.raises(ValueError, match="k must be"):
        host.page_topk(s, q, lengths, n_pages, 4, n_pages + 1, 0, 0)
    with pytest.raises(ValueError, match="sink_pages"):
        host.page_topk(s, q, lengths, n_pages, 4, 2, -1, 0)
    with pytest.raises(ValueError, match="exceed k"):
        host.page_topk(s, q, lengths, n_pages, 4, 3, 2, 2)  # sequence 0 has 5 pages > k
    host.page_topk(s, q, np.array([12, 9]), n_pages, 4, 3, 2, 2)  # 3 pages each: all taken, fine
    nan = s.copy()
    nan[1, 0, 1, 0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        host.page_topk(nan, q, lengths, n_pages, 4, 2, 0, 0)
    assert np.isnan(host.page_scores(nan, q, lengths, n_pages, 4)[1, 0, 1])


# ---- many Python threads at once --------------------------------------------------------


def test_concurrent_calls_from_many_threads():
    rng = np.random.default_rng(6)
    cache = rng.standard_normal((1, 4, 4096, 64), dtype=np.float32)
    ids = [np.sort(rng.choice(256, size=(1, 4, 32)), -1).astype(np.int32) for _ in range(8)]
    gathers = [gather_reference(cache, i, 16) for i in ids]
    xs = [rng.standard_normal((16, 8192), dtype=np.float32) for _ in range(8)]
    tops = [topk_reference(x, 64) for x in xs]
    cases = [make_case(rng, 1, 2, 4, 32, 8, [int(n)]) for n in rng.integers(4000, 12000, size=8)]
    picks = [ref.retrieval(c[5], list(c[2]), 8, 60, 1, 2) for c in cases]

    def work(i):
        for _ in range(3):
            np.testing.assert_array_equal(host.gather_pages(cache, ids[i], 16), gathers[i])
            v, idx = host.topk(xs[i], 64)
            np.testing.assert_array_equal(idx, tops[i][1])
            s, q, lengths, n_pages, _, _ = cases[i]
            np.testing.assert_array_equal(host.page_topk(s, q, lengths, n_pages, 8, 60, 1, 2), picks[i])
        return True

    with ThreadPoolExecutor(8) as ex:
        assert all(ex.map(work, range(8)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_works_in_a_forked_child():
    """The parent's pool threads do not exist in a forked child: the child gets a fresh pool."""
    x = np.random.default_rng(8).standard_normal((2, 200000), dtype=np.float32)
    want = host.topk(x, 50)[1]  # the parent's workers are running now
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            code = 0 if np.array_equal(host.topk(x, 50)[1], want) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
