"""Energy meters: absent ones say why and never read as zero; RAPL on a fake sysfs tree; NVML on
a fake pynvml; measure_energy against a fake counter of known wattage."""

import os
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hetero
from hetero.profiling import energy
from hetero.profiling.energy import (EnergyReading, Meter, MeterAbsent, NvmlMeter, RaplMeter, energy_meters,
                                     measure_energy, meter_for, rapl_meter)


def assert_absent(meter: Meter, *words: str) -> None:
    assert not meter.available
    assert meter.why_absent.strip()
    for w in words:
        assert w in meter.why_absent, meter.why_absent
    with pytest.raises(MeterAbsent, match=meter.name):
        meter.read_j()
    assert "absent" in repr(meter)


# --- what this machine has ------------------------------------------------------------------

def test_every_meter_reads_or_says_why():
    meters = energy_meters()
    names = [m.name for m in meters]
    assert any(n.startswith("nvml") for n in names) and any(n.startswith("rapl") for n in names)
    for m in meters:
        assert m.source == "measured" and m.update_period_s > 0
        if m.available:
            assert m.why_absent == "" and isinstance(m.read_j(), float)
        else:
            assert_absent(m)


def test_missing_powercap_is_absent(tmp_path):
    assert_absent(rapl_meter(tmp_path / "no-powercap"), "no powercap RAPL interface")
    assert_absent(RaplMeter([]), "RAPL")


def test_nvml_without_pynvml_is_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert_absent(NvmlMeter(0), "pip install nvidia-ml-py")


def test_asked_for_gpu_gets_a_reason():
    meters = energy_meters(["torch:cuda:63"])
    assert [m.name for m in meters] == ["nvml:63"]
    assert_absent(meters[0])
    assert meter_for("torch:cuda:63", meters) is None


# --- RAPL on a fake sysfs tree ----------------------------------------------------------------

def make_domain(root: Path, dirname: str, name: str, uj: int, max_uj: int = 262_143_328_850) -> Path:
    d = root / dirname
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def set_uj(domain: Path, uj: int) -> None:
    (domain / "energy_uj").write_text(f"{uj}\n")


def test_rapl_reads_joules(tmp_path):
    pkg = make_domain(tmp_path, "intel-rapl:0", "package-0", 5_000_000)
    meter = RaplMeter(pkg, covers=("torch:cpu",))
    assert meter.available and meter.name == "rapl:package-0" and meter.update_period_s == 0.001
    start = meter.read_j()
    set_uj(pkg, 7_500_000)
    assert meter.read_j() - start == pytest.approx(2.5)


def test_rapl_handles_wrap(tmp_path):
    pkg = make_domain(tmp_path, "intel-rapl:0", "package-0", 9_000_000, max_uj=10_000_000)
    meter = RaplMeter(pkg, covers=("torch:cpu",))
    start = meter.read_j()
    set_uj(pkg, 500_000)  # wrapped: 1.0 J to the top, 0.5 J after
    assert meter.read_j() - start == pytest.approx(1.5)
    set_uj(pkg, 2_500_000)
    assert meter.read_j() - start == pytest.approx(3.5)


