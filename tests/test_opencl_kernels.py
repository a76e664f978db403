"""OpenCL page-sparse kernels (fpga_kernels/page_sparse.cl via hetero.methods._page_sparse_cl)
against the single reference, hetero/methods/page_sparse_reference.py.

Runs on PoCL (selected by platform name) when present, else on the first OpenCL device;
skipped when there is no OpenCL platform at all. Each program variant (set of -D defines)
is built once per test session.
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

cl = pytest.importorskip("pyopencl", reason="pyopencl is not installed")
import pyopencl.array as cla  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hetero.methods import _page_sparse_cl as L  # noqa: E402
from hetero.methods import page_sparse_reference as R  # noqa: E402

KERNEL_PATH = pathlib.Path(__file__).resolve().parents[1] / "fpga_kernels" / L.KERNEL_FILE
POCL_PLATFORM = "Portable Computing Language"

# Program variants: (head_dim, group, page_size, k_max, storage_half). Few, because each
# costs a build; together they cover head_dim 64/128, GQA group 1/4/8, fp32/fp16 storage.
VARIANTS = {
    "d64_g4_p4": (64, 4, 4, 16, 0),
    "d128_g8_p16": (128, 8, 16, 16, 0),
    "d64_g1_p8": (64, 1, 8, 16, 0),
    "d128_g4_p16_half": (128, 4, 16, 16, 1),
    "d128_g4_p16_k128": (128, 4, 16, 128, 0),  # the target configuration
}
SMALL = ["d64_g4_p4", "d128_g8_p16", "d64_g1_p8", "d128_g4_p16_half"]

HYP = settings(max_examples=20, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# OpenCL context, programs
# --------------------------------------------------------------------------------------

_STATE: dict = {}
_PROGRAMS: dict = {}


def _device():
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        platforms = []
    if not platforms:
        pytest.skip("no OpenCL platform found (install pocl-binary-distribution for PoCL)")
    ordered = ([p for p in platforms if p.name == POCL_PLATFORM]
               + [p for p in platforms if p.name != POCL_PLATFORM])
    for p in ordered:
        try:
            devs = p.get_devices()
        except cl.Error:
            continue
        if devs:
            return devs[0]
    pytest.skip("OpenCL platforms found, but none has a device")


@pytest.fixture(scope="session")
def queue():
    if "queue" not in _STATE:
        dev = _device()
        ctx = cl.Context([dev])
        _STATE["queue"] = cl.CommandQueue(
            ctx, properties=cl.command_queue_properties.PROFILING_ENABLE)
    return _STATE["queue"]


def program(queue, name):
    """Built program for a variant, cached per (defines) for the whole session."""
    d = L.defines(*VARIANTS[name])
    key = tuple(sorted(d.items()))
    if key not in _PROGRAMS:
        src = KERNEL_PATH.read_text()
        _PROGRAMS[key] = cl.Program(queue.context, src).build(  # as hetero's runtime builds it
            options=[f"-D{k}={v}" for k, v in sorted(d.items())] + ["-cl-std=CL1.2"])
    return _PROGRAMS[key]


def cfg(name):
    head_dim, group, page_size, k_max, half = VARIANTS[name]
    return head_dim, group, page_size, k_max, np.float16 if half else np.float32


def dev(queue, a):
    return cla.to_device(queue, np.ascontiguousarray(a))


def check_events(events):
    assert isinstance(events, list)
    for e in events:
        assert isinstance(e, cl.Event)
        e.wait()
        assert e.profile.end >= e.profile.start  # profiling timestamps are readable


# --------------------------------------------------------------------------------------
# data helpers (inputs only; every expected value comes from the reference)
# --------------------------------------------------------------------------------------

def rand(rng, shape, dtype):
    """Gaussian data, pre-rounded to the storage type."""
    return rng.standard_normal(shape).astype(dtype)


def summary_of(keys, lengths, page_size, p_cap, dtype):
    """Summary layout [B,H,p_cap,2,D] from the reference page_minmax; +inf/-inf padding."""
    batch, heads, _, dim = keys.shape
    out = np.empty((batch, heads, p_cap, 2, dim), dtype=np.float64)
    out[..., 0, :] = np.inf
    out[..., 1, :] = -np.inf
    if max(lengths) > 0:
        mn, mx = R.page_minmax(keys.astype(np.float64), list(lengths), page_size)
        n = mn.shape[2]
        out[:, :, :n, 0] = mn
        out[:, :, :n, 1] = mx
    return out.astype(dtype)


def n_pages_of(lengths, page_size):
    return max(R.num_pages(n, page_size) for n in lengths)


@st.composite
def seq_case(draw, names=SMALL, max_pages=24):
    """A variant, batch / head counts and per-sequence lengths (often not page multiples)."""
    name = draw(st.sampled_from(names))
    page_size = VARIANTS[name][2]
    batch = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(1, max_pages * page_size), min_size=batch,
                            max_size=batch))
    return name, batch, heads, lengths


@st.composite
def retrieval_case(draw, names=SMALL, max_pages=24):
    name, batch, heads, lengths = draw(seq_case(names, max_pages))
    k_max = VARIANTS[name][3]
    k = draw(st.integers(1, k_max))
    sink = draw(st.integers(0, k))
    local = draw(st.integers(0, k - sink))
    return name, batch, heads, lengths, k, sink, local


@pytest.fixture(params=[1, 3, None], ids=["chunk1", "chunk3", "chunkdefault"])
def chunking(request, monkeypatch):
    """Smallest page chunk per work-item: tiny values force many chunks (and the merge tree)
    even on small inputs."""
    if request.param is not None:
        monkeypatch.setattr(L, "_MIN_CHUNK_PAGES", request.param)
    return request.param


# --------------------------------------------------------------------------------------
# summary maintenance, cache append
# --------------------------------------------------------------------------------------

@HYP
@given(name=st.sampled_from(SMALL), batch=st.integers(1, 3), heads=st.integers(1, 3),
       data=st.data())
def test_minmax_delta_merge_summary_store_tokens(queue, name, batch, heads, data):
    """Appending n_new tokens (or, with per-sequence counts, count[b] <= n_new of them):
    the merged summary equals the reference page_minmax of the longer sequences, and the
    cache holds the tokens at their absolute positions."""
    head_dim, group, page_size, k_max, dt = cfg(name)
    prg = program(queue, name)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    start = np.array(data.draw(st.lists(st.integers(0, 6 * page_size), min_size=batch,
                                        max_size=batch)), np.int32)
    n_new = data.draw(st.integers(1, 3 * page_size))
    count = np.array(data.draw(st.lists(st.integers(0, n_new), min_size=batch,
                                        max_size=batch)), np.int32)
    s_cap = int(start.max()) + n_new + data.draw(st.integers(0, 2 * page_size))
    p_cap = R.num_pages(s_cap, page_size) + data.draw(st.integers(0, 2))
    keys = rand(rng, (batch, heads, s_cap, head_dim), dt)
    keys_new = np.stack([keys[b, :, start[b]:start[b] + n_new] for b in range(batch)])

    summary = dev(queue, summary_of(keys, start, page_size, p_cap, dt))
    d_start, d_count = dev(queue, start), dev(queue, count)
    n_local = max(R.num_pages(s % page_size + n_new, page_size) for s in start)
    delta, ev1 = L.minmax_delta(queue, prg, dev(queue, keys_new), d_start, d_count, n_local)
    check_events(ev1)
    assert delta.shape == (batch, heads, n_local, 2, head_dim) and delta.dtype == dt
    d = delta.get()
    for b in range(batch):  # local pages the new tokens do not reach hold the identities
        used = R.num_pages(start[b] % page_size + count[b], page_size) if count[b] else 0
        assert np.all(d[b, :, used:, 0] == np.inf) and np.all(d[b, :, used:, 1] == -np.inf)
    ev2 = L.merge_summary(queue, prg, summary, delta, d_start)
    check_events(ev2)
    expected = summary_of(keys, start + count, page_size, p_cap, dt)
    np.testing.assert_array_equal(summary.get(), expected)

    # append into a capacity-padded cache holding the old tokens (and garbage after them)
    cache_np = keys.copy()
    for b in range(batch):
        cache_np[b, :, start[b]:] = rand(rng, cache_np[b, :, start[b]:].shape, dt)
    cache = dev(queue, cache_np)
    ev3 = L.store_tokens(queue, prg, cache, dev(queue, keys_new), d_start, d_count)
    check_events(ev3)
    got = cache.get()
    for b in range(batch):
        end = start[b] + count[b]
        np.testing.assert_array_equal(got[b, :, :end], keys[b, :, :end])
        np.testing.assert_array_equal(got[b, :, end:], cache_np[b, :, end:])


# --------------------------------------------------------------------------------------
# relevancy
# --------------------------------------------------------------------------------------

def run_relevancy(queue, name, keys, lengths, query, p_extra=0):
    head_dim, group, page_size, k_max, dt = cfg(name)
    n_pages = n_pages_of(lengths, page_size)
    summ = summary_of(keys, lengths, page_size, n_pages + p_extra, dt)
    scores, ev = L.relevancy(queue, program(queue, name), dev(queue, summ), dev(queue, query),
                             dev(queue, np.array(lengths, np.int32)), n_pages)
    check_events(ev)
    mn = summ[:, :, :n_pages, 0].astype(np.float64)
    mx = summ[:, :, :n_pages, 1].astype(np.float64)
    return scores.get(), R.relevancy(mn, mx, query, list(lengths), page_size), summ


def assert_scores_close(got, ref):
    assert got.dtype == np.float32 and got.shape == ref.shape
    inf = np.isneginf(ref)
    assert np.array_equal(np.isneginf(got), inf)
    np.testing.assert_allclose(got[~inf], ref[~inf], rtol=1e-4, atol=1e-3)


@HYP
@given(case=seq_case(), seed=st.integers(0, 2**32 - 1), p_extra=st.integers(0, 3))
def test_relevancy_random(queue, chunking, case, seed, p_extra):
    name, batch, heads, lengths = case
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(seed)
    keys = rand(rng, (batch, heads, max(lengths), head_dim), dt)
    query = rand(rng, (batch, heads * group, head_dim), np.float32)
    got, ref, _ = run_relevancy(queue, name, keys, lengths, query, p_extra)
    assert_scores_close(got, ref)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_relevancy_variants(queue, name):
    """Every variant (head_dim 64/128, group 1/4/8, fp16 storage), uneven lengths."""
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(7)
    lengths = [1, 5 * page_size + 3, 9 * page_size]
    keys = rand(rng, (3, 2, max(lengths), head_dim), dt)
    query = rand(rng, (3, 2 * group, head_dim), np.float32)
    got, ref, _ = run_relevancy(queue, name, keys, lengths, query, p_extra=2)
    assert_scores_close(got, ref)


# --------------------------------------------------------------------------------------
# retrieval (exact, ties included) and the fused kernel
# --------------------------------------------------------------------------------------

def run_retrieval(queue, name, scores, lengths, k, sink, local):
    ids, ev = L.retrieval(queue, program(queue, name), dev(queue, scores.astype(np.float32)),
                          dev(queue, np.array(lengths, np.int32)), k, sink, local)
    check_events(ev)
    return ids.get()


def run_fused(queue, name, summ, query, lengths, n_pages, k, sink, local):
    ids, ev = L.relevancy_retrieval(queue, program(queue, name), dev(queue, summ),
                                    dev(queue, query), dev(queue, np.array(lengths, np.int32)),
                                    n_pages, k, sink, local)
    check_events(ev)
    return ids.get()


def ref_retrieval(scores, lengths, page_size, k, sink, local):
    return R.retrieval(scores.astype(np.float64), list(lengths), page_size, k, sink, local)


def assert_ids_equal(got, ref):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)


@HYP
@given(case=retrieval_case(), seed=st.integers(0, 2**32 - 1), levels=st.sampled_from([2, 5, 0]))
def test_retrieval_exact(queue, chunking, case, seed, levels):
    """Exact page ids for given scores; `levels` > 0 draws scores from a few values (ties)."""
    name, batch, heads, lengths, k, sink, local = case
    page_size = VARIANTS[name][2]
    rng = np.random.default_rng(seed)
    n_pages = n_pages_of(lengths, page_size)
    if levels:
        scores = rng.integers(0, levels, (batch, heads, n_pages)).astype(np.float32)
    else:
        scores = rng.standard_normal((batch, heads, n_pages)).astype(np.float32)
    for b, n in enumerate(lengths):
        scores[b, :, R.num_pages(n, page_size):] = -np.inf
    got = run_retrieval(queue, name, scores, lengths, k, sink, local)
    assert_ids_equal(got, ref_retrieval(scores, lengths, page_size, k, sink, local))


@HYP
@given(case=retrieval_case(), seed=st.integers(0, 2**32 - 1), p_extra=st.integers(0, 2))
def test_fused_relevancy_retrieval(queue, chunking, case, seed, p_extra):
    """Fused == reference retrieval of the (unfused) kernel scores, exactly; and == the
    unfused launcher pair."""
    name, batch, heads, lengths, k, sink, local = case
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(seed)
    keys = rand(rng, (batch, heads, max(lengths), head_dim), dt)
    query = rand(rng, (batch, heads * group, head_dim), np.float32)
    scores, ref_scores, summ = run_relevancy(queue, name, keys, lengths, query, p_extra)
    assert_scores_close(scores, ref_scores)
    n_pages = scores.shape[2]
    expected = ref_retrieval(scores, lengths, page_size, k, sink, local)
    assert_ids_equal(run_fused(queue, name, summ, query, lengths, n_pages, k, sink, local), expected)
    assert_ids_equal(run_retrieval(queue, name, scores, lengths, k, sink, local), expected)


@pytest.mark.parametrize("name", SMALL)
def test_all_equal_scores_pick_lowest_pages(queue, chunking, name):
    """Identical pages -> identical scores -> ties everywhere: lowest indices win."""
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(3)
    n_tok = 20 * page_size
    one_page = rand(rng, (1, 2, page_size, head_dim), dt)
    keys = np.tile(one_page, (2, 1, 20, 1))  # every page the same
    query = rand(rng, (2, 2 * group, head_dim), np.float32)
    lengths = [n_tok, n_tok]
    scores, _, summ = run_relevancy(queue, name, keys, lengths, query)
    assert np.all(scores == scores[:, :, :1])  # within each (b, h) row
    k, sink, local = min(k_max, 7), 1, 2
    expected = ref_retrieval(scores, lengths, page_size, k, sink, local)
    np.testing.assert_array_equal(expected[0, 0], [0, 1, 2, 3, 4, 18, 19])
    assert_ids_equal(run_fused(queue, name, summ, query, lengths, 20, k, sink, local), expected)
    assert_ids_equal(run_retrieval(queue, name, scores, lengths, k, sink, local), expected)
    flat = np.zeros_like(scores)  # explicit all-equal scores, several k
    for kk in (1, 4, k_max):
        assert_ids_equal(run_retrieval(queue, name, flat, lengths, kk, 0, 0),
                         ref_retrieval(flat, lengths, page_size, kk, 0, 0))


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize(
    "lengths,k,sink,local",
    [
        ([1], 1, 0, 0),                      # a single token, a single page
        ([3], 4, 1, 1),                      # single partial page, k >= pages
        ([50, 7, 120], 3, 1, 1),             # per-sequence lengths, none a page multiple
        ([64, 64], 16, 2, 2),                # k >= number of pages for the small page sizes
        ([200, 33], 5, 2, 3),                # sink + local == k: nothing left to rank
        ([200, 150], 6, 6, 0),               # only sink pages
        ([200, 150], 6, 0, 6),               # only local pages
        ([200, 150], 6, 0, 0),               # no forced pages
    ],
)
def test_retrieval_adversarial(queue, name, lengths, k, sink, local):
    head_dim, group, page_size, k_max, dt = cfg(name)
    k = min(k, k_max)
    sink, local = min(sink, k), min(local, k - min(sink, k))
    rng = np.random.default_rng(11)
    keys = rand(rng, (len(lengths), 2, max(lengths), head_dim), dt)
    query = rand(rng, (len(lengths), 2 * group, head_dim), np.float32)
    scores, ref_scores, summ = run_relevancy(queue, name, keys, lengths, query, p_extra=1)
    assert_scores_close(scores, ref_scores)
    n_pages = scores.shape[2]
    expected = ref_retrieval(scores, lengths, page_size, k, sink, local)
    assert expected.shape[2] == min(k, n_pages)
    assert_ids_equal(run_retrieval(queue, name, scores, lengths, k, sink, local), expected)
    assert_ids_equal(run_fused(queue, name, summ, query, lengths, n_pages, k, sink, local), expected)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("pages", [4, 5, 6, 9])
def test_sink_and_local_cover_everything(queue, name, pages):
    """sink + local == k: with pages <= k every page is taken, with more pages exactly the
    forced ones (nothing is ranked); the last page is partial."""
    head_dim, group, page_size, k_max, dt = cfg(name)
    sink, local = 2, 3
    k = sink + local
    lengths = [pages * page_size - 1, 1]
    rng = np.random.default_rng(pages)
    keys = rand(rng, (2, 3, max(lengths), head_dim), dt)
    query = rand(rng, (2, 3 * group, head_dim), np.float32)
    scores, ref_scores, summ = run_relevancy(queue, name, keys, lengths, query)
    assert_scores_close(scores, ref_scores)
    expected = ref_retrieval(scores, lengths, page_size, k, sink, local)
    forced = sorted(R.forced_pages(pages, sink, local)) if pages > k else list(range(pages))
    np.testing.assert_array_equal(expected[0, 0, :len(forced)], forced)
    assert_ids_equal(run_retrieval(queue, name, scores, lengths, k, sink, local), expected)
    assert_ids_equal(run_fused(queue, name, summ, query, lengths, pages, k, sink, local), expected)


def test_defines_and_kernel_file():
    assert KERNEL_PATH.is_file()
    assert L.defines(128, 4, 16, 128, True) == {
        "HEAD_DIM": 128, "GROUP": 4, "PAGE_SIZE": 16, "K_MAX": 128, "STORAGE_HALF": 1}


def test_target_shape_scaled_down(queue):
    """The target configuration (head_dim 128, group 4, page 16, k 128, sink 1, local 4) on
    a shorter sequence: several chunks per row, then the merge stage."""
    name = "d128_g4_p16_k128"
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(5)
    lengths = [16 * 1000 + 5, 16 * 700]
    keys = rand(rng, (2, 2, max(lengths), head_dim), dt)
    query = rand(rng, (2, 2 * group, head_dim), np.float32)
    scores, ref_scores, summ = run_relevancy(queue, name, keys, lengths, query)
    assert_scores_close(scores, ref_scores)
    expected = ref_retrieval(scores, lengths, page_size, 128, 1, 4)
    assert_ids_equal(run_fused(queue, name, summ, query, lengths, scores.shape[2], 128, 1, 4),
                     expected)
    assert_ids_equal(run_retrieval(queue, name, scores, lengths, 128, 1, 4), expected)


# --------------------------------------------------------------------------------------
# sparse attention
# --------------------------------------------------------------------------------------

def run_attention(queue, name, kc, vc, query, ids, lengths, scale):
    out, ev = L.sparse_attention(queue, program(queue, name), dev(queue, kc), dev(queue, vc),
                                 dev(queue, query), dev(queue, ids.astype(np.int32)),
                                 dev(queue, np.array(lengths, np.int32)), scale)
    check_events(ev)
    return out.get()


@HYP
@given(case=retrieval_case(max_pages=12), seed=st.integers(0, 2**32 - 1),
       s_pad=st.integers(0, 9))
def test_sparse_attention_random(queue, case, seed, s_pad):
    """Page ids from the reference retrieval of random scores (ascending, -1 padded)."""
    name, batch, heads, lengths, k, sink, local = case
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(seed)
    s_cap = max(lengths) + s_pad
    kc = rand(rng, (batch, heads, s_cap, head_dim), dt)
    vc = rand(rng, (batch, heads, s_cap, head_dim), dt)
    query = rand(rng, (batch, heads * group, head_dim), np.float32)
    n_pages = n_pages_of(lengths, page_size)
    scores = rng.standard_normal((batch, heads, n_pages))
    ids = ref_retrieval(scores, lengths, page_size, k, sink, local)
    scale = float(head_dim) ** -0.5
    got = run_attention(queue, name, kc, vc, query, ids, lengths, scale)
    ref = R.sparse_attention(kc.astype(np.float64), vc.astype(np.float64), query, ids,
                             list(lengths), page_size, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_attention_variants(queue, name):
    """Every variant; a row with -1 padding, a partial last page, unsorted-free ids."""
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(9)
    lengths = [7 * page_size + 5, 2 * page_size, 1]
    batch, heads = len(lengths), 2
    s_cap = max(lengths) + 3
    kc = rand(rng, (batch, heads, s_cap, head_dim), dt) * 3  # larger logits
    vc = rand(rng, (batch, heads, s_cap, head_dim), dt)
    query = rand(rng, (batch, heads * group, head_dim), np.float32)
    ids = np.full((batch, heads, 5), -1, np.int32)
    ids[0, 0] = [0, 2, 3, 7, -1]   # includes the partial last page
    ids[0, 1] = [0, 1, 2, 3, 7]
    ids[1, 0] = [1, -1, -1, -1, -1]
    ids[1, 1] = [0, 1, -1, -1, -1]
    ids[2, :, 0] = 0               # a single token
    scale = float(head_dim) ** -0.5
    got = run_attention(queue, name, kc, vc, query, ids, lengths, scale)
    ref = R.sparse_attention(kc.astype(np.float64), vc.astype(np.float64), query, ids,
                             lengths, page_size, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)


def test_sparse_attention_split_rows(queue):
    """One row, many pages: the launcher splits the page list over work-items and combines
    the partial softmaxes."""
    name = "d128_g4_p16_k128"
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(13)
    lengths = [16 * 300 + 9]
    kc = rand(rng, (1, 1, lengths[0], head_dim), dt) * 2
    vc = rand(rng, (1, 1, lengths[0], head_dim), dt)
    query = rand(rng, (1, group, head_dim), np.float32)
    ids = np.sort(rng.choice(R.num_pages(lengths[0], page_size), 100, replace=False))
    ids = ids.astype(np.int32).reshape(1, 1, -1)
    ids[0, 0, -1] = R.num_pages(lengths[0], page_size) - 1  # partial last page
    ids = np.sort(np.unique(ids)).reshape(1, 1, -1)
    scale = float(head_dim) ** -0.5
    got = run_attention(queue, name, kc, vc, query, ids, lengths, scale)
    ref = R.sparse_attention(kc.astype(np.float64), vc.astype(np.float64), query, ids,
                             lengths, page_size, scale)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)


def test_end_to_end_against_dense_when_all_pages_selected(queue):
    """k >= pages: the sparse path (fused retrieval + attention) equals dense attention."""
    name = "d64_g4_p4"
    head_dim, group, page_size, k_max, dt = cfg(name)
    rng = np.random.default_rng(17)
    lengths = [37, 10]
    kc = rand(rng, (2, 2, 40, head_dim), dt)
    vc = rand(rng, (2, 2, 40, head_dim), dt)
    query = rand(rng, (2, 2 * group, head_dim), np.float32)
    n_pages = n_pages_of(lengths, page_size)
    summ = summary_of(kc, lengths, page_size, n_pages, dt)
    ids = run_fused(queue, name, summ, query, lengths, n_pages, k_max, 1, 1)
    got = run_attention(queue, name, kc, vc, query, ids, lengths, 0.125)
    ref = R.dense_attention(kc.astype(np.float64), vc.astype(np.float64), query, lengths, 0.125)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-5)
