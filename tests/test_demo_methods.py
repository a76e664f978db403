"""Every registered method runs by name from `hetero demo` and `hetero profile`."""

import numpy as np
import pytest

from hetero import cli, demo
from hetero.methods import METHODS, PageSparseAttention
from hetero.profiling.session import OUTPUTS

CONTEXT = "4096"
# options that make retrieval choose among the entries at CONTEXT (not keep them all)
OPTIONS = {"page-sparse": ["budget_tokens=512"], "dsa": ["top_k=512"], "mac": ["top_k=64"]}


def _options(name):
    return [arg for option in OPTIONS.get(name, []) for arg in ("--option", option)]


@pytest.mark.parametrize("name", list(METHODS))
def test_demo_runs_every_method_and_agrees_with_its_reference(name, monkeypatch, capsys):
    ran = []
    run_demo = demo.run_demo

    def recorded(*args, **kwargs):
        ran.append(run_demo(*args, **kwargs))
        return ran[-1]

    monkeypatch.setattr(demo, "run_demo", recorded)
    code = cli.main(["demo", "--method", name, "--context", CONTEXT, "--repeats", "1", *_options(name)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = ran[0]
    assert result.shapes[result.method.CONTEXT_SHAPE] == int(CONTEXT)
    assert set(r.name for r in result.results) | set(result.skipped) == set(demo.placements_present())
    assert result.results, "runs on at least one placement"
    for r in result.results:
        assert r.agreement == 1.0, r.name
        assert r.max_error <= result.tolerance and r.reference_error <= result.tolerance, r.name
        assert r.step_ms > 0 and r.per_step_ms
    assert "MISMATCH" not in printed
    if result.method.family == "sparse-attention":
        assert "faster than dense attention" in printed


@pytest.mark.parametrize("name", list(METHODS))
def test_profile_runs_every_method(name, tmp_path, capsys):
    out = tmp_path / "prof"
    code = cli.main(["profile", "--method", name, "--context", "2048", "--steps", "1", "--out", str(out),
                     "--energy-window", "0.05", *_options(name)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for file in OUTPUTS:
        assert (out / file).is_file() and (out / file).stat().st_size > 0, file
    assert "memory processing" in printed


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--option", "bogus=1"], "bogus"),
    (["--option", "budget_tokens=0"], "budget_tokens must be a positive int"),
    (["--shape", "contexts=5"], "unknown shape"),
    (["--method", "seer", "--budget", "64"], "--budget is page-sparse's budget_tokens"),
])
def test_demo_bad_input_exits_2_naming_it(argv, message, capsys):
    assert cli.main(["demo", "--context", "512", "--repeats", "1", *argv]) == 2
    assert message in capsys.readouterr().out.replace("\n", " ")


def test_demo_seq_and_budget_are_page_sparse_aliases(monkeypatch):
    class Stop(Exception):
        pass

    def stub(method, shapes, **kwargs):
        seen.update(method=method, shapes=shapes)
        raise Stop

    seen = {}
    monkeypatch.setattr(demo, "run_demo", stub)
    with pytest.raises(Stop):
        cli.main(["demo", "--seq", "1024", "--budget", "256"])
    assert seen["shapes"]["context"] == 1024 and seen["method"].budget_pages == 256 // 16


def test_demo_fails_when_a_placement_disagrees_with_the_reference(monkeypatch, capsys):
    reference_step = PageSparseAttention.reference_step

    def shifted(self, inputs, query):  # the reference picks other pages in one row
        selected, out = reference_step(self, inputs, query)
        selected[0, 0] = np.where(selected[0, 0] >= 0, selected[0, 0] + 1, -1)
        return selected, out

    monkeypatch.setattr(PageSparseAttention, "reference_step", shifted)
    code = cli.main(["demo", "--context", "2048", "--budget", "256", "--repeats", "1", "--shape", "kv_heads=2"])
    printed = capsys.readouterr().out
    assert code == 1 and "demo FAILED" in printed and "50.0%" in printed


def test_row_agreement_compares_sets_ignoring_padding():
    reference = np.array([[[0, 3, 5, -1], [1, 2, 4, 6]]])
    selected = np.array([[[5, 3, 0, -1, -1], [1, 2, 4, 7, -1]]])
    assert demo.row_agreement(selected, reference) == 0.5
    with pytest.raises(ValueError, match="batch, kv_heads"):
        demo.row_agreement(selected[:, :1], reference)


@pytest.mark.parametrize("name", list(METHODS))
def test_workload_lists_the_operations_each_call_records(name):
    """The cost model pairs a call's recorded operations with its workload's tasks in order
    (profiles' predicted-vs-measured, modeled devices): they must be the same list, for
    prepare and for a step, on every placement the method can run."""
    from hetero import Pipeline
    from hetero.runtime import Placement, PlacementError

    method = demo.get_method(name, **{k: int(v) for k, v in (o.split("=") for o in OPTIONS.get(name, []))})
    shapes = method.shapes(**{method.CONTEXT_SHAPE: int(CONTEXT), "batch": 2})
    inputs, query = method.example_inputs(shapes)
    for placement in demo.placements_present().values():
        try:
            Placement.resolve(method, placement)
        except PlacementError:
            continue
        pipe = Pipeline(method, placement)
        memory = pipe.prepare(*inputs)
        prepared = [r.op for r in pipe.last_run.steps]
        pipe.step(query, memory)
        stepped = [r.op for r in pipe.last_run.steps]
        backends = {s: pipe.placement[s].backend for s in pipe.placement}
        fused = method.fused(pipe.placement)
        shape = method.shapes_of(memory, query)
        _, _, appended, _, _ = method.describe_call("prepare", inputs, memory)
        prepare_ops = [t.op for t in method.workload(shape, backends, fused, appended=appended, query=False,
                                                     allocate=True).tasks]
        step_ops = [t.op for t in method.workload(shape, backends, fused, appended=0).tasks]
        assert prepare_ops == prepared, (placement, prepare_ops, prepared)
        assert step_ops == stepped, (placement, step_ops, stepped)
