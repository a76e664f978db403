"""The cost model and the placer: units, profiles, step costs, transfers, energy, the search,
its explanation, modeled devices at run time and Pipeline(placement="auto").

Custom device profiles are added to the global registry with `hetero.cost.add_profiles`;
they carry unique names (test-cost-*) and the `custom_profiles` fixture calls
`hetero.cost.reload()` afterwards, which forgets them (and the model:<name> devices built
from them) again.
"""

import dataclasses
import gc
import itertools
import json
import math
import re
import sys
import types
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hetero
from hetero import STEPS, Step
from hetero.cost import Access, ProfileError, Task, Workload, evaluate
from hetero.cost.model import Node, System, capacity_reasons, task_cost
from hetero.cost.placer import make_system, node_for
from hetero.cost.profiles import (DTYPES, KINDS, LINK_KINDS, PATTERNS, SHIPPED_DIR, Profiles, device_profile, dumps,
                                  link_profile)
from hetero.cost.units import UNITS, format_value, parse
from hetero.methods import PageSparseAttention

from conftest import device_ids

CPU = "torch:cpu"
PAIR = ["model:mi210", "model:u55c"]
REL = 5e-4 + 1e-12  # format_value writes 4 significant digits


def close(a, b, rel=1e-9):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


# --- units ------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind,expected", [
    ("1.6 TB/s", "bandwidth", 1.6e12),
    ("460 GB/s", "bandwidth", 460e9),
    ("64 GB", "bytes", 64e9),
    ("8 MiB", "bytes", 8 * 2 ** 20),
    ("8.859375 MiB", "bytes", 8.859375 * 2 ** 20),
    ("5 us", "time", 5e-6),
    ("5 µs", "time", 5e-6),
    ("250 ns", "time", 250e-9),
    ("2 ms", "time", 2e-3),
    ("300 W", "power", 300.0),
    ("1.5 kW", "power", 1500.0),
    ("181 TFLOP/s", "flops", 181e12),
    ("10 pJ/bit", "energy_per_byte", 80e-12),
    ("80 pJ/B", "energy_per_byte", 80e-12),
    (0.9, "fraction", 0.9),
    (1, "fraction", 1.0),
    ("0.25", "fraction", 0.25),
    ("1e3 GB", "bytes", 1e12),
])
def test_parse_each_kind(text, kind, expected):
    assert close(parse(text, kind, "field"), expected)


def test_parse_unknown_unit_lists_accepted_ones_and_names_the_field():
    with pytest.raises(ValueError) as err:
        parse("1.6 TB/sec", "bandwidth", "mi210.memory.bandwidth")
    msg = str(err.value)
    assert "mi210.memory.bandwidth" in msg and "'TB/sec'" in msg
    for unit in ("TB/s", "GB/s", "MiB/s"):
        assert unit in msg
    with pytest.raises(ValueError, match=r"idle_power.*unknown unit 'w'.*mW, W, kW"):
        parse("40 w", "power", "idle_power")
    with pytest.raises(ValueError, match=r"launch.*unknown unit 'W'"):
        parse("5 W", "time", "launch")  # a unit of another kind


@pytest.mark.parametrize("text,kind", [("-5 W", "power"), ("-1.6 TB/s", "bandwidth"), (-0.5, "fraction"),
                                       ("-0.1", "fraction")])
def test_parse_rejects_negative(text, kind):
    with pytest.raises(ValueError, match=r"^where\.x: .*>= 0"):
        parse(text, kind, "where.x")


@pytest.mark.parametrize("text,kind", [(float("nan"), "fraction"), (float("inf"), "fraction"),
                                       ("1e999 W", "power"), ("nan W", "power"), ("inf TB/s", "bandwidth"),
                                       (10 ** 400, "fraction")])
def test_parse_rejects_non_finite(text, kind):
    with pytest.raises(ValueError, match=r"^where\.x: "):
        parse(text, kind, "where.x")


def test_parse_rejects_missing_unit_and_bools():
    with pytest.raises(ValueError, match=r"active_power: 300 has no unit; write it with one of mW, W, kW"):
        parse(300, "power", "active_power")
    with pytest.raises(ValueError, match=r"launch: 5\.0 has no unit.*\bus\b"):
        parse(5.0, "time", "launch")
    with pytest.raises(ValueError, match=r"active_power.*mW, W, kW"):
        parse("300", "power", "active_power")  # a bare number as text
    for kind in ("fraction", "power"):
        with pytest.raises(ValueError, match=r"efficiency\.scan: expected a .* value, got True"):
            parse(True, kind, "efficiency.scan")
    with pytest.raises(ValueError, match="expected a string"):
        parse([5, "W"], "power", "x")


_POSITIVE = st.floats(min_value=1e-15, max_value=1e20, allow_nan=False, allow_infinity=False)


@given(kind=st.sampled_from(sorted(k for k in UNITS if k != "fraction")), value=_POSITIVE)
def test_format_value_round_trips_to_four_digits(kind, value):
    text = format_value(value, kind)
    assert math.isclose(parse(text, kind, "x"), value, rel_tol=REL)


@given(value=st.floats(min_value=1e-6, max_value=1.0))
def test_format_value_round_trips_fractions(value):
    assert math.isclose(parse(format_value(value, "fraction"), "fraction", "x"), value, rel_tol=REL)


# --- profiles: shipped ------------------------------------------------------------------

SHIPPED = sorted(SHIPPED_DIR.glob("*.toml"))
DEVICE_FIGURES = ("launch", "idle_power", "active_power")
LINK_FIGURES = ("bandwidth", "latency", "energy_per_byte")


def _figure_paths(dev):
    paths = [*DEVICE_FIGURES, *(f"compute.{k}" for k in dev.compute), *(f"efficiency.{k}" for k in dev.efficiency)]
    for level in dev.memory:
        paths += [f"memory.{level.name}.{f}" for f in ("capacity", "bandwidth", "latency")]
    for op in dev.ops:
        paths += [f"ops.{op}.overhead", f"ops.{op}.efficiency"]
    return paths


def _shipped():
    found = Profiles()
    for path in SHIPPED:
        found.update(hetero.cost.load(path))
    return found


def test_every_shipped_profile_loads_and_every_figure_has_a_source():
    names = {p.stem for p in SHIPPED}
    assert {"mi210", "u55c", "links-pcie"} <= names
    shipped = _shipped()
    assert {"mi210", "u55c", "a100-80gb", "h100-sxm", "h200"} <= set(shipped.devices)
    assert {"pcie-gen3-x16", "pcie-gen4-x16", "pcie-gen5-x16", "gpu-fpga-p2p-seed"} <= set(shipped.links)
    for dev in shipped.devices.values():
        assert set(dev.efficiency) == set(PATTERNS)
        assert dev.memory and dev.compute and dev.active_power >= dev.idle_power > 0
        caps = [lv.capacity for lv in dev.memory]
        assert caps == sorted(caps), f"{dev.name}: memory levels must be listed fastest (smallest) first"
        assert dev.host_link in shipped.links
        for path in _figure_paths(dev):
            source = dev.sources.get(path, "")
            assert len(source.strip()) > 10, f"{dev.name}.{path} has no real source: {source!r}"
    for link in shipped.links.values():
        for path in LINK_FIGURES:
            assert len(link.sources.get(path, "").strip()) > 10, f"{link.name}.{path}"
    # a few figures as the datasheets give them
    assert close(shipped.devices["mi210"].memory[-1].bandwidth, 1.6e12)
    assert close(shipped.devices["u55c"].capacity, 16e9)
    assert close(shipped.links["pcie-gen3-x16"].energy_per_byte, 80e-12)


