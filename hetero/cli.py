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
    from .demo import run_demo

    console.print(f"[bold]hetero demo[/]: page-sparse attention, {args.seq:,} tokens, 8 KV heads x 4 query heads, "
                  f"head_dim 128, page 16, budget {args.budget:,} tokens, a planted needle")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        results, dense_ms, needle, config = run_demo(seq=args.seq, budget_tokens=args.budget, repeats=args.repeats,
                                                     progress=progress)
    table = Table(title=f"one decode step, median of {args.repeats} (device times per step)")
    for col, justify in (("placement", "left"), ("step", "left"), ("device", "left"), ("ms", "right"),
                         ("bytes moved", "right")):
        table.add_column(col, justify=justify)
    ok = True
    for r in results:
        for i, (step, ms) in enumerate(r.per_step_ms.items()):
            table.add_row(r.name if i == 0 else "", step.replace("relevancy+retrieval", "rel+ret (fused)"),
                          r.per_step_device.get(step, ""), f"{ms:.2f}", "")
        table.add_row("", "transfers", "", f"{r.transfer_ms:.2f}", f"{r.transfer_bytes:,}")
        verdict = "[green]needle found[/]" if r.needle_found else "[red]needle MISSED[/]"
        match = r.max_error < 1e-4
        ok &= r.needle_found and match
        table.add_row("", "[bold]step (wall)[/]", verdict, f"[bold]{r.step_ms:.2f}[/]",
                      f"max err {r.max_error:.1e}" + ("" if match else " [red]MISMATCH[/]"), end_section=True)
    table.add_row("dense", "SDPA, GQA", "torch:cpu", f"{dense_ms:.2f}", "")
    console.print(table)
    mixed = next((r for r in results if r.name == "mixed"), None)
    if mixed:
        console.print(f"mixed = {mixed.placement}")
    best = min(results, key=lambda r: r.step_ms)
    console.print(f"needle token {needle} (page {needle // config['page_size']}); fastest placement: {best.name} "
                  f"{best.step_ms:.2f} ms, [bold]{dense_ms / best.step_ms:.1f}x[/] faster than dense attention "
                  f"({dense_ms:.1f} ms)")
    for r in results:
        console.print(f"  {r.name}: {dense_ms / r.step_ms:.1f}x")
    if not ok:
        console.print("[red]demo FAILED: a placement missed the needle or disagreed with exact attention[/]")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hetero", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("devices", help="list the execution targets present").set_defaults(fn=cmd_devices)
    demo = sub.add_parser("demo", help="page-sparse attention with a planted needle on every placement")
    demo.add_argument("--seq", type=int, default=65536, help="tokens in the synthetic KV cache (default 65536)")
    demo.add_argument("--budget", type=int, default=2048, help="tokens attended per KV head (default 2048)")
    demo.add_argument("--repeats", type=int, default=5, help="timed decode steps per placement (default 5)")
    demo.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    for name in ("seq", "budget", "repeats"):
        if getattr(args, name, 1) is not None and getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
