"""The held-out before/after table printed when a run that evaluates finishes (the quickstart's punchline)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from editrl.monitor import read_metrics


def eval_before_after(run_dir: Path) -> Table | None:
    """eval/* at the first and the last evaluation of a run (metrics.jsonl), with the change; None if fewer than two."""
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    table = Table(title=f"held-out eval split: step {first['step']} -> step {last['step']}")
    for column in ("metric", f"step {first['step']}", f"step {last['step']}", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in sorted(k for k in last if k.startswith("eval/") and last[k] is not None and first.get(k) is not None):
        delta = last[key] - first[key]
        colour = "green" if delta > 0 else "red" if delta < 0 else "white"
        table.add_row(key.removeprefix("eval/"), f"{first[key]:.4f}", f"{last[key]:.4f}", f"[{colour}]{delta:+.4f}[/{colour}]")
    return table


def print_eval_before_after(run_dir: Path, console: Console) -> None:
    table = eval_before_after(run_dir)
    if table is not None:
        console.print(table)