def _assert_same_profiles(a, b):
    assert set(a.devices) == set(b.devices) and set(a.links) == set(b.links)
    for name, d in a.devices.items():
        e = b.devices[name]
        for attr in ("title", "kind", "emulate_on", "host_link", "part"):
            assert getattr(d, attr) == getattr(e, attr), (name, attr)
        for attr in ("launch", "idle_power", "active_power", "handoff"):
            assert math.isclose(getattr(d, attr), getattr(e, attr), rel_tol=REL), (name, attr)
        assert d.compute.keys() == e.compute.keys() and d.efficiency.keys() == e.efficiency.keys()
        for k in d.compute:
            assert math.isclose(d.compute[k], e.compute[k], rel_tol=REL)
        for k in d.efficiency:
            assert math.isclose(d.efficiency[k], e.efficiency[k], rel_tol=REL)
        assert [lv.name for lv in d.memory] == [lv.name for lv in e.memory]
        for lv, lw in zip(d.memory, e.memory):
            for attr in ("capacity", "bandwidth", "latency"):
                assert math.isclose(getattr(lv, attr), getattr(lw, attr), rel_tol=REL), (name, lv.name, attr)
        assert d.ops.keys() == e.ops.keys()
        for op in d.ops:
            assert math.isclose(d.ops[op].overhead, e.ops[op].overhead, rel_tol=REL)
            assert math.isclose(d.ops[op].efficiency, e.ops[op].efficiency, rel_tol=REL)
        assert d.sources == e.sources, name
    for name, l in a.links.items():
        m = b.links[name]
        assert (l.kind, l.between, l.sources) == (m.kind, m.between, m.sources)
        for attr in ("bandwidth", "latency", "energy_per_byte"):
            assert math.isclose(getattr(l, attr), getattr(m, attr), rel_tol=REL), (name, attr)


def test_dumps_loads_round_trip_of_shipped_profiles():
    shipped = _shipped()
    text = dumps(list(shipped.devices.values()), list(shipped.links.values()))
    _assert_same_profiles(shipped, hetero.cost.loads(text, "round-trip.toml"))


def test_dumps_loads_round_trip_with_calibrated_ops_and_quotes():
    doc = base_doc()
    doc["device"][0]["launch"]["source"] = 'measured "quoted" \\ path'
    first = hetero.cost.loads(toml_doc(doc), "a.toml")
    assert close(first.devices["tc-dev"].ops["PageSparseAttention.relevancy"].efficiency, 0.5)
    second = hetero.cost.loads(dumps(list(first.devices.values()), list(first.links.values())), "b.toml")
    _assert_same_profiles(first, second)


# --- profiles: rejections ---------------------------------------------------------------

def fig(value, source="test figure"):
    return {"value": value, "source": source}


def base_doc():
    """A valid profile file (as data) exercising every field."""
    return {
        "device": [{
            "name": "tc-dev", "title": "Test device", "kind": "gpu", "emulate_on": "torch",
            "host_link": "tc-link", "part": "tc-part",
            "launch": fig("5 us"), "idle_power": fig("40 W"), "active_power": fig("300 W"), "handoff": fig("20 us"),
            "compute": {"float16": fig("181 TFLOP/s"), "float32": fig("45.3 TFLOP/s")},
            "efficiency": {"stream": fig(0.9), "scan": fig(0.3), "select": fig("0.3"), "gather": fig(0.5)},
            "memory": [{"name": "L2", "capacity": fig("8 MB"), "bandwidth": fig("5 TB/s"), "latency": fig("250 ns")},
                       {"name": "HBM", "capacity": fig("64 GB"), "bandwidth": fig("1.6 TB/s"),
                        "latency": fig("600 ns")}],
            "ops": {"PageSparseAttention.relevancy": {"overhead": fig("20 us"), "efficiency": fig(0.5)}},
        }],
        "link": [{"name": "tc-link", "kind": "host", "bandwidth": fig("25 GB/s"), "latency": fig("5 us"),
                  "energy_per_byte": fig("10 pJ/bit"), "between": ["tc-dev", "host"]}],
    }


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(k, ensure_ascii=False)} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def toml_doc(doc: dict) -> str:
    return "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items()) + "\n"


def test_base_doc_is_valid():
    loaded = hetero.cost.loads(toml_doc(base_doc()), "base.toml")
    dev = loaded.devices["tc-dev"]
    assert dev.part == "tc-part" and dev.host_link == "tc-link" and close(dev.launch, 5e-6)
    assert [lv.name for lv in dev.memory] == ["L2", "HBM"] and close(dev.efficiency["select"], 0.3)
    assert loaded.links["tc-link"].between == ("tc-dev", "host")


def _at(doc, path):
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node, path[-1]


def _set(doc, path, value):
    node, key = _at(doc, path)
    node[key] = value


def _delete(doc, path):
    node, key = _at(doc, path)
    del node[key]


D = ("device", 0)
L = ("link", 0)
M1 = ("device", 0, "memory", 1)
EFF = ("device", 0, "efficiency")
OP = ("device", 0, "ops", "PageSparseAttention.relevancy")


def _mutated(*edits):
    doc = base_doc()
    for edit in edits:
        edit(doc)
    return toml_doc(doc)


@pytest.mark.parametrize("text,fields", [
    (_mutated(lambda d: _delete(d, (*D, "launch"))), ["device[0]", "missing required field 'launch'"]),
    (_mutated(lambda d: _delete(d, (*M1, "bandwidth"))), ["device[0].memory[1]", "'bandwidth'"]),
    (_mutated(lambda d: _set(d, (*M1, "bandwidth"), fig("-1.6 TB/s"))),
     ["device[0].memory[1].bandwidth", ">= 0"]),
    (_mutated(lambda d: _set(d, (*M1, "bandwidth"), fig("0 TB/s"))), ["device[0].memory[1].bandwidth", "must be > 0"]),
    (_mutated(lambda d: _set(d, (*L, "bandwidth"), fig("0 GB/s"))), ["link[0].bandwidth", "must be > 0"]),
    (_mutated(lambda d: _set(d, (*M1, "capacity"), fig("64 GiBytes"))),
     ["device[0].memory[1].capacity", "unknown unit 'GiBytes'", "GiB"]),
    (_mutated(lambda d: _set(d, (*D, "launch"), {"value": "5 us"})), ["device[0].launch", "needs a source"]),
    (_mutated(lambda d: _set(d, (*D, "launch"), fig("5 us", "  "))), ["device[0].launch", "needs a source"]),
    (_mutated(lambda d: _set(d, (*D, "launch"), "5 us")), ["device[0].launch", "value = ..., source"]),
    (_mutated(lambda d: _set(d, (*D, "lanch"), fig("5 us"))), ["device[0]", "unknown field(s) lanch"]),
    (_mutated(lambda d: _set(d, (*M1, "bandwith"), fig("1 TB/s"))), ["device[0].memory[1]", "unknown field(s) bandwith"]),
    (_mutated(lambda d: _set(d, (*EFF, "scan"), fig(1.5))), ["device[0].efficiency.scan", "(0, 1]"]),
    (_mutated(lambda d: _set(d, (*EFF, "scan"), fig(0))), ["device[0].efficiency.scan", "> 0"]),
    (_mutated(lambda d: _delete(d, (*EFF, "gather"))), ["device[0].efficiency", "'gather'"]),
    (_mutated(lambda d: _set(d, (*EFF, "scatter"), fig(0.5))), ["device[0].efficiency", "unknown field(s) scatter"]),
    (_mutated(lambda d: _set(d, (*OP, "efficiency"), fig(2))), ["ops", "efficiency", "(0, 1]"]),
    (_mutated(lambda d: _set(d, (*D, "active_power"), fig("10 W"))), ["device[0]", "active_power", "idle_power"]),
    (_mutated(lambda d: _set(d, (*D, "kind"), "tpu")), ["device[0].kind", "gpu, cpu, fpga, accelerator", "'tpu'"]),
    (_mutated(lambda d: _set(d, (*D, "emulate_on"), "cuda")), ["device[0].emulate_on", "'cuda'"]),
    (_mutated(lambda d: _set(d, (*D, "compute", "float64"), fig("1 TFLOP/s"))),
     ["device[0].compute", "unknown dtype 'float64'", "bfloat16"]),
    (_mutated(lambda d: _set(d, (*D, "compute"), {})), ["device[0].compute", "at least one"]),
    (_mutated(lambda d: _set(d, (*D, "memory"), [])), ["device[0].memory", "list of levels"]),
    (_mutated(lambda d: _set(d, (*D, "ops"), 0)), ["device[0].ops", "table of calibrated operations"]),
    (_mutated(lambda d: _set(d, (*D, "ops"), [])), ["device[0].ops", "table of calibrated operations"]),
    (_mutated(lambda d: _set(d, (*D, "host_link"), "pcie-gen9")), ["'tc-dev'", "host_link 'pcie-gen9'"]),
    (_mutated(lambda d: _set(d, (*L, "between"), ["tc-dev"])), ["link[0].between", "two devices"]),
    (_mutated(lambda d: _set(d, (*L, "between"), "tc-dev")), ["link[0].between", "two devices"]),
    (_mutated(lambda d: _set(d, (*L, "between"), ["tc-dev", 3])), ["link[0].between", "two devices"]),
    (_mutated(lambda d: _set(d, (*L, "kind"), "nvlink")), ["link[0].kind", "host, p2p, shared"]),
    (_mutated(lambda d: _set(d, (*L, "energy_per_byte"), fig("-1 pJ/bit"))), ["link[0].energy_per_byte", ">= 0"]),
    (_mutated(lambda d: _set(d, ("devices",), [])), ["unknown top-level", "devices"]),
    (_mutated(lambda d: _set(d, ("device",), 5)), ["device must be an array of tables"]),
    ("[[device]\nname = 'x'\n", ["not valid TOML"]),
    ('[[device]]\nname = "x"\nname = "y"\n', ["not valid TOML"]),
    (_mutated(lambda d: _set(d, (*EFF, "scan"), fig(10 ** 400))), ["device[0].efficiency.scan", "finite"]),
    (toml_doc(base_doc()).replace("0.9", "9" * 5000, 1), ["not valid TOML", "digits"]),
])
def test_profile_rejections_name_the_file_and_field(tmp_path, text, fields):
    path = tmp_path / "bad-profile.toml"
    path.write_text(text)
    with pytest.raises(ProfileError) as err:
        hetero.cost.load(path)
    msg = str(err.value)
    assert str(path) in msg
    for field in fields:
        assert field in msg, (field, msg)


