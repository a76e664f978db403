"""Devices, placements, records and bad input: the library's contract with its caller."""

import numpy as np
import pytest
import torch

import hetero
from hetero.methods import PageSparseAttention

from conftest import device_ids

CPU = "torch:cpu"


def kv(batch=1, heads=2, seq=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, seq, dim, generator=g), torch.randn(batch, heads, seq, dim, generator=g)


# --- devices ----------------------------------------------------------------------------

def test_devices_have_stable_ids_kinds_and_backends():
    found = hetero.devices()
    ids = [d.id for d in found]
    assert CPU in ids and len(set(ids)) == len(ids)
    for d in found:
        assert d.backend in ("torch", "opencl", "host")
        assert d.kind in ("cpu", "gpu", "fpga", "accelerator")
        assert hetero.get_device(d.id) is d
    assert [d.id for d in hetero.devices()] == ids


def test_opencl_cpu_device_present_after_install(opencl_device):
    assert hetero.get_device(opencl_device).kind == "cpu"


def test_missing_device_error_lists_present_ones():
    with pytest.raises(hetero.DeviceNotFoundError) as err:
        hetero.get_device("torch:cuda:7")
    for d in hetero.devices():
        assert d.id in str(err.value)


# --- placement --------------------------------------------------------------------------

def test_placement_single_device_and_mapping():
    method = PageSparseAttention()
    pipe = hetero.Pipeline(method, CPU)
    assert {d.id for d in pipe.placement.devices} == {CPU}
    assert pipe.placement[hetero.Step.APPLY].id == CPU
    mapping = {s.value: CPU for s in hetero.STEPS}
    assert hetero.Pipeline(method, mapping).placement == pipe.placement


@pytest.mark.parametrize("placement,message", [
    ({"prepare": CPU, "relevancy": CPU}, "missing steps"),
    ({"prepare": CPU, "relevancy": CPU, "retrieval": CPU, "apply": CPU, "rerank": CPU}, "unknown step"),
    (42, "placement must be"),
])
def test_bad_placement(placement, message):
    with pytest.raises(hetero.PlacementError, match=message):
        hetero.Pipeline(PageSparseAttention(), placement)


def test_placement_on_absent_device_lists_present():
    with pytest.raises(hetero.DeviceNotFoundError, match="present"):
        hetero.Pipeline(PageSparseAttention(), "opencl:9:9")


def test_memory_from_another_placement_is_refused(opencl_device):
    keys, values = kv()
    memory = hetero.Pipeline(PageSparseAttention(), CPU).prepare(keys, values)
    with pytest.raises(ValueError, match="prepared for"):
        hetero.Pipeline(PageSparseAttention(), opencl_device).step(torch.randn(1, 2, 16), memory)


# --- records ----------------------------------------------------------------------------

def test_single_device_step_moves_nothing():
    keys, values = kv()
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), CPU)
    memory = pipe.prepare(keys, values)
    pipe.step(torch.randn(1, 4, 16), memory)
    run = pipe.last_run
    assert run.call == "step" and run.transfers == []
    assert [r.step for r in run.steps] == ["relevancy", "retrieval", "apply"]
    assert all(r.seconds > 0 and r.device == CPU for r in run.steps)
    assert run.wall_s >= sum(r.timing.wall_s for r in run.steps)


def test_mixed_step_records_crossings_and_fuses(opencl_device):
    keys, values = kv(dim=32)
    placement = {"prepare": CPU, "relevancy": opencl_device, "retrieval": opencl_device, "apply": CPU}
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), placement)
    memory = pipe.prepare(keys, values)
    assert pipe.last_run.transfers and all(t.nbytes > 0 for t in pipe.last_run.transfers)
    query = torch.randn(1, 4, 32)
    pipe.step(query, memory)  # first step moves the lengths once
    pipe.step(query, memory)
    run = pipe.last_run
    assert [r.step for r in run.steps] == ["relevancy+retrieval", "apply"]
    assert run.steps[0].device == opencl_device and run.steps[0].timing.source == "opencl-event"
    crossings = {(t.src, t.dst): t.nbytes for t in run.transfers}
    assert crossings == {(CPU, opencl_device): query.numel() * 4, (opencl_device, CPU): 2 * 2 * 4}  # query in, ids out
    assert all(t.seconds > 0 for t in run.transfers)


def test_unfused_when_steps_split(opencl_device):
    keys, values = kv(dim=32)
    placement = {"prepare": CPU, "relevancy": opencl_device, "retrieval": CPU, "apply": CPU}
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), placement)
    pipe.step(torch.randn(1, 4, 32), pipe.prepare(keys, values))
    assert [r.step for r in pipe.last_run.steps] == ["relevancy", "retrieval", "apply"]


