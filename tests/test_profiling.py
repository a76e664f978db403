"""Profiling: the timeline and its Perfetto trace, summaries, energy labels, the CLI."""

import json

import jsonschema
import pytest

import hetero
from hetero import runtime
from hetero.cli import main
from hetero.methods import PageSparseAttention
from hetero.profiling.session import OUTPUTS, parse_placement

# Chrome trace-event format, the parts hetero writes ("JSON Object Format": traceEvents with
# complete 'X' events and metadata 'M' events naming processes and threads)
TRACE_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "displayTimeUnit": {"enum": ["ms", "ns"]},
        "otherData": {"type": "object"},
        "traceEvents": {"type": "array", "items": {"oneOf": [
            {"type": "object", "required": ["ph", "name", "cat", "pid", "tid", "ts", "dur", "args"],
             "properties": {"ph": {"const": "X"}, "name": {"type": "string"}, "cat": {"enum": ["call", "step", "transfer"]},
                            "pid": {"type": "integer"}, "tid": {"type": "integer"},
                            "ts": {"type": "number", "minimum": 0}, "dur": {"type": "number", "minimum": 0},
                            "args": {"type": "object", "required": ["clock"]}}},
            {"type": "object", "required": ["ph", "name", "pid", "tid", "args"],
             "properties": {"ph": {"const": "M"},
                            "name": {"enum": ["process_name", "thread_name", "process_sort_index", "thread_sort_index"]},
                            "pid": {"type": "integer"}, "tid": {"type": "integer"}, "args": {"type": "object"}}},
        ]}},
    },
}

TOLERANCE_US = 5.0  # device clocks are mapped onto the host's to within a few microseconds


def mixed_placement(opencl):
    return {"prepare": "torch:cpu", "relevancy": opencl, "retrieval": opencl, "apply": "torch:cpu"}


def profiled_runs(placements, context=4096, steps=3):
    method = PageSparseAttention(budget_tokens=256)
    (keys, values), query = method.example_inputs(dict(context=context, dtype="float32", kv_heads=2, q_heads=8))
    pipes = [hetero.Pipeline(method, p) for p in placements]
    memories = [p.prepare(keys, values) for p in pipes]
    for p, m in zip(pipes, memories):
        p.step(query, m)
    with hetero.profile() as prof:
        for _ in range(steps):
            for p, m in zip(pipes, memories):
                p.step(query, m)
        pipes[0].append(memories[0], keys[:, :, :5], values[:, :, :5])
    return prof, pipes


@pytest.fixture(scope="module")
def mixed_profile(opencl_device):
    return profiled_runs(["torch:cpu", mixed_placement(opencl_device), opencl_device])


def trace_tracks(trace):
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e["ph"] == "M" and e["name"] == "thread_name"}
    tracks = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            tracks.setdefault(names[e["pid"], e["tid"]], []).append(e)
    return tracks


def test_trace_is_valid_and_every_record_is_on_its_track(mixed_profile, tmp_path):
    prof, _ = mixed_profile
    trace = json.loads(prof.export_trace(tmp_path / "t" / "trace.json").read_text())
    jsonschema.validate(trace, TRACE_SCHEMA)
    tracks = trace_tracks(trace)
    n_records = 0
    for call in prof.calls:
        for r in call.record.steps:
            n_records += 1
            match = [e for e in tracks[r.device] if e["cat"] == "step" and e["name"] == r.step
                     and abs(e["dur"] - r.seconds * 1e6) < 1e-3 and e["args"]["pipeline"] == call.pipeline]
            assert match, f"{r.step} on {r.device} ({r.seconds * 1e6:.1f} us) not on its track"
        for t in call.record.transfers:
            n_records += 1
            match = [e for e in tracks[f"{t.src} -> {t.dst}"] if e["name"] == t.what and e["args"]["bytes"] == t.nbytes
                     and abs(e["dur"] - t.seconds * 1e6) < 1e-3]
            assert match, f"transfer {t.what} {t.src} -> {t.dst} not on its track"
    assert n_records == sum(len(v) for k, v in tracks.items() if not k.startswith("p"))
    assert any(t.src != t.dst for c in prof.calls for t in c.record.transfers), "the mixed run moves data"