def test_load_missing_file_and_add_profiles_of_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no profile file"):
        hetero.cost.load(tmp_path / "absent.toml")
    with pytest.raises(ProfileError, match="no profile file"):
        hetero.cost.add_profiles(tmp_path / "absent.toml")


# fuzz: one field of the valid profile replaced by a value that is wrong for it

_FIGURES = [((*D, "launch"), "time", False), ((*D, "idle_power"), "power", False),
            ((*D, "active_power"), "power", True), ((*D, "compute", "float16"), "flops", True),
            ((*D, "compute", "float32"), "flops", True), ((*OP, "overhead"), "time", False),
            ((*OP, "efficiency"), "fraction", True), ((*L, "bandwidth"), "bandwidth", True),
            ((*L, "latency"), "time", False), ((*L, "energy_per_byte"), "energy_per_byte", False)]
_FIGURES += [((*EFF, p), "fraction", True) for p in PATTERNS]
for _i in (0, 1):
    _FIGURES += [(("device", 0, "memory", _i, "capacity"), "bytes", True),
                 (("device", 0, "memory", _i, "bandwidth"), "bandwidth", True),
                 (("device", 0, "memory", _i, "latency"), "time", False)]

_ALL_UNITS = sorted({u for units in UNITS.values() for u in units if u} |
                    {"TB/sec", "tb/s", "Gbps", "Hz", "%", "J", "bit", "WW", "s/s", "B/s/s", "FLOPS"})
_SCALARS = st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=False, allow_infinity=False))
_JUNK = st.one_of(_SCALARS, st.booleans(), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.sampled_from(["a", "value"]), st.integers(), max_size=1))
_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789 ", min_size=1, max_size=12)


def _bad_quantity(kind: str, positive: bool):
    """A `value` that `kind` must reject."""
    unit = sorted(UNITS[kind])[-1]
    options = [
        st.builds(lambda n, u: f"-{n} {u}".strip(), st.integers(1, 10 ** 6), st.sampled_from(sorted(UNITS[kind]))),
        st.builds(lambda n, u: f"{n} {u}", st.integers(0, 10 ** 6),
                  st.sampled_from([u for u in _ALL_UNITS if u not in UNITS[kind]])),
        st.sampled_from([f"inf {unit}".strip(), f"nan {unit}".strip(), f"1e999 {unit}".strip(), "",
                         f"1.6 {unit} x", f"{unit} 5"]),
        st.booleans(), st.lists(st.integers(), max_size=2), st.just({"a": 1}),
    ]
    if kind == "fraction":
        options += [st.sampled_from([float("nan"), float("inf"), float("-inf"), 10 ** 400, -1, -0.5]),
                    st.floats(min_value=1.0001, max_value=1e300), st.integers(2, 10 ** 9),
                    st.builds(str, st.floats(min_value=1.0001, max_value=1e9))]
    else:
        options += [_SCALARS, st.builds(str, st.integers(0, 10 ** 6))]
    if positive:
        options.append(st.just(f"0 {unit}".strip()))
    return st.one_of(*options)


@st.composite
def _bad_figure(draw):
    path, kind, positive = draw(st.sampled_from(_FIGURES))
    good = "1" if kind == "fraction" else f"1 {sorted(UNITS[kind])[0]}"
    bad = draw(st.one_of(
        st.builds(lambda v: {"value": v, "source": "s"}, _bad_quantity(kind, positive)),
        _JUNK.filter(lambda v: not isinstance(v, dict)),
        st.just({"value": good}),
        st.just({"source": "only a source"}),
        st.builds(lambda s: {"value": good, "source": s}, st.one_of(st.sampled_from(["", "   ", "\t"]), _JUNK)),
        st.builds(lambda k: {"value": good, "source": "s", k: 1}, _WORDS.filter(lambda k: k not in ("value", "source"))),
    ))
    return path, bad


_TEXT = {  # path -> strings that are still wrong there (besides non-strings and "")
    (*D, "name"): st.nothing(), (*D, "title"): st.nothing(), (*D, "part"): st.nothing(),
    (*M1, "name"): st.nothing(), (*L, "name"): st.nothing(),
    (*D, "kind"): _WORDS.filter(lambda w: w not in KINDS),
    (*D, "emulate_on"): _WORDS.filter(lambda w: w not in ("torch", "opencl", "host")),
    (*D, "host_link"): _WORDS.map(lambda w: "tc-no-such-link-" + w),
    (*L, "kind"): _WORDS.filter(lambda w: w not in LINK_KINDS),
}


@st.composite
def _bad_text(draw):
    path = draw(st.sampled_from(sorted(_TEXT)))
    return path, draw(st.one_of(st.just(""), _JUNK, _TEXT[path]))