# --- bad input --------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(page_size=0), "page_size"),
    (dict(budget_tokens=0), "budget_tokens"),
    (dict(budget_pages=-1), "budget_pages"),
    (dict(budget_tokens=64, budget_pages=4), "not both"),
    (dict(sink_pages=-1), "sink_pages"),
    (dict(budget_pages=2, sink_pages=2, local_pages=1), "must not exceed"),
    (dict(scale=float("nan")), "scale"),
    (dict(page_size=2.5), "page_size"),
])
def test_bad_method_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PageSparseAttention(**kwargs)


def _bad_prepare_inputs():
    keys, values = kv()
    nan = keys.clone()
    nan[0, 1, 3, 2] = float("nan")
    inf = values.clone()
    inf[0, 0, 0, 0] = float("inf")
    return [
        ((keys[0], values[0]), {}, "keys must have rank 4"),
        ((keys.numpy(), values), {}, "keys must be a torch.Tensor"),
        ((keys, values[:, :1]), {}, "values shape"),
        ((keys.int(), values.int()), {}, "keys dtype"),
        ((keys, values.double()), {}, "values dtype must be"),
        ((nan, values), {}, "keys contains NaN"),
        ((keys, inf), {}, "values contains NaN or Inf"),
        ((keys[:, :, :0], values[:, :, :0]), {}, "empty memory"),
        ((keys, values), {"lengths": [0]}, "lengths"),
        ((keys, values), {"lengths": [41]}, "lengths"),
        ((keys, values), {"lengths": [1, 2]}, "lengths"),
        ((keys, values), {"capacity": 10}, "capacity"),
    ]


@pytest.mark.parametrize("args,kwargs,message", _bad_prepare_inputs())
def test_bad_prepare_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        hetero.Pipeline(PageSparseAttention(), CPU).prepare(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mismatch with the CPU")
def test_keys_and_values_on_different_devices():
    keys, values = kv()
    with pytest.raises(ValueError, match="put them on one device"):
        hetero.Pipeline(PageSparseAttention(), CPU).prepare(keys, values.cuda())


@pytest.mark.parametrize("query,message", [
    (torch.randn(1, 4), "query must have rank 3"),
    (torch.randn(2, 4, 16), r"query must be \[1, q_heads, 16\]"),
    (torch.randn(1, 4, 8), r"query must be \[1, q_heads, 16\]"),
    (torch.randn(1, 3, 16), "multiple of the memory's kv_heads"),
    (torch.full((1, 4, 16), float("nan")), "query contains NaN"),
    (torch.ones(1, 4, 16, dtype=torch.int64), "query dtype"),
])
@pytest.mark.parametrize("device", device_ids())
def test_bad_query(device, query, message):
    keys, values = kv()
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), device)
    memory = pipe.prepare(keys, values)
    with pytest.raises(ValueError, match=message):
        pipe.step(query, memory)


def _snapshot(pipe, memory):
    run = hetero.runtime.Run(pipe.method, pipe.placement, "snapshot")
    cpu = torch.device("cpu")
    return (memory.lengths.copy(), run.to_torch(memory.summary, cpu).clone(), run.to_torch(memory.k_cache, cpu).clone(),
            run.to_torch(memory.v_cache, cpu).clone())


