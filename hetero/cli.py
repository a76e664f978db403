"""The `hetero` command."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def cmd_devices(args) -> int:
    from . import backend_problems, devices

    table = Table(title="hetero devices")
    for col in ("id", "kind", "backend", "name"):
        table.add_column(col)
    for d in devices():
        table.add_row(d.id, d.kind, d.backend, d.name)
    console.print(table)
    for backend, why in backend_problems().items():
        console.print(f"[yellow]{backend} backend not available:[/] {why}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo, setup

    try:
        options = _key_values(args.option, "option")
        if args.budget is not None:
            if args.method != "page-sparse":
                raise ValueError(f"--budget is page-sparse's budget_tokens; for {args.method!r} use --option")
            options = {"budget_tokens": args.budget, **options}
        method, shapes = setup(args.method, args.context, options=options, shapes=_key_values(args.shape, "shape"))
    except (ValueError, TypeError) as exc:
        console.print(f"[red]hetero demo:[/] {exc}")
        return 2
    console.print(f"[bold]hetero demo[/]: {method!r} at " + ", ".join(f"{k}={v}" for k, v in shapes.items()))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        demo = run_demo(method, shapes=shapes, repeats=args.repeats, progress=progress)
    table = Table(title=f"one decode step, median of {args.repeats} (device times per step); checked against the "
                  f"float64 reference")
    for col, justify in (("placement", "left"), ("step", "left"), ("device", "left"), ("ms", "right"),
                         ("rows agree", "right"), ("max err", "right")):
        table.add_column(col, justify=justify)
    for r in demo.results:
        for i, (step, ms) in enumerate(r.per_step_ms.items()):
            table.add_row(r.name if i == 0 else "", step.replace("relevancy+retrieval", "rel+ret (fused)"),
                          r.per_step_device.get(step, ""), f"{ms:.2f}", "", "")
        table.add_row("", "transfers", f"{r.transfer_bytes:,} B", f"{r.transfer_ms:.2f}", "", "")
        needle = {None: "", True: "[green]needle found[/]", False: "[red]needle MISSED[/]"}[r.needle_found]
        agree = "100%" if r.agreement == 1.0 else f"[red]{r.agreement:.1%}[/]"
        error = f"{r.max_error:.1e}" if r.max_error <= demo.tolerance else f"[red]{r.max_error:.1e} MISMATCH[/]"
        table.add_row("", "[bold]step (wall)[/]", needle, f"[bold]{r.step_ms:.2f}[/]", agree, error, end_section=True)
    if demo.dense_ms is not None:
        table.add_row("dense", "SDPA, GQA", "torch:cpu", f"{demo.dense_ms:.2f}", "", "")
    console.print(table)
    mixed = next((r for r in demo.results if r.name == "mixed"), None)
    if mixed:
        console.print(f"mixed = {mixed.placement}")
    for name, why in demo.skipped.items():
        console.print(f"[yellow]skipped {name}:[/] {why}")
    if method.family == "retrieval":
        console.print(f"rows agree: queries whose top-k documents are the reference's set; max err: the scores against "
                      f"the reference's scores of the same documents (tolerance {demo.tolerance:g}); the float64 "
                      f"reference took {demo.reference_s:.1f} s")
    else:
        console.print(f"rows agree: (sequence, KV head) rows that selected the reference's set; max err: against "
                      f"exact attention over the entries the placement selected (tolerance {demo.tolerance:g}); the "
                      f"float64 reference took {demo.reference_s:.1f} s")
    if demo.needle is not None:
        console.print(f"needle token(s) {sorted(set(demo.needle.flatten().tolist()))}")
    if demo.results:
        best = min(demo.results, key=lambda r: r.step_ms)
        console.print(f"fastest placement: {best.name} {best.step_ms:.2f} ms")
        if demo.dense_ms is not None:
            console.print(f"[bold]{demo.dense_ms / best.step_ms:.1f}x[/] faster than dense attention "
                          f"({demo.dense_ms:.1f} ms); per placement: "
                          + ", ".join(f"{r.name} {demo.dense_ms / r.step_ms:.1f}x" for r in demo.results))
    if not demo.ok:
        console.print("[red]demo FAILED: a placement disagreed with the reference, missed the needle or ran nowhere[/]")
    return 0 if demo.ok else 1


def cmd_calibrate(args) -> int:
    from .cost.calibrate import calibrate, fmt_bytes
    from .methods import get_method

    try:
        methods = [get_method(name) for name in args.methods] if args.methods else None
    except ValueError as exc:
        console.print(f"[red]hetero calibrate:[/] {exc}")
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        result = calibrate(devices=args.devices, methods=methods, quick=args.quick, path=args.out,
                           progress=progress, repeats=args.repeats)
    report = result.report
    table = Table(title=f"hetero calibrate{' --quick' if args.quick else ''}: {report['cpu']}")
    for col, justify in (("device", "left"), ("launch", "right"), ("float32", "right"), ("memory levels", "left"),
                         ("host link", "left"), ("ops fitted", "right")):
        table.add_column(col, justify=justify)
    for dev, prof in result.devices.items():
        levels = ", ".join(f"{lv.name} {fmt_bytes(lv.capacity)} @ {lv.bandwidth / 1e9:.3g} GB/s" for lv in prof.memory)
        link = result.links.get(prof.host_link) if prof.host_link else None
        link_text = f"{link.bandwidth / 1e9:.3g} GB/s, {link.latency * 1e6:.3g} us" if link else "host memory"
        table.add_row(dev, f"{prof.launch * 1e6:.3g} us", f"{prof.flops('float32') / 1e9:.3g} GFLOP/s", levels,
                      link_text, str(len(prof.ops)))
    console.print(table)
    fits = Table(title="operation fits: time = overhead + roofline / efficiency", title_justify="left")
    for col in ("device", "method", "operation", "overhead", "efficiency", "shapes kept", "median |error|"):
        fits.add_column(col, justify="left" if col in ("device", "method", "operation") else "right")
    for dev, ops in report["fits"].items():
        for op, f in ops.items():
            fits.add_row(dev, *op.split(".", 1), f"{f['overhead'] * 1e6:.3g} us",
                         f"{min(f['efficiency'], 1.0):.3g}" + (" (clamped)" if f["clamped"] else ""),
                         f"{f['kept']}/{f['n']}", f"{f['median_abs_rel_error']:.1%}")
    console.print(fits)
    if report["skipped_methods"]:
        console.print(f"[yellow]not calibrated[/] (no decode-step appends: TOKEN_AXES or decode_inputs): "
                      f"{', '.join(report['skipped_methods'])}")
    console.print(f"power is modeled (RAPL readable: {report['rapl_readable']}); wrote [bold]{report['path']}[/] "
                  f"in {report['seconds']:.0f} s")
    return 0


def _key_values(pairs: list[str], what: str) -> dict:
    """['context=32768', 'dtype=float32'] -> {'context': 32768, 'dtype': 'float32'}."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--{what} {pair!r} must read name=value")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            try:
                out[key.strip()] = float(value)
            except ValueError:
                out[key.strip()] = value.strip()
    return out