@st.composite
def _bad_table(draw):
    choice = draw(st.sampled_from(["compute", "efficiency", "memory", "ops", "between", "device", "link",
                                   "top-device", "top-link"]))
    not_table = st.one_of(_SCALARS, st.booleans(), _WORDS, st.lists(st.integers(), max_size=2))
    if choice == "compute":
        return (*D, "compute"), draw(st.one_of(not_table, st.just({}), st.builds(
            lambda k: {k: fig("1 TFLOP/s")}, _WORDS.filter(lambda w: w not in DTYPES))))
    if choice == "efficiency":
        keep = draw(st.sets(st.sampled_from(sorted(PATTERNS)), max_size=len(PATTERNS) - 1))
        return EFF, draw(st.one_of(not_table, st.just({p: fig(0.5) for p in keep})))
    if choice == "memory":
        return (*D, "memory"), draw(st.one_of(not_table.filter(lambda v: not isinstance(v, list)), st.just([]),
                                              st.lists(_JUNK.filter(lambda v: not isinstance(v, dict)),
                                                       min_size=1, max_size=2)))
    if choice == "ops":
        return (*D, "ops"), draw(st.one_of(not_table, st.builds(lambda v: {"X.op": v}, not_table)))
    if choice == "between":
        return (*L, "between"), draw(st.one_of(
            _SCALARS, _WORDS, st.lists(_WORDS, max_size=4).filter(lambda v: len(v) != 2),
            st.lists(st.one_of(_SCALARS, st.booleans()), min_size=2, max_size=2)))
    if choice in ("device", "link"):
        return (choice, 0), draw(not_table)
    return (choice.removeprefix("top-"),), draw(st.one_of(_SCALARS, st.booleans(), st.just({})))


_REQUIRED = [(*D, k) for k in ("name", "kind", "launch", "idle_power", "active_power", "compute", "memory",
                               "efficiency")]
_REQUIRED += [(*M1, k) for k in ("name", "capacity", "bandwidth", "latency")]
_REQUIRED += [(*EFF, p) for p in PATTERNS] + [(*OP, "overhead"), (*OP, "efficiency")]
_REQUIRED += [(*L, k) for k in ("name", "kind", "bandwidth", "latency", "energy_per_byte")]
_TABLES = [(), D, (*D, "memory", 0), M1, EFF, OP, L, (*D, "launch"), (*L, "bandwidth")]


@st.composite
def bad_profile(draw):
    doc = base_doc()
    how = draw(st.sampled_from(["figure", "text", "table", "delete", "add"]))
    if how == "delete":
        path = draw(st.sampled_from(_REQUIRED))
        _delete(doc, path)
        return doc, f"deleted {path}"
    if how == "add":
        table = draw(st.sampled_from(_TABLES))
        node = doc
        for key in table:
            node = node[key]
        key = draw(_WORDS.filter(lambda k: k not in node))
        node[key] = draw(st.one_of(_JUNK, st.just(fig("1 W"))))
        return doc, f"added {key!r} to {table}"
    path, value = draw({"figure": _bad_figure(), "text": _bad_text(), "table": _bad_table()}[how])
    _set(doc, path, value)
    return doc, f"{path} = {value!r}"


@settings(max_examples=max(400, settings.default.max_examples))  # HETERO_EXAMPLES=5000 fuzzes harder
@given(case=bad_profile())
def test_fuzz_one_bad_field_always_raises_profile_error(case):
    doc, what = case
    text = toml_doc(doc)
    with pytest.raises(ProfileError) as err:  # never another exception, never a silent load
        hetero.cost.loads(text, "fuzz-profile.toml")
    assert "fuzz-profile.toml" in str(err.value), (what, str(err.value))


# --- model: levels, tasks, transfers, energy ---------------------------------------------

def _node(name: str) -> Node:
    return node_for(f"model:{name}")


def test_level_choice_is_hierarchical():
    mi210 = device_profile("mi210")
    l2, hbm = mi210.memory
    assert (l2.name, hbm.name) == ("L2", "HBM")
    assert mi210.level_for(4e6) is l2 and mi210.level_for(l2.capacity) is l2
    assert mi210.level_for(l2.capacity + 1) is hbm and mi210.level_for(1e9) is hbm
    assert mi210.level_for(1e15) is hbm  # nothing holds it: the largest level
    u55c = device_profile("u55c")
    assert [lv.name for lv in u55c.memory] == ["BRAM", "URAM", "HBM"]
    assert u55c.level_for(20e6).name == "URAM"  # a 20 MB summary is on chip
    assert u55c.level_for(100e6).name == "HBM"
    assert u55c.level_for(1e6).name == "BRAM"


@pytest.mark.parametrize("footprint,level", [(4e6, "L2"), (1e9, "HBM")])
def test_task_cost_charges_the_level_that_holds_the_footprint(footprint, level):
    node = _node("mi210")
    prof = node.profile
    lv = next(x for x in prof.memory if x.name == level)
    nbytes = 64e6
    task = Task(Step.RELEVANCY, "scan", 0, "float16", "scan", (Access("summary", nbytes, footprint),))
    cost = task_cost(task, node, "Test")
    assert cost.bound == f"{level} bandwidth"
    assert set(cost.levels) == {level} and close(cost.levels[level], nbytes / lv.bandwidth)
    expected = prof.launch + lv.latency + nbytes / lv.bandwidth / prof.efficiency["scan"]
    assert close(cost.seconds, expected)


def test_task_cost_compute_launch_and_calibrated_op_bounds():
    node = _node("mi210")
    prof = node.profile
    big = Task(Step.APPLY, "mm", 1e15, "float16", "stream", (Access("w", 1e6, 1e6),))
    cost = task_cost(big, node, "Test")
    assert cost.bound == "compute"
    assert close(cost.seconds, prof.launch + prof.memory[0].latency + 1e15 / prof.compute["float16"] /
                 prof.efficiency["stream"])
    # a dtype the profile lacks computes at its float32 peak
    assert close(task_cost(dataclasses.replace(big, dtype="int8"), node, "Test").seconds,
                 prof.launch + prof.memory[0].latency + 1e15 / prof.compute["float32"] / prof.efficiency["stream"])
    tiny = Task(Step.APPLY, "tiny", 10, "float32", "stream", (Access("w", 100, 100),), launches=3)
    cost = task_cost(tiny, node, "Test")
    assert cost.bound == "launch" and cost.seconds > 3 * prof.launch
    # a calibrated fit replaces launches + efficiency: overhead + roofline / fitted efficiency
    loaded = hetero.cost.loads(toml_doc(base_doc()), "fit.toml").devices["tc-dev"]
    fit = loaded.ops["PageSparseAttention.relevancy"]
    fitted = Node("tc:dev", loaded, "torch", True, None)
    scan = Task(Step.RELEVANCY, "relevancy", 0, "float16", "scan", (Access("summary", 1e9, 1e9),), launches=50)
    hbm = loaded.memory[1]
    assert close(task_cost(scan, fitted, "PageSparseAttention").seconds, fit.overhead + 1e9 / hbm.bandwidth / fit.efficiency)
    assert close(task_cost(scan, fitted, "Other").seconds,
                 50 * loaded.launch + hbm.latency + 1e9 / hbm.bandwidth / loaded.efficiency["scan"])


def _summary_context(nbytes: float, page: int = 16) -> int:
    """A context whose fp16 summaries (8 KV heads x dim 128, 2 B on OpenCL) take about `nbytes`."""
    return math.ceil(nbytes / (8 * 2 * 128 * 2)) * page


@pytest.mark.parametrize("summary_mb,level", [(20, "URAM"), (100, "HBM")])
def test_u55c_serves_small_summaries_on_chip_and_large_ones_from_hbm(summary_mb, level):
    method = PageSparseAttention()
    shapes = method.shapes(context=_summary_context(summary_mb * 1e6))
    work = method.workload(shapes, {s: "opencl" for s in STEPS}, fused=True)
    task = next(t for t in work.tasks if t.op == "relevancy_retrieval")
    summary = next(a for a in task.accesses if a.what == "summary")
    assert math.isclose(summary.footprint, summary_mb * 1e6, rel_tol=0.01)
    cost = task_cost(task, _node("u55c"), method.name)
    assert level in cost.levels
    on_chip = {"BRAM", "URAM"}
    if level == "HBM":
        assert cost.bound == "HBM bandwidth"
        assert close(cost.levels["HBM"], summary.nbytes / device_profile("u55c").memory[-1].bandwidth)
    else:
        assert set(cost.levels) <= on_chip
    # on a GPU with an 8 MB L2 both sizes come from HBM
    gpu = task_cost(dataclasses.replace(task, op="relevancy"), _node("mi210"), method.name)
    assert "HBM" in gpu.levels