def test_tracks_do_not_overlap_and_steps_fit_in_their_calls(mixed_profile, tmp_path):
    prof, _ = mixed_profile
    trace = json.loads(prof.export_trace(tmp_path / "trace.json").read_text())
    for name, events in trace_tracks(trace).items():
        events.sort(key=lambda e: e["ts"])
        for a, b in zip(events, events[1:]):
            assert a["ts"] + a["dur"] <= b["ts"] + TOLERANCE_US, f"track {name}: {a['name']} overlaps {b['name']}"
    for call in prof.calls:
        start = (call.record.start_ns - prof.start_ns) / 1e3
        end = start + call.record.wall_s * 1e6
        inside = [e for e in prof.events() if e.call == call.index and e.kind != "call"]
        busy = sum(e.seconds for e in inside)
        assert busy <= call.record.wall_s + TOLERANCE_US * 1e-6
        for e in inside:
            ts = (e.start_ns - prof.start_ns) / 1e3
            assert start - TOLERANCE_US <= ts and ts + e.seconds * 1e6 <= end + TOLERANCE_US, (e, start, end)


def test_step_durations_add_up_to_the_wall_time():
    """Where the steps are the work (a long context on torch:cpu), the timeline accounts for
    most of each call: the rest is the runtime's own checks and dispatch."""
    prof, _ = profiled_runs(["torch:cpu"], context=32768, steps=3)
    for call in prof.calls:
        if call.record.call == "step":
            covered = sum(e.seconds for e in prof.events() if e.call == call.index and e.kind != "call")
            assert 0.6 * call.record.wall_s <= covered <= call.record.wall_s


def test_summary_totals_and_energy_sources(mixed_profile):
    prof, pipes = mixed_profile
    summary = prof.summary()
    assert summary.calls == {"step": 9, "append": 1}
    for row in summary.steps:
        assert row["seconds"] > 0 and 0 < row["share"] <= 1
        assert row["predicted_s"] is not None and row["flops"] is not None, "page-sparse has a cost model"
    records = sum(len(c.record.steps) for c in prof.calls)
    assert sum(row["n"] for row in summary.steps) == records
    assert sum(row["seconds"] for row in summary.steps) == pytest.approx(
        sum(s.seconds for c in prof.calls for s in c.record.steps))
    share = summary.memory_share
    assert 0 < share["of_step_calls"] < 1 and 0 < share["of_window"] <= share["of_step_calls"]
    assert set(share["by_pipeline"]) == {"p0", "p1", "p2"}
    assert assert_energy_labeled(summary.to_dict()) >= len(summary.steps) + len(summary.devices)
    text = str(summary)
    assert "(modeled)" in text and "memory processing" in text