def default_placements(method=None) -> list[str]:
    """'auto', every present device alone, and the paper's split when OpenCL is present;
    with `method`, only those it can run (the others are named on the console)."""
    from .demo import placements_present
    from .runtime import Placement, PlacementError

    specs = ["auto"]
    for name, placement in placements_present().items():
        if method is not None:
            try:
                Placement.resolve(method, placement)
            except PlacementError as exc:
                console.print(f"[yellow]skipped {name}:[/] {exc}")
                continue
        specs.append(placement if isinstance(placement, str) else ",".join(f"{k}={v}" for k, v in placement.items()))
    return specs


def cmd_profile(args) -> int:
    from .methods import get_method
    from .profiling.session import OUTPUTS, profile_method

    try:
        method = get_method(args.method, **_key_values(args.option, "option"))
        shapes = {**({"dtype": "float32"} if "dtype" in method.SHAPES else {}), **_key_values(args.shape, "shape")}
        if args.context is not None:
            shapes[method.CONTEXT_SHAPE] = args.context
        if args.batch is not None:
            shapes["batch"] = args.batch
        shapes = method.shapes(**shapes)
    except (ValueError, TypeError) as exc:
        console.print(f"[red]hetero profile:[/] {exc}")
        return 2
    placements = args.placement or default_placements(method)
    console.print(f"[bold]hetero profile[/]: {method!r} at " + ", ".join(f"{k}={v}" for k, v in shapes.items())
                  + f"; {len(placements)} placement(s) x {args.steps} decode steps")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def tick(advance, total, what):
            progress.update(task, advance=advance, total=total, description=what)

        try:
            result = profile_method(method, shapes, placements, steps=args.steps, energy_window_s=args.energy_window,
                                    out=args.out, seed=args.seed, progress=tick)
        except ValueError as exc:  # PlacementError included
            console.print(f"[red]hetero profile:[/] {exc}")
            return 2
    summary = result.prof.summary()
    summary.render(console)
    table = Table(title="per placement: one decode step", title_justify="left")
    for col in ("pipe", "placement", "step wall (median)", "memory share", "energy / step", "measured", "gap"):
        table.add_column(col, justify="left" if col in ("pipe", "placement") else "right")
    from .profiling.report import Energy

    for run in result.runs:
        walls = sorted(c.record.wall_s for c in result.prof.calls if c.pipe is run.pipe and c.record.call == "step")
        share = summary.memory_share["by_pipeline"].get(run.pipeline, 0.0)
        modeled = sum(e["modeled"]["joules"] for e in run.energy.values())
        measured = [e["measured"]["joules"] for e in run.energy.values() if e["measured"]]
        gap = [f"{e['gap']:+.0%}" for e in run.energy.values() if e["gap"] is not None]
        table.add_row(run.pipeline, run.spec if run.spec == "auto" else repr(run.pipe.placement),
                      f"{walls[len(walls) // 2] * 1e3:.3g} ms", f"{share:.0%}", str(Energy(modeled, "modeled")),
                      str(Energy(sum(measured), "measured")) if measured else "-", ", ".join(gap) or "-")
    console.print(table)
    for run in result.runs:
        if run.pipe.plan is not None:
            console.print(f"auto ({run.pipeline}) chose {run.pipe.placement!r}; `profile.json` has the placer's reasons")
    console.print("wrote " + ", ".join(f"[bold]{p}[/]" for p in result.files.values()))
    missing = [name for name in OUTPUTS if name not in result.files]
    if missing:
        console.print(f"[yellow]not written:[/] {', '.join(missing)} (no cost model for these steps)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetero", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list the execution targets present").set_defaults(fn=cmd_devices)
    demo = sub.add_parser("demo", help="a method's decode step on every placement, checked against its reference")
    demo.add_argument("--method", default="page-sparse", metavar="NAME",
                      help="a registered method: page-sparse (default), dsa, seer")
    demo.add_argument("--context", "--seq", type=int, dest="context", metavar="N",
                      help="tokens in the synthetic memory (default 65536)")
    demo.add_argument("--option", action="append", metavar="NAME=VALUE",
                      help="a method option, e.g. budget_tokens=1024 (repeatable)")
    demo.add_argument("--shape", action="append", metavar="NAME=VALUE",
                      help="any other shape, e.g. kv_heads=8, batch=2, dtype=float16 (repeatable)")
    demo.add_argument("--budget", type=int, metavar="N",
                      help="page-sparse: tokens attended per KV head (--option budget_tokens)")
    demo.add_argument("--repeats", type=int, default=5, metavar="N", help="timed decode steps per placement (default 5)")
    demo.set_defaults(fn=cmd_demo)
    calib = sub.add_parser("calibrate", help="measure this machine's devices and write their cost-model profiles")
    calib.add_argument("--devices", nargs="+", metavar="ID", help="device ids to calibrate (default: every present one)")
    calib.add_argument("--methods", nargs="+", metavar="NAME",
                       help="registered methods whose operations are fitted, with default options (default: every "
                            "registered one); other methods' fits already in the profile are kept")
    calib.add_argument("--quick", action="store_true", help="a smaller sweep and shape grid (a minute or two)")
    calib.add_argument("--out", metavar="PATH", help="where to write the TOML (default ~/.cache/hetero/machine.toml)")
    calib.add_argument("--repeats", type=int, default=None, help="decode steps per placement and shape (default 7, 5 "
                       "with --quick)")
    calib.set_defaults(fn=cmd_calibrate)
    prof = sub.add_parser("profile", help="profile a method's decode steps per placement: table, trace, JSON, plots")
    prof.add_argument("--method", default="page-sparse", help="registered method name (default page-sparse)")
    prof.add_argument("--placement", action="append", metavar="SPEC",
                      help="'auto', a device id, or step=device,... (repeatable; default: auto, every device "
                           "alone, and the OpenCL split)")
    prof.add_argument("--context", type=int, help="size of the memory: tokens, documents or memory entries (the "
                      "method's CONTEXT_SHAPE; default its own)")
    prof.add_argument("--batch", type=int, help="sequences (default 1)")
    prof.add_argument("--shape", action="append", metavar="NAME=VALUE",
                      help="any other shape, e.g. kv_heads=8, q_heads=32, head_dim=128, dtype=float16 (repeatable)")
    prof.add_argument("--option", action="append", metavar="NAME=VALUE",
                      help="a method option, e.g. budget_tokens=2048 (repeatable)")
    prof.add_argument("--steps", type=int, default=10, help="profiled decode steps per placement (default 10)")
    prof.add_argument("--energy-window", type=float, default=1.0, metavar="S",
                      help="seconds over which a step is repeated where an energy counter exists (default 1)")
    prof.add_argument("--out", default="hetero-profile", metavar="DIR",
                      help="folder for trace.json, profile.json and the PNG plots (default ./hetero-profile)")
    prof.add_argument("--seed", type=int, default=0, help="seed of the synthetic inputs")
    prof.set_defaults(fn=cmd_profile)
    args = parser.parse_args(argv)
    for name in ("budget", "repeats", "steps", "context", "batch"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1")
    if getattr(args, "energy_window", 1.0) <= 0:
        parser.error("--energy-window must be > 0")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