def test_transfer_paths_p2p_staged_same_device_and_host_memory():
    n = 8e6
    p2p, _ = make_system(PAIR)
    hops = p2p.hops("model:mi210", "model:u55c")
    assert [h.name for h in hops] == ["gpu-fpga-p2p-seed"]  # the shipped link joins the two by name
    seed = link_profile("gpu-fpga-p2p-seed")
    [x] = p2p.transfer("v", "model:u55c", "model:mi210", n)
    assert close(x.seconds, seed.latency + n / seed.bandwidth) and close(x.energy_j, n * seed.energy_per_byte)
    assert p2p.hops("model:u55c", "model:u55c") == [] and p2p.transfer("v", "model:u55c", "model:u55c", n) == []

    staged, _ = make_system(["model:h100-sxm", "model:u55c"])
    xs = staged.transfer("v", "model:h100-sxm", "model:u55c", n)
    assert [x.link for x in xs] == ["pcie-gen5-x16", "pcie-gen3-x16"]  # through host memory: two hops
    g5, g3 = link_profile("pcie-gen5-x16"), link_profile("pcie-gen3-x16")
    assert close(sum(x.seconds for x in xs), g5.latency + n / g5.bandwidth + g3.latency + n / g3.bandwidth)
    assert close(sum(x.energy_j for x in xs), n * (g5.energy_per_byte + g3.energy_per_byte))
    # a modeled device and the host: one hop over its host link
    with_cpu, _ = make_system(["model:u55c", CPU])
    assert [h.name for h in with_cpu.hops(CPU, "model:u55c")] == ["pcie-gen3-x16"]
    assert with_cpu.nodes[CPU].host_link is None  # torch:cpu computes in host memory


def test_shared_memory_link_and_host_memory_devices_cost_nothing():
    text = toml_doc({
        "device": [dict(base_doc()["device"][0], name="tc-apu", host_link="tc-shared", ops={})],
        "link": [{"name": "tc-shared", "kind": "shared", "bandwidth": fig("100 GB/s"), "latency": fig("1 us"),
                  "energy_per_byte": fig("5 pJ/B")}]})
    loaded = hetero.cost.loads(text, "apu.toml")
    apu = Node("tc:apu", loaded.devices["tc-apu"], "torch", True, loaded.links["tc-shared"])
    cpu = node_for(CPU)
    system = System([apu, cpu], CPU)
    [x] = system.transfer("v", CPU, "tc:apu", 1e9)
    assert (x.link, x.seconds, x.energy_j) == ("tc-shared", 0.0, 0.0)
    if "host" in device_ids():  # torch:cpu and the C++ shim view one memory
        both, _ = make_system([CPU, "host"])
        assert both.hops(CPU, "host") == [] and both.transfer("v", "host", CPU, 1e9) == []


def _toy_workload():
    tasks = [Task(Step.PREPARE, "a", 1e9, "float32", "stream", (Access("m", 1e8, 1e8),), ("x",), (("y", 1e6),)),
             Task(Step.APPLY, "b", 1e9, "float32", "stream", (Access("m", 1e8, 1e8),), ("y", "x"), (("out", 1e3),))]
    return Workload(tasks, {"x": 1e6}, ("out",), {Step.APPLY: {"m": 1e8}})


def test_energy_counts_idle_home_and_shared_parts_once():
    toy = types.SimpleNamespace(name="Toy")
    # all steps on the U55C, home the MI210: the MI210 idles through the whole call
    system, _ = make_system(PAIR)
    assert system.home == "model:mi210"
    est = evaluate(toy, _toy_workload(), {s: "model:u55c" for s in STEPS}, system)
    mi210, u55c = device_profile("mi210"), device_profile("u55c")
    assert set(est.energy_by_device) == {"model:u55c", "model:mi210"}
    assert close(est.energy_by_device["model:mi210"], est.seconds * mi210.idle_power)
    busy = est.busy["model:u55c"]
    assert 0 < busy < est.seconds  # transfers of x and out take the rest
    assert close(est.energy_by_device["model:u55c"], busy * u55c.active_power + (est.seconds - busy) * u55c.idle_power)
    link_j = sum(t.energy_j for t in est.transfers)
    assert link_j > 0 and close(est.energy_j, sum(est.energy_by_device.values()) + link_j)
    assert close(est.edp, est.energy_j * est.seconds) and est.objective("edp") == est.edp
    # the same in a plan: the U55C baseline pays for the idle MI210 that holds the queries
    base = hetero.place(PageSparseAttention(), dict(context=4096), devices=PAIR).baselines["model:u55c"]
    assert set(base.assignment.values()) == {"model:u55c"} and "model:mi210" not in base.busy
    assert close(base.energy_by_device["model:mi210"], base.seconds * mi210.idle_power)

    # two devices naming one part (one piece of silicon) draw power once
    doc = base_doc()
    del doc["device"][0]["host_link"]  # computes in host memory
    prof = hetero.cost.loads(toml_doc(doc), "parts.toml").devices["tc-dev"]
    assert prof.part == "tc-part"
    a = Node("tc:a", prof, "torch", True, None)
    b = Node("tc:b", prof, "torch", True, None)
    split = {Step.PREPARE: "tc:a", Step.RELEVANCY: "tc:a", Step.RETRIEVAL: "tc:a", Step.APPLY: "tc:b"}
    shared = evaluate(toy, _toy_workload(), split, System([a, b], "tc:a"))
    assert shared.transfers == []  # both compute in host memory
    assert list(shared.energy_by_device) == ["tc:a + tc:b"]
    assert close(shared.energy_j, shared.seconds * prof.active_power)  # one part, busy all the time
    apart = [Node(n.id, dataclasses.replace(prof, part=""), "torch", True, None) for n in (a, b)]
    separate = evaluate(toy, _toy_workload(), split, System(apart, "tc:a"))
    assert set(separate.energy_by_device) == {"tc:a", "tc:b"}
    assert close(separate.seconds, shared.seconds)
    assert close(separate.energy_j, shared.seconds * (prof.active_power + prof.idle_power))


SPLIT = {Step.PREPARE: "model:mi210", Step.RELEVANCY: "model:u55c", Step.RETRIEVAL: "model:u55c",
         Step.APPLY: "model:mi210"}


def _pair_workload(assignment: dict):
    """(method, workload, system) of page-sparse at 64K x batch 4 placed by `assignment` on the MI210 + U55C."""
    method = PageSparseAttention()
    system, devs = make_system(PAIR)
    placed = {s: devs[d] for s, d in assignment.items()}
    work = method.workload(method.shapes(context=65536, batch=4), {s: d.backend for s, d in placed.items()},
                           method.fused(placed))
    return method, work, system