def assert_energy_labeled(value, path="") -> int:
    """Every energy figure in a report is an object {joules, source}; no bare number sits
    under an energy key. Returns how many figures it checked."""
    checked = 0
    if isinstance(value, dict):
        if "joules" in value:
            assert value.get("source") in ("measured", "modeled"), f"{path}: {value!r} has no source"
            checked += 1
        for key, item in value.items():
            if ("energy" in key.lower() or key.lower().endswith("_j")) and isinstance(item, (int, float)):
                raise AssertionError(f"{path}.{key} = {item!r} is an energy figure without its source")
            checked += assert_energy_labeled(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            checked += assert_energy_labeled(item, f"{path}[{i}]")
    return checked


def test_modeled_device_is_labeled_everywhere(tmp_path):
    prof, _ = profiled_runs([{"prepare": "torch:cpu", "relevancy": "model:u55c", "retrieval": "model:u55c",
                              "apply": "torch:cpu"}], steps=2)
    trace = json.loads(prof.export_trace(tmp_path / "trace.json").read_text())
    tracks = trace_tracks(trace)
    assert "model:u55c (modeled)" in tracks
    assert all(e["args"]["clock"] == "modeled" for e in tracks["model:u55c (modeled)"])
    rows = [r for r in prof.summary().steps if r["device"] == "model:u55c"]
    assert rows and all(r["clock"] == "modeled" and r["predicted_s"] is None for r in rows)
    assert "model:u55c (modeled)" in str(prof.summary())


def test_profiling_off_collects_nothing_and_blocks_close_on_errors():
    method = PageSparseAttention(budget_tokens=64)
    (keys, values), query = method.example_inputs(dict(context=256, dtype="float32", kv_heads=1, q_heads=1))
    pipe = hetero.Pipeline(method, "torch:cpu")
    memory = pipe.prepare(keys, values)
    assert runtime.PROFILERS == []
    with pytest.raises(RuntimeError, match="boom"):
        with hetero.profile() as outer:
            with hetero.profile(meters=False) as inner:
                pipe.step(query, memory)
            raise RuntimeError("boom")
    assert runtime.PROFILERS == []
    assert len(outer.calls) == len(inner.calls) == 1
    pipe.step(query, memory)
    assert len(outer.calls) == 1, "a closed profile sees nothing more"
    with pytest.raises(RuntimeError, match="one block"):
        with outer:
            pass


def test_absent_meters_are_reported_not_zero():
    with hetero.profile() as prof:
        pass
    for m in prof.meters:
        assert m.available or (m.why_absent and m.name not in prof.meter_joules)
    for row in prof.summary().meters:
        assert row["available"] or row["why_absent"]


def test_parse_placement():
    assert parse_placement("auto") == "auto"
    assert parse_placement("torch:cpu") == "torch:cpu"
    assert parse_placement("relevancy=opencl:0:0, retrieval=opencl:0:0") == {
        "relevancy": "opencl:0:0", "retrieval": "opencl:0:0"}
    for bad, match in (("", "empty"), ("relevance=torch:cpu", "unknown step 'relevance'"), ("apply=", "step=device")):
        with pytest.raises(hetero.PlacementError, match=match):
            parse_placement(bad)


def test_cli_profile_writes_every_file(tmp_path, opencl_device, capsys):
    out = tmp_path / "prof"
    code = main(["profile", "--context", "2048", "--steps", "2", "--out", str(out), "--placement", "torch:cpu",
                 "--placement", "auto", "--placement", f"relevancy={opencl_device},retrieval={opencl_device}",
                 "--shape", "kv_heads=2", "--shape", "q_heads=4", "--option", "budget_tokens=256",
                 "--energy-window", "0.05"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for name in OUTPUTS:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    jsonschema.validate(json.loads((out / "trace.json").read_text()), TRACE_SCHEMA)
    data = json.loads((out / "profile.json").read_text())
    assert data["shapes"]["context"] == 2048 and len(data["placements"]) == 3
    assert data["placements"][1]["plan"], "auto placement carries the placer's explanation"
    assert assert_energy_labeled(data) > 0
    assert "memory processing" in printed and "per placement" in printed


@pytest.mark.parametrize("args, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--placement", "relevance=torch:cpu"], "unknown step"),
    (["--shape", "contexts=5"], "unknown shape"),
    (["--option", "budget_tokens=0"], "budget_tokens must be a positive int"),
    (["--shape", "nonsense"], "must read name=value"),
])
def test_cli_profile_bad_input(tmp_path, capsys, args, message):
    code = main(["profile", "--context", "512", "--steps", "1", "--out", str(tmp_path / "x"), *args])
    assert code == 2
    assert message in capsys.readouterr().out.replace("\n", " ")
    assert not (tmp_path / "x").exists(), "nothing written on bad input"