def test_rapl_sums_packages_only(tmp_path):
    p0 = make_domain(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    core = make_domain(tmp_path, "intel-rapl:0/intel-rapl:0:0", "core", 1_000_000)
    p1 = make_domain(tmp_path, "intel-rapl:1", "package-1", 1_000_000)
    psys = make_domain(tmp_path, "intel-rapl:2", "psys", 1_000_000)
    mmio = make_domain(tmp_path, "intel-rapl-mmio:0", "package-0", 1_000_000)  # duplicate of intel-rapl:0
    meter = rapl_meter(tmp_path, covers=("torch:cpu",))
    assert meter.available and meter.name == "rapl:package-0+package-1"
    start = meter.read_j()
    set_uj(p0, 2_000_000)
    set_uj(p1, 3_000_000)
    for other in (core, psys, mmio):
        set_uj(other, 99_000_000)
    assert meter.read_j() - start == pytest.approx(3.0)


def test_rapl_covers_cpu_side_devices(tmp_path):
    make_domain(tmp_path, "intel-rapl:0", "package-0", 0)
    meters = energy_meters(["torch:cpu"], powercap_root=tmp_path)
    assert [m.name for m in meters] == ["rapl:package-0"]
    meter = meters[0]
    cpu_ids = {d.id for d in hetero.devices() if d.kind == "cpu"}
    assert {"torch:cpu", "host"} <= set(meter.covers) and cpu_ids <= set(meter.covers)
    for device_id in meter.covers:
        assert meter_for(device_id, meters) is meter
    assert meter_for("torch:cuda:0", meters) is None


def test_rapl_root_only_counter(tmp_path, monkeypatch):
    pkg = make_domain(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):  # what a non-root user meets on kernels since 2020
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert_absent(RaplMeter(pkg, covers=("torch:cpu",)), "root only", "chmod o+r")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a mode-000 file")
def test_rapl_root_only_counter_for_real(tmp_path):
    pkg = make_domain(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    (pkg / "energy_uj").chmod(0)
    assert_absent(RaplMeter(pkg, covers=("torch:cpu",)), "root only")


# --- NVML on a fake pynvml ------------------------------------------------------------------

class FakeNVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


@pytest.fixture
def fake_nvml(monkeypatch):
    """A pynvml with two GPUs whose NVML order is the reverse of torch's; torch sees CUDA."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_ERROR_NOT_SUPPORTED = 3
    nvml.NVMLError = FakeNVMLError
    nvml.millijoules = {"h0": 1_000, "h1": 123_456_789}
    nvml.uuids = {"h0": "GPU-0000aaaa-0000-0000-0000-000000000000",
                  "h1": b"GPU-1111bbbb-0000-0000-0000-000000000000"}  # some versions return bytes
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlDeviceGetHandleByIndex = lambda j: f"h{j}"
    nvml.nvmlDeviceGetUUID = lambda h: nvml.uuids[h]
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: nvml.millijoules[h]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(energy, "_torch_cuda_problem", lambda i: "")
    torch_uuids = {0: "1111BBBB-0000-0000-0000-000000000000", 1: "0000aaaa-0000-0000-0000-000000000000"}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=torch_uuids[i]))
    return nvml


def test_nvml_reads_joules_by_uuid(fake_nvml):
    meter = NvmlMeter(0)  # torch's cuda:0 is NVML's device 1
    assert meter.available and meter.covers == ("torch:cuda:0",) and meter.update_period_s == 0.1
    assert meter.read_j() == pytest.approx(123_456.789)
    fake_nvml.millijoules["h1"] += 2_500
    assert meter.read_j() == pytest.approx(123_459.289)
    assert NvmlMeter(1).read_j() == pytest.approx(1.0)


def test_nvml_falls_back_to_index(fake_nvml, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name="old torch"))
    assert NvmlMeter(0).read_j() == pytest.approx(1.0)


def test_nvml_unmatched_uuid(fake_nvml, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid="MIG-ffff"))
    assert_absent(NvmlMeter(0), "UUID")


def test_nvml_not_supported(fake_nvml):
    def unsupported(handle):
        raise FakeNVMLError(3)

    fake_nvml.nvmlDeviceGetTotalEnergyConsumption = unsupported
    assert_absent(NvmlMeter(0), "Volta")


def test_nvml_without_driver(fake_nvml):
    def no_driver():
        raise FakeNVMLError(12)

    fake_nvml.nvmlInit = no_driver
    assert_absent(NvmlMeter(0), "nvmlInit failed")


# --- measure_energy ---------------------------------------------------------------------------

class WattMeter(Meter):
    """A counter that integrates a constant power, updated every `update_period_s` (0: always)."""

    def __init__(self, watts: float, update_period_s: float = 0.0):
        super().__init__("fake", ("torch:cpu",), update_period_s)
        self.watts = watts
        self.reads = 0

    def _read_j(self) -> float:
        self.reads += 1
        t = time.perf_counter()
        if self.update_period_s:
            t -= t % self.update_period_s
        return self.watts * t


def test_measure_energy_per_call():
    fractions = []
    reading = measure_energy(lambda: time.sleep(0.002), WattMeter(50.0), min_window_s=0.2,
                             progress=fractions.append)
    assert isinstance(reading, EnergyReading)
    assert reading.source == "measured" and reading.meter == "fake" and reading.note
    assert reading.window_s >= 0.2 and reading.calls * reading.seconds_per_call >= 0.2
    assert reading.seconds_per_call >= 0.002
    assert reading.joules_per_call == pytest.approx(50.0 * reading.seconds_per_call, rel=0.03)
    assert reading.watts == pytest.approx(50.0, rel=0.03)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)


def test_measure_energy_window_follows_update_period():
    # a counter that moves every 20 ms: the window stretches to 20 periods, and per-call joules
    # stay within one period's worth of the truth
    reading = measure_energy(lambda: time.sleep(0.001), WattMeter(50.0, update_period_s=0.02), min_window_s=0.01)
    assert reading.calls * reading.seconds_per_call >= 0.4
    assert 0.98 <= reading.watts / 50.0 <= 1.07, reading
    assert "0.02 s" in reading.note


def test_measure_energy_min_calls():
    calls = []
    reading = measure_energy(lambda: (calls.append(1), time.sleep(0.02)), WattMeter(10.0), min_window_s=0.001,
                             min_calls=5)
    assert reading.calls == len(calls) == 5


def test_measure_energy_stalled_counter():
    class Stuck(Meter):
        def _read_j(self) -> float:
            return 42.0

    reading = measure_energy(lambda: None, Stuck("stuck", ("torch:cpu",), 0.001), min_window_s=0.01)
    assert reading.joules_per_call is None and reading.watts is None and "did not advance" in reading.note


def test_measure_energy_absent_meter(tmp_path):
    ran = []
    with pytest.raises(MeterAbsent):
        measure_energy(lambda: ran.append(1), rapl_meter(tmp_path / "none"))
    assert not ran


@pytest.mark.parametrize("kwargs, arg", [
    (dict(fn=None), "fn"),
    (dict(min_window_s=0), "min_window_s"),
    (dict(min_window_s=-1.0), "min_window_s"),
    (dict(min_window_s=float("nan")), "min_window_s"),
    (dict(min_calls=0), "min_calls"),
    (dict(min_calls=2.5), "min_calls"),
    (dict(progress="bar"), "progress"),
    (dict(meter="rapl"), "meter"),
])
def test_measure_energy_argument_errors(kwargs, arg):
    args = dict(fn=lambda: None, meter=WattMeter(1.0), min_window_s=0.01) | kwargs
    with pytest.raises(ValueError, match=arg):
        measure_energy(**args)