def test_handoffs_charge_each_change_into_a_device():
    method, work, system = _pair_workload(SPLIT)
    base = evaluate(method, work, SPLIT, system)
    assert base.handoffs == []  # the shipped profiles charge none
    nodes = [dataclasses.replace(n, profile=dataclasses.replace(n.profile, handoff=1e-3)) if n.id == "model:u55c"
             else n for n in system.nodes.values()]
    slow = evaluate(method, work, SPLIT, System(nodes, system.home, system.links))
    order = [SPLIT[t.step] for t in work.tasks]  # a decode step repeats: its first task follows its last
    into = sum(1 for a, b in zip(order[-1:] + order[:-1], order) if a != b and b == "model:u55c")
    assert into >= 1 and len(slow.handoffs) == into
    assert all(h.dst == "model:u55c" and h.src == "model:mi210" and h.seconds == 1e-3 for h in slow.handoffs)
    assert close(slow.serial_seconds, base.serial_seconds + into * 1e-3 * slow.repeat)
    assert close(slow.busy["model:u55c"], base.busy["model:u55c"] + into * 1e-3 * slow.repeat)
    gpu = {s: "model:mi210" for s in STEPS}  # no device change, nothing charged
    method, work, _ = _pair_workload(gpu)
    assert evaluate(method, work, gpu, System(nodes, system.home, system.links)).handoffs == []


def test_overlap_takes_the_busiest_resource():
    method, work, system = _pair_workload(SPLIT)
    serial = evaluate(method, work, SPLIT, system)
    piped = evaluate(method, work, SPLIT, system, overlap=True)
    link_busy = {}
    for t in piped.transfers:
        link_busy[t.link] = link_busy.get(t.link, 0.0) + t.seconds * piped.repeat
    assert close(piped.seconds, max([*piped.busy.values(), *link_busy.values()]))
    assert close(serial.seconds, sum(serial.busy.values()) + sum(link_busy.values()))
    assert piped.seconds < serial.seconds and close(piped.serial_seconds, serial.seconds)
    assert piped.energy_j < serial.energy_j  # less idle time
    best_serial = hetero.place(method, dict(context=65536, batch=4), devices=PAIR)
    best_piped = hetero.place(method, dict(context=65536, batch=4), devices=PAIR, overlap=True)
    assert best_piped.chosen.overlap and best_piped.chosen.seconds <= best_serial.chosen.seconds


def test_values_move_once_per_device():
    method = PageSparseAttention()
    plan = hetero.place(method, dict(context=65536), devices=PAIR)
    est = next(e for e in plan.ranked if e.assignment[Step.RELEVANCY] == "model:u55c"
               and e.assignment[Step.RETRIEVAL] == "model:mi210" and e.assignment[Step.APPLY] == "model:mi210"
               and e.assignment[Step.PREPARE] == "model:mi210")
    moved = [(t.what, t.dst) for t in est.transfers]
    assert moved.count(("lengths", "model:u55c")) == 1 and moved.count(("query", "model:u55c")) == 1
    assert ("scores", "model:mi210") in moved and ("delta", "model:u55c") in moved
    assert not any(t.dst == "model:mi210" and t.what in ("query", "lengths") for t in est.transfers)


# --- placer -------------------------------------------------------------------------------

def test_kv_cache_beyond_16_gb_makes_apply_on_u55c_infeasible():
    method = PageSparseAttention()
    shapes = dict(context=131072, layers=32)  # 17.2 GB of fp16 KV cache
    plan = hetero.place(method, shapes, devices=PAIR)
    with_apply = [e for e in plan.ranked + plan.infeasible if e.assignment[Step.APPLY] == "model:u55c"]
    assert len(with_apply) == 8
    for e in with_apply:
        assert e in plan.infeasible and not e.feasible
        assert any("16 GB" in r and "model:u55c" in r and "kv_cache" in r for r in e.reasons), e.reasons
    assert all(e.feasible and e.assignment[Step.APPLY] == "model:mi210" for e in plan.ranked)
    assert len(plan.ranked) == 8
    assert not plan.baselines["model:u55c"].feasible and plan.baselines["model:mi210"].feasible
    assert "16 GB" in plan.baselines["model:u55c"].reasons[0]
    assert plan.chosen.assignment[Step.APPLY] == "model:mi210"
    # reasons come from capacity_reasons: resident bytes against the largest level
    work = method.workload(method.shapes(**shapes), {s: "opencl" for s in STEPS}, True)
    system, _ = make_system(PAIR)
    [reason] = capacity_reasons(work, {s: "model:u55c" for s in STEPS}, system)
    assert "summary" in reason and "kv_cache" in reason and "16 GB HBM" in reason


def test_context_no_device_fits_raises_profile_error_with_reasons():
    with pytest.raises(ProfileError) as err:
        hetero.place(PageSparseAttention(), dict(context=1 << 20, layers=32), devices=PAIR)
    msg = str(err.value)
    assert "no placement of PageSparseAttention" in msg
    assert "does not fit model:mi210 (64 GB HBM)" in msg and "does not fit model:u55c (16 GB HBM)" in msg


def _brute_force(method, shapes, devices, objective, home=None, links=None):
    system, devs = make_system(devices, home, links)
    shapes = method.shapes(**shapes)
    out = {}
    for combo in itertools.product(devs, repeat=len(STEPS)):
        assignment = dict(zip(STEPS, combo))
        placed = {s: devs[d] for s, d in assignment.items()}
        work = method.workload(shapes, {s: d.backend for s, d in placed.items()}, method.fused(placed))
        est = evaluate(method, work, assignment, system)
        out[combo] = (est.objective(objective), not capacity_reasons(work, assignment, system))
    return out


@pytest.mark.parametrize("devices,shapes,objective", [
    (PAIR, dict(context=131072), "latency"),
    (PAIR, dict(context=4096, batch=8), "energy"),
    (PAIR, dict(context=131072, layers=32), "edp"),
    (["model:mi210", "model:u55c", "model:h100-sxm"], dict(context=32768, batch=4), "latency"),
])
def test_exhaustive_search_equals_brute_force(devices, shapes, objective):
    method = PageSparseAttention()
    plan = hetero.place(method, shapes, devices=devices, objective=objective)
    brute = _brute_force(method, shapes, devices, objective)
    assert plan.search == f"exhaustive over {len(brute)} placements"
    assert len(plan.ranked) + len(plan.infeasible) == len(brute)
    feasible = {k: v for k, (v, ok) in brute.items() if ok}
    assert {tuple(e.assignment[s] for s in STEPS) for e in plan.ranked} == set(feasible)
    for e in plan.ranked:
        assert close(e.objective(objective), feasible[tuple(e.assignment[s] for s in STEPS)])
    best = min(feasible.values())
    assert close(plan.chosen.objective(objective), best)
    assert plan.chosen is plan.ranked[0]
    assert [e.objective(objective) for e in plan.ranked] == sorted(e.objective(objective) for e in plan.ranked)


@pytest.mark.parametrize("devices,shapes,objective,equal", [
    (PAIR, dict(context=131072), "latency", True),
    (PAIR, dict(context=131072, layers=32), "energy", True),
    (["model:mi210", "model:u55c", "model:h100-sxm"], dict(context=32768, batch=4), "latency", True),
    (["model:mi210", "model:u55c", "model:h100-sxm"], dict(context=1 << 20, batch=2), "edp", False),
])
def test_greedy_search_is_feasible_and_no_worse_than_baselines(devices, shapes, objective, equal):
    method = PageSparseAttention()
    exhaustive = hetero.place(method, shapes, devices=devices, objective=objective)
    greedy = hetero.place(method, shapes, devices=devices, objective=objective, exhaustive_limit=1)
    assert greedy.search.startswith("greedy") and exhaustive.search.startswith("exhaustive")
    assert greedy.chosen.feasible
    visited, space = len(greedy.ranked) + len(greedy.infeasible), len(exhaustive.ranked) + len(exhaustive.infeasible)
    assert visited <= space and (visited < space or space < 81)  # hill climbing skips most of a larger space
    got, best = greedy.chosen.objective(objective), exhaustive.chosen.objective(objective)
    assert got >= best * (1 - 1e-12)
    baselines = [e.objective(objective) for e in greedy.baselines.values() if e.feasible]
    assert baselines and got <= min(baselines) * (1 + 1e-12)
    assert set(greedy.baselines) == set(exhaustive.baselines)
    if equal:
        assert greedy.chosen.assignment == exhaustive.chosen.assignment and close(got, best)


