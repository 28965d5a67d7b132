"""What a finished run prints last: the held-out before/after table (the quickstart's punchline), then where
everything is and which commands to try next."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from editrl.harness import RunResult
from editrl.monitor import LIBRARY_LOG, duration, read_metrics


def eval_before_after(run_dir: Path) -> Table | None:
    """eval/* at the first and the last evaluation of a run (metrics.jsonl), with the change, and beside each oracle
    metric its yardsticks (copy: the source unedited; ceiling: the target through the VAE) and the share of the gap
    between them closed at each end; None if fewer than two evaluations."""
    from editrl.evaluate import GAP_COLUMNS, YARDSTICKS, gap_closed

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    table = Table(title=f"held-out eval split: step {first['step']} -> step {last['step']}")
    for column in ("metric", f"step {first['step']}", f"step {last['step']}", "change", "copy", "ceiling", "gap closed"):
        table.add_column(column, justify="left" if column == "metric" else "right", no_wrap=True)
    marks = tuple(f"eval/{y}/" for y in YARDSTICKS)
    for key in sorted(k for k in last if k.startswith("eval/") and not k.startswith(marks)
                      and last[k] is not None and first.get(k) is not None):
        delta = last[key] - first[key]
        colour = "green" if delta > 0 else "red" if delta < 0 else "white"
        col = key.removeprefix("eval/oracle/") if key.startswith("eval/oracle/") else None
        copy, ceiling = (last.get(f"eval/{y}/{col}", math.nan) for y in YARDSTICKS)
        marked = ["" if col is None else "n/a" if math.isnan(v) else f"{v:.4f}" for v in (copy, ceiling)]
        share = [gap_closed(r[key], copy, ceiling) for r in (first, last)] if col in GAP_COLUMNS else []
        closed = "" if not share else "n/a" if math.isnan(share[1]) else f"{share[0]:.0f}% -> {share[1]:.0f}%"
        table.add_row(key.removeprefix("eval/"), f"{first[key]:.4f}", f"{last[key]:.4f}",
                      f"[{colour}]{delta:+.4f}[/{colour}]", *marked, closed)
    return table


def print_eval_before_after(run_dir: Path, console: Console) -> None:
    table = eval_before_after(run_dir)
    if table is not None:
        # Never cut a metric's name (oracle/fidelity_psnr and oracle/fidelity_ssim would read alike): a narrower
        # terminal wraps the lines instead, and a log file keeps them whole.
        width, console.width = console.width, max(console.width, console.measure(table, options=console.options.update_width(1000)).maximum)
        try:
            console.print(table)
        finally:
            console.width = width


def run_summary(run_dir: Path, recipe: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """([(what, where)], [(why, next command)]) for a finished `editrl train` run; paths as the user can type them."""
    from editrl.checkpoint import find_checkpoint
    from editrl.data.video import is_image

    editrl = _prog()
    run = _show(run_dir)
    places = [("run directory", run)]
    try:
        places.append(("checkpoints", f"{_show(find_checkpoint(run_dir))} (latest)"))
    except FileNotFoundError:
        places.append(("checkpoints", "none written"))
    best = run_dir / "checkpoints" / "best"
    if best.is_dir():
        places.append(("best checkpoint", f"{_show(best)} (train.sentinel.best)"))
    places.append(("metrics", _show(run_dir / "metrics.jsonl")))
    if (run_dir / "sentinel.log").is_file():
        places.append(("sentinel alarms", _show(run_dir / "sentinel.log")))
    tensorboard = Path(sys.executable).with_name("tensorboard")
    if "tensorboard" in recipe.run.loggers:
        places.append(("TensorBoard", f"{_show(tensorboard) if tensorboard.is_file() else 'tensorboard'} --logdir {run}/tensorboard"))
    if "wandb" in recipe.run.loggers:
        w = recipe.run.wandb
        places.append(("W&B", f"wandb sync {run}/wandb/offline-run-* (uploads it)" if w.mode == "offline" else f"project {w.project}"))
    videos = sorted(p for p in (run_dir / "samples").rglob("*") if p.suffix in (".mp4", ".png"))
    places.append(("sample videos", f"{len(videos)} in {run}/samples" if videos else "none (train.sample_every=N saves them)"))
    grid, before_after = run_dir / "eval" / "grid.png", run_dir / "before_after.png"
    places.append(("frame grid", _show(grid) if grid.is_file() else f"{_show(grid)}, written by `{editrl} eval`"))
    if before_after.is_file():
        places.append(("before/after frames", _show(before_after)))
    places.append(("library log", f"{run}/{LIBRARY_LOG}"))

    commands = []
    clip = _first_clip(recipe)
    if clip is not None:
        folder, row = clip
        flag, suffix, what = ("--image", ".png", "image") if is_image(row["source"]) else ("--video", ".mp4", "clip")
        commands.append((
            f"edit a held-out {what} with the trained policy",
            f"{editrl} edit --checkpoint {run} {flag} {_show(folder / row['source'])} "
            f"--instruction {shlex.quote(row['instruction'])} --out {_show(run_dir / 'edits' / (row['id'] + suffix))}",
        ))
        commands.append(("benchmark it on the held-out split: tables per category and a frame grid",
                         f"{editrl} eval --checkpoint {run} --data {_show(folder)}"))
    commands += [(f"the bundled sweep {spec.stem}: variants x seeds, resumable, results table and plots",
                  f"{editrl} sweep {_show(spec)}") for spec in _sweeps_of(recipe.run.name)]
    return places, commands


def unscored_samples(result: RunResult) -> list[str]:
    """Per reward that gave invalid scores, how many samples it left unscored over the run (its returned totals)."""
    keys = sorted(k for k in result.totals if k.startswith("reward/") and k.endswith("/invalid"))
    steps = f"{result.step} step{'s' * (result.step != 1)}"
    return [f"reward {k[7:-8]!r} gave no score to {result.totals[k]:g} samples in {steps}" for k in keys if result.totals[k]]


def nothing_trained(result: RunResult) -> str | None:
    """Why an Edit-GRPO run trained no sample at all (one line), or None when it trained some (or ran no step here)."""
    if result.totals.get("samples/trained", 1.0) or not result.step:
        return None
    why = "; ".join(unscored_samples(result)) or "every group's rewards tied, so every advantage was 0"
    return f"nothing was trained in {_show(result.run_dir)}: {why}. Fix the rewards (see the warning above), then rerun with --overwrite"


def print_run_summary(result: RunResult, recipe: Any, seconds: float, console: Console) -> None:
    places, commands = run_summary(result.run_dir, recipe)
    places += [("unscored samples", line) for line in unscored_samples(result)]
    table = Table.grid(padding=(0, 2))
    for what, where in places:
        table.add_row(f"  {what}", escape(where))
    console.print(f"[bold green]Done[/] in {duration(seconds)}. Where everything is:")
    console.print(table)
    console.print("[bold]Try next:[/]")
    for why, command in commands:
        console.print(f"  # {why}", style="dim", soft_wrap=True, markup=False, highlight=False)
        console.print(f"  {command}", soft_wrap=True, markup=False, highlight=False)


def _first_clip(recipe: Any) -> tuple[Path, dict[str, Any]] | None:
    """(data folder, its first manifest row) of the recipe's eval split (else its training split), if it has files."""
    from editrl.data.manifest import MANIFEST_NAME
    from editrl.data.synth import SyntheticDataset

    source = recipe.data.eval or recipe.data.train
    if source.kind == "synthetic":
        folder = SyntheticDataset.Options.model_validate(source.options).folder()
    elif source.kind == "manifest":
        path = Path(source.options["path"])
        folder = path if path.is_dir() else path.parent
    else:
        return None
    lines = (folder / MANIFEST_NAME).read_text().splitlines() if (folder / MANIFEST_NAME).is_file() else []
    return (folder, json.loads(lines[0])) if lines else None


def _sweeps_of(run_name: str) -> list[Path]:
    """Bundled sweep specs whose base recipe is this run's."""
    from editrl.config import bundled_recipes

    roots = {p.parent for p in bundled_recipes().values()}
    specs = sorted(p for root in roots for p in (root / "sweeps").glob("*.yaml"))
    return [p for p in specs if Path(str((yaml.safe_load(p.read_text()) or {}).get("base", ""))).stem == run_name]


def _prog() -> str:
    """`editrl` as the user can run it: plain when that is on the PATH, else the script's path (.venv/bin/editrl)."""
    argv0, on_path = Path(sys.argv[0]), shutil.which("editrl")
    if argv0.name != "editrl" or (on_path is not None and Path(on_path).resolve() == argv0.resolve()):
        return "editrl"
    return _show(argv0)


def _show(path: Path) -> str:
    """A path relative to the working directory when it is inside it, else absolute; quoted for a shell."""
    path = path.absolute()
    if path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return shlex.quote(str(path))