@pytest.mark.parametrize("device", device_ids())
def test_failed_append_leaves_memory_unchanged(device):
    keys, values = kv()
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), device)
    memory = pipe.prepare(keys, values, capacity=40)
    before = _snapshot(pipe, memory)
    new_k, new_v = kv(seq=5, seed=1)
    bad_k = new_k.clone()
    bad_k[0, 0, 4, 0] = float("inf")
    for args, message in [((bad_k, new_v), "keys contains NaN or Inf"),
                          ((new_k[:, :1], new_v[:, :1]), "like the memory"),
                          ((new_k.half(), new_v.half()), "dtype"),
                          ((new_k, new_v[:, :, :4]), "values shape")]:
        with pytest.raises(ValueError, match=message):
            pipe.append(memory, *args)
        after = _snapshot(pipe, memory)
        np.testing.assert_array_equal(after[0], before[0])
        for a, b in zip(after[1:], before[1:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    pipe.append(memory, new_k, new_v)  # and a good one still works, growing the capacity
    assert memory.lengths.tolist() == [45] and memory.token_capacity >= 45


def test_empty_append_is_a_no_op():
    keys, values = kv()
    pipe = hetero.Pipeline(PageSparseAttention(), CPU)
    memory = pipe.prepare(keys, values)
    pipe.append(memory, keys[:, :, :0], values[:, :, :0])
    assert memory.lengths.tolist() == [40]


def test_single_token_memory():
    keys, values = kv(seq=1)
    query = torch.randn(1, 2, 16)
    pipe = hetero.Pipeline(PageSparseAttention(), CPU)
    out = pipe.step(query, pipe.prepare(keys, values))
    torch.testing.assert_close(out, values[:, :, 0].expand_as(out))


# --- OpenCL programs --------------------------------------------------------------------

def test_programs_are_built_once_per_device_and_defines(opencl_device):
    from hetero.backends import opencl

    dev = hetero.get_device(opencl_device)
    first = opencl.program(dev, "calibrate.cl", {"UNUSED": 1})
    assert opencl.program(dev, "calibrate.cl", {"UNUSED": 1}) is first
    assert opencl.program(dev, "calibrate.cl", {"UNUSED": 2}) is not first


def test_binary_only_device_loads_precompiled_programs(opencl_device, tmp_path):
    """The FPGA path: no source compile, programs come from <kernel>-<defines>.<ext> files."""
    from hetero.backends import opencl

    dev = hetero.get_device(opencl_device)
    method = PageSparseAttention(page_size=8, budget_pages=2, local_pages=1)
    keys, values = kv(dim=16)
    query = torch.randn(1, 4, 16)
    expected = hetero.Pipeline(method, CPU).step(query, hetero.Pipeline(method, CPU).prepare(keys, values))
    try:
        opencl.use_binaries(tmp_path, devices=[opencl_device])
        pipe = hetero.Pipeline(method, opencl_device)
        with pytest.raises(FileNotFoundError, match="no precompiled program page_sparse-"):
            pipe.prepare(keys, values)
        from hetero.methods import _page_sparse_cl as kernels

        for group, dim in ((1, 16), (2, 16)):
            opencl.export_binary(dev, kernels.KERNEL_FILE, kernels.defines(dim, group, 8, 2, False), tmp_path)
        out = pipe.step(query, pipe.prepare(keys, values))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        opencl.use_binaries(None)


def test_binary_only_device_without_directory_explains(opencl_device, monkeypatch):
    from hetero.backends import opencl

    monkeypatch.delenv("HETERO_FPGA_BINARY_DIR", raising=False)
    try:
        opencl.use_binaries(None, devices=[opencl_device])
        with pytest.raises(RuntimeError, match="HETERO_FPGA_BINARY_DIR"):
            opencl.program(hetero.get_device(opencl_device), "calibrate.cl", {})
    finally:
        opencl.use_binaries(None)


def test_transfers_through_host_memory_use_aligned_staging_buffers(opencl_device):
    """An OpenCL result crossing to the CPU lands in a pooled 4 KiB-aligned buffer."""
    from hetero.backends import host

    if host._host is None:
        pytest.skip("the C++ host shim is not built in this checkout (install with pip)")
    keys, values = kv(dim=32)
    placement = {"prepare": CPU, "relevancy": opencl_device, "retrieval": opencl_device, "apply": CPU}
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), placement)
    pipe.step(torch.randn(1, 4, 32), pipe.prepare(keys, values))
    before = host._host.default_pool().stats()
    ids = pipe.last_run.artifact("page_ids")
    assert ids.data_ptr() % 4096 == 0
    assert host._host.default_pool().stats()["in_use_buffers"] == before["in_use_buffers"] + 1


def test_validate_false_skips_only_the_value_scans(monkeypatch):
    from hetero.methods import page_sparse

    keys, values = kv()
    pipe = hetero.Pipeline(PageSparseAttention(page_size=8, budget_pages=2, local_pages=1), CPU, validate=False)
    memory = pipe.prepare(keys, values)
    scanned = []
    monkeypatch.setattr(page_sparse, "_check_finite", lambda name, value: scanned.append(name))
    pipe.step(torch.randn(1, 4, 16), memory)
    pipe.append(memory, *kv(seq=1, seed=2))
    assert scanned == []
    pipe.prepare(keys, values)
    assert scanned == ["keys", "values"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="multiple of the memory's kv_heads"):
        pipe.step(torch.randn(1, 3, 16), memory)  # shape checks still run
    with pytest.raises(ValueError, match="keys contains NaN"):  # prepare always scans
        pipe.prepare(torch.full_like(keys, float("nan")), values)


def test_placement_on_a_backend_without_the_step_gives_reasons():
    method = PageSparseAttention()
    del method.implementations["host"]
    if "host" not in device_ids():
        pytest.skip("no host device")
    with pytest.raises(hetero.PlacementError, match="has no host implementation"):
        hetero.Pipeline(method, "host")