FAST_SLOW = """
[[link]]
name = "test-cost-link"
kind = "host"
bandwidth = { value = "25 GB/s", source = "test" }
latency = { value = "5 us", source = "test" }
energy_per_byte = { value = "10 pJ/bit", source = "test" }

[[device]]
name = "test-cost-fast"
title = "fast, power-hungry"
kind = "accelerator"
emulate_on = "torch"
host_link = "test-cost-link"
launch = { value = "1 us", source = "test" }
idle_power = { value = "5 W", source = "test" }
active_power = { value = "1000 W", source = "test" }
compute = { float16 = { value = "500 TFLOP/s", source = "test" }, float32 = { value = "100 TFLOP/s", source = "test" } }
efficiency = { stream = { value = 0.9, source = "test" }, scan = { value = 0.9, source = "test" }, select = { value = 0.9, source = "test" }, gather = { value = 0.9, source = "test" } }
[[device.memory]]
name = "DRAM"
capacity = { value = "100 GB", source = "test" }
bandwidth = { value = "4 TB/s", source = "test" }
latency = { value = "100 ns", source = "test" }

[[device]]
name = "test-cost-slow"
title = "slow, frugal"
kind = "accelerator"
emulate_on = "torch"
host_link = "test-cost-link"
launch = { value = "1 us", source = "test" }
idle_power = { value = "1 W", source = "test" }
active_power = { value = "5 W", source = "test" }
compute = { float32 = { value = "1 TFLOP/s", source = "test" } }
efficiency = { stream = { value = 0.9, source = "test" }, scan = { value = 0.9, source = "test" }, select = { value = 0.9, source = "test" }, gather = { value = 0.9, source = "test" } }
[[device.memory]]
name = "DRAM"
capacity = { value = "100 GB", source = "test" }
bandwidth = { value = "50 GB/s", source = "test" }
latency = { value = "100 ns", source = "test" }
"""


@pytest.fixture
def custom_profiles(tmp_path):
    """test-cost-fast / test-cost-slow in the registry for one test; forgotten afterwards."""
    path = tmp_path / "fast-slow.toml"
    path.write_text(FAST_SLOW)
    added = hetero.cost.add_profiles(tmp_path)
    assert set(added.devices) == {"test-cost-fast", "test-cost-slow"}
    yield ["model:test-cost-fast", "model:test-cost-slow"]
    hetero.cost.reload()
    assert "test-cost-fast" not in hetero.cost.known_profiles().devices


def test_objective_changes_the_choice(custom_profiles):
    method = PageSparseAttention()
    plans = {obj: hetero.place(method, dict(context=32768), devices=custom_profiles, objective=obj)
             for obj in ("latency", "energy", "edp")}
    assert plans["latency"].chosen.assignment != plans["energy"].chosen.assignment
    assert set(plans["latency"].chosen.assignment.values()) == {"model:test-cost-fast"}
    assert set(plans["energy"].chosen.assignment.values()) == {"model:test-cost-slow"}
    for obj, plan in plans.items():
        assert len(plan.ranked) == 16
        brute = min(plan.ranked, key=lambda e: e.objective(obj))
        assert close(plan.chosen.objective(obj), brute.objective(obj)), obj
    lat, en = plans["latency"].chosen, plans["energy"].chosen
    assert lat.seconds < en.seconds and en.energy_j < lat.energy_j
    # the energy choice still pays the idle power of the home device (the fast one, listed first)
    assert plans["energy"].system.home == "model:test-cost-fast"
    assert close(en.energy_by_device["model:test-cost-fast"], en.seconds * 5.0)


def test_reload_forgets_added_profiles_and_their_modeled_devices(custom_profiles):
    assert hetero.get_device("model:test-cost-slow").info["profile"] == "test-cost-slow"
    hetero.cost.reload()
    with pytest.raises(ProfileError, match="no device profile 'test-cost-slow'"):
        hetero.get_device("model:test-cost-slow")


def test_links_argument_gives_a_direct_path():
    method = PageSparseAttention()
    devices = ["model:h100-sxm", "model:u55c"]
    split = {Step.PREPARE: "model:h100-sxm", Step.RELEVANCY: "model:u55c", Step.RETRIEVAL: "model:u55c",
             Step.APPLY: "model:h100-sxm"}

    def query_hops(plan):
        est = next(e for e in plan.ranked + plan.infeasible if e.assignment == split)
        return [t.link for t in est.transfers if t.what == "query"], est

    staged, staged_est = query_hops(hetero.place(method, dict(context=65536), devices=devices))
    assert staged == ["pcie-gen5-x16", "pcie-gen3-x16"]
    links = {("model:h100-sxm", "model:u55c"): "gpu-fpga-p2p-seed"}
    direct, direct_est = query_hops(hetero.place(method, dict(context=65536), devices=devices, links=links))
    assert direct == ["gpu-fpga-p2p-seed"]
    assert len(direct_est.transfers) < len(staged_est.transfers)
    with pytest.raises(ValueError, match="links key"):
        hetero.place(method, dict(context=4096), devices=devices, links={("model:h100-sxm", CPU): "gpu-fpga-p2p-seed"})
    with pytest.raises(ProfileError, match="no link profile"):
        hetero.place(method, dict(context=4096), devices=devices, links={tuple(devices): "nvlink-9"})


@pytest.mark.parametrize("kwargs,names", [
    (dict(objective="speed"), ["objective", "latency, energy, edp", "'speed'"]),
    (dict(shapes=dict(contxt=4096)), ["unknown shape", "contxt", "context"]),
    (dict(shapes=dict(q_heads=6, kv_heads=4)), ["shapes['q_heads'] (6)", "shapes['kv_heads'] (4)"]),
    (dict(shapes=dict(context=0)), ["shapes['context']"]),
    (dict(shapes=dict(dtype="int8")), ["shapes['dtype']"]),
])
def test_bad_place_arguments_raise_value_error_naming_them(kwargs, names):
    with pytest.raises(ValueError) as err:
        hetero.place(PageSparseAttention(), devices=PAIR, **kwargs)
    for name in names:
        assert name in str(err.value)


def _table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")]


def test_explain_names_devices_bounds_baselines_and_reasons():
    plan = hetero.place(PageSparseAttention(), dict(context=131072, layers=32), devices=PAIR)
    text = plan.explain(width=200)
    assert text == plan.explain(width=200)
    rows = _table_rows(text)
    for t in plan.chosen.tasks:  # every chosen operation: its step (fused ones as "a+b"), device (modeled), bound
        step = "relevancy+retrieval" if t.task.op == "relevancy_retrieval" else t.task.step.value
        assert [step, t.task.op, f"{t.device} (modeled)"] in [r[:3] for r in rows], t
        assert any(r[:2] == [step, t.task.op] and r[4] == t.bound for r in rows)
    flat = " ".join(text.split())
    assert "objective: latency; exhaustive over 16 placements" in flat
    assert f"chosen: {plan.chosen.label()}:" in flat
    for step in STEPS:  # each step's device, on its own row or on the fused relevancy+retrieval row
        mine = [r for r in rows if r[0] == step.value or (step == Step.RETRIEVAL and r[1] == "relevancy_retrieval")]
        assert mine and all(r[2] == f"{plan.placement[step.value]} (modeled)" for r in mine), step
    assert any("bound by" in line for line in text.splitlines())
    assert any(r[0] == "transfer" and r[4] == "link gpu-fpga-p2p-seed" for r in rows)
    assert "single-device baselines" in text
    mi210 = plan.baselines["model:mi210"]
    assert any(r[0] == "model:mi210 (modeled)" and r[1].endswith("ms") and
               r[3] == f"{mi210.seconds / plan.chosen.seconds:.2f}x" for r in rows)
    assert any(r[0] == "model:u55c (modeled)" and r[1] == "-" and "16 GB" in r[4] for r in rows)
    # why not elsewhere: every device, for every step the choice gives to another
    why = " ".join(text.split("why not elsewhere", 1)[1].split())
    rejected = plan.rejected()
    for dev in PAIR:
        for step in STEPS:
            if plan.chosen.assignment[step] != dev:
                [reason] = [r for r in rejected[dev] if r.startswith(f"{step.value}:")]
                assert f"{dev} (modeled): {reason}" in why
                if (dev, step) == ("model:u55c", Step.APPLY):
                    assert reason.startswith("apply: infeasible (") and "16 GB" in reason
                else:
                    assert re.match(rf"{step.value}: best placement with it here is \+\d+% latency", reason), reason


def test_explain_leaves_no_file_open():
    plan = hetero.place(PageSparseAttention(), dict(context=4096), devices=PAIR)
    caught, hook = [], sys.unraisablehook
    sys.unraisablehook = caught.append
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            assert "chosen:" in plan.explain() and "chosen:" in str(plan)
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not caught, [str(c.exc_value) for c in caught]


def test_explain_flags_uncalibrated_present_devices():
    plan = hetero.place(PageSparseAttention(), dict(context=4096, kv_heads=2, q_heads=2), devices=[CPU, "model:u55c"])
    text = plan.explain(width=200)
    assert "model:u55c (modeled)" in text
    assert "torch:cpu (modeled)" not in text
    if not plan.system.nodes[CPU].calibrated:
        assert "torch:cpu has no calibrated profile" in text


# --- modeled devices at run time ----------------------------------------------------------

def test_modeled_device_lookup(opencl_device):
    dev = hetero.get_device("model:u55c")
    assert isinstance(dev, hetero.Device) and dev.id == "model:u55c"
    assert dev.info["modeled"] is True and dev.backend == "opencl" and dev.kind == "fpga"
    assert dev.info["emulator"] in device_ids("opencl")
    gpu = hetero.get_device("model:mi210")
    assert gpu.backend == "torch" and gpu.kind == "gpu" and gpu.info["emulator"] == CPU


def test_unknown_modeled_device_names_the_known_profiles():
    with pytest.raises(ProfileError) as err:
        hetero.get_device("model:nonexistent")
    msg = str(err.value)
    assert "'nonexistent'" in msg and "known:" in msg
    for name in ("mi210", "u55c", "h100-sxm"):
        assert name in msg


def _kv(seed=0, seq=300, heads=2, dim=64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, seq, dim, generator=g), torch.randn(1, heads, seq, dim, generator=g),
            torch.randn(1, heads, dim, generator=g))


def _method():
    return PageSparseAttention(page_size=16, budget_tokens=64)  # 4 of 19 pages: retrieval matters


def _reference(keys, values, query):
    pipe = hetero.Pipeline(_method(), CPU)
    return pipe.step(query, pipe.prepare(keys, values))


def test_pipeline_on_a_modeled_fpga_matches_torch_and_labels_modeled_records(opencl_device):
    keys, values, query = _kv()
    placement = {"prepare": CPU, "relevancy": "model:u55c", "retrieval": "model:u55c", "apply": CPU}
    pipe = hetero.Pipeline(_method(), placement)
    launch = device_profile("u55c").launch
    memory = pipe.prepare(keys, values)
    records = {"prepare": pipe.last_run}
    out = pipe.step(query, memory)
    records["step"] = pipe.last_run
    new_keys, new_values, _ = _kv(seed=5, seq=40)
    pipe.append(memory, new_keys, new_values)  # 340 tokens: a new page summary merged on the FPGA
    records["append"] = pipe.last_run
    out_appended = pipe.step(query, memory)
    for call, record in records.items():
        on_fpga = [r for r in record.steps if r.device == "model:u55c"]
        assert on_fpga, call
        for r in on_fpga:
            assert r.timing.source == "modeled" and r.seconds >= launch, (call, r)
        for r in record.steps:
            if r.device == CPU:
                assert r.timing.source != "modeled", (call, r)
        crossing = [t for t in record.transfers if "model:u55c" in (t.src, t.dst)]
        assert crossing, call
        assert all(t.timing.source == "modeled" for t in crossing)
        for row in record.rows():
            assert (row["clock"] == "modeled") == ("model:u55c" in row["device"]), (call, row)
    ops = [(r.step, r.op) for r in records["step"].steps]
    assert ("relevancy+retrieval", "relevancy_retrieval") in ops  # fused on the FPGA, as the model assumes
    moved = {t.what: t for t in records["step"].transfers}
    assert moved["query"].nbytes == query.numel() * 4 and moved["query"].dst == "model:u55c"
    assert moved["page_ids"].src == "model:u55c"
    assert ("prepare", "merge_summary", "model:u55c") in [(r.step, r.op, r.device) for r in records["append"].steps]
    torch.testing.assert_close(out, _reference(keys, values, query), rtol=1e-5, atol=1e-5)
    ref = hetero.Pipeline(_method(), CPU)
    ref_memory = ref.prepare(keys, values)
    ref.append(ref_memory, new_keys, new_values)
    torch.testing.assert_close(out_appended, ref.step(query, ref_memory), rtol=1e-5, atol=1e-5)


# --- Pipeline(placement="auto") -------------------------------------------------------------

def test_auto_placement_prepares_places_and_matches_the_reference():
    keys, values, query = _kv(seed=1)
    pipe = hetero.Pipeline(_method(), "auto")
    assert pipe.placement is None and pipe.plan is None and "auto" in repr(pipe)
    with pytest.raises(ValueError, match=r"call pipe\.prepare\(\.\.\.\) first"):
        pipe.step(query, None)
    memory = pipe.prepare(keys, values)
    assert pipe.plan is not None and isinstance(pipe.placement, hetero.Placement)
    assert {s.value: pipe.placement[s].id for s in STEPS} == pipe.plan.placement
    assert pipe.placement == hetero.Placement.resolve(pipe.method, pipe.plan.placement)
    shapes = pipe.plan.shapes
    assert (shapes["batch"], shapes["kv_heads"], shapes["head_dim"], shapes["context"], shapes["dtype"]) == \
        (1, 2, 64, 300, "float32")
    assert pipe.plan.objective == "latency" and pipe.plan.chosen is pipe.plan.ranked[0]
    out = pipe.step(query, memory)
    torch.testing.assert_close(out, _reference(keys, values, query), rtol=1e-5, atol=1e-5)


def test_auto_placement_with_given_devices_shapes_and_objective(opencl_device):
    keys, values, query = _kv(seed=2)
    pipe = hetero.Pipeline(_method(), "auto", devices=[CPU, "model:u55c"], objective="energy",
                           shapes=dict(q_heads=2))
    memory = pipe.prepare(keys, values)
    assert pipe.plan.objective == "energy" and set(pipe.plan.system.nodes) == {CPU, "model:u55c"}
    assert set(pipe.plan.placement.values()) <= {CPU, "model:u55c"}
    out = pipe.step(query, memory)
    torch.testing.assert_close(out, _reference(keys, values, query), rtol=1e-5, atol=1e-5)
    for r in pipe.last_run.steps:
        assert (r.timing.source == "modeled") == (r.device == "model:u55c")


def test_auto_placement_rejects_a_bad_objective():
    with pytest.raises(ValueError, match=r"objective must be one of latency, energy, edp, got 'fastest'"):
        hetero.Pipeline(_method(), "auto", objective="fastest")
    with pytest.raises(hetero.PlacementError, match="placement='auto' needs shapes"):
        hetero.Placement.resolve(_method(), "auto")
