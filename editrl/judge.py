"""`editrl judge --recipe R --data DIR`: score a folder of existing edits with a recipe's rewards.

Useful to check a judge (server up, prompt sensible, scores spread) before a long run. The folder is a
manifest folder whose rows name their `edited` video (or image: the judges then see the image itself); rows without
one are skipped. Rows are scored in batches of equal shape; the table shows each reward's score, or why it has none.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer

from editrl.data.cli import ALLOW_OUTSIDE


def score_folder(
    recipe_path: str,
    data: str | Path,
    overrides: list[str] | None = None,
    batch_size: int = 8,
    max_frames: int | None = None,
    progress: bool = True,
    allow_outside: bool = False,
    out: Path | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """(reward names, one row per scored edit: id, instruction, {name: score or None}, {name: error}). `out`, where
    the caller will write the scores, is checked first: it may not be an input."""
    import torch
    from rich.progress import Progress

    from editrl.base import DataError, RecipeError
    from editrl.data.manifest import load_manifest, load_sample, manifest_inputs
    from editrl.evaluate import recipe_rewards
    from editrl.files import check_output
    from editrl.preflight import load_recipe
    from editrl.reward import reward_batch

    recipe = load_recipe(recipe_path, overrides or [])
    if out is not None:
        check_output(out, [*manifest_inputs(data), Path(recipe_path)])
    entries = [e for e in load_manifest(data, on_error="fail", allow_outside=allow_outside) if e.row.edited is not None]
    if not entries:
        raise DataError(f"no row of {data} names an `edited` video or image to score")
    rewards = recipe_rewards(recipe)
    if rewards is None:
        raise RecipeError(f"recipe {recipe_path} has no rewards: add rewards.terms to score with")
    rows: list[dict[str, Any]] = []
    pending: dict[tuple[int, ...], list[Any]] = {}

    def flush(samples: list[Any]) -> None:
        edited = torch.stack([s.edited for s in samples])
        outs = rewards.score(reward_batch(samples, edited, rewards.needs))
        for i, s in enumerate(samples):
            scores, errors = {}, {}
            for name, out in outs.items():
                ok = bool(out.valid[i])
                scores[name] = float(out.scores[i]) if ok else None
                err = (out.extras.get("error") or [None] * len(samples))[i]
                errors[name] = None if ok else (err or "no score")
            rows.append({"id": s.id, "instruction": s.instruction, "scores": scores, "errors": errors})

    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("judging", total=len(entries))
        for entry in entries:
            sample = load_sample(entry, max_frames)
            group = pending.setdefault(tuple(sample.edited.shape), [])
            group.append(sample)
            if len(group) == batch_size:
                flush(group)
                bar.advance(task, len(group))
                group.clear()
        for group in pending.values():
            if group:
                flush(group)
                bar.advance(task, len(group))
    order = {e.row.id: i for i, e in enumerate(entries)}
    rows.sort(key=lambda r: order[r["id"]])
    return rewards.names, rows


def unscored(names: list[str], rows: list[dict[str, Any]]) -> str | None:
    """Why the scores cannot be used (a reward that failed on every edit: its first error), or None. A reward that
    does not apply to a row (no error) is not a failure."""
    for n in names:
        errors = [r["errors"][n] for r in rows if r["scores"][n] is None]
        if rows and len(errors) == len(rows) and any(e != "no score" for e in errors):
            return f"reward {n!r} scored none of the {len(rows)} edits (first: {next(e for e in errors if e != 'no score')})"
    return None


def render_table(names: list[str], rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table("id", "instruction", *names, title="judge scores")
    for r in rows:
        cells = [
            f"{r['scores'][n]:.3f}" if r["scores"][n] is not None else f"[red]invalid[/red]: {r['errors'][n]}" for n in names
        ]
        table.add_row(r["id"], r["instruction"][:50], *cells)
    summary = []
    for n in names:
        valid = [r["scores"][n] for r in rows if r["scores"][n] is not None]
        mean = sum(valid) / len(valid) if valid else math.nan
        summary.append(f"{mean:.3f} ({len(valid)}/{len(rows)} valid)")
    table.add_section()
    table.add_row("[bold]mean[/bold]", "", *summary)
    return table


def judge(
    recipe: str = typer.Option(..., "--recipe", "-r", help="recipe whose `rewards` score the edits"),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="manifest folder whose rows name an `edited` video or image"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides of the recipe"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="edits scored together (judges send them concurrently)"),
    max_frames: Optional[int] = typer.Option(None, "--max-frames", min=1, help="read at most this many frames per video"),
    out: Optional[Path] = typer.Option(
        None, "--out", help="also write the scores as JSON lines to this file (--audit: the report's folder, "
        "default runs/audit/RUN)"
    ),
    audit_data: Optional[Path] = typer.Option(
        None, "--audit", help="instead, audit the rewards on this folder with targets: do they prefer the target to foils?"
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="--audit: only the first N samples"),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Score a folder of edits with the recipe's rewards and print a table; or, with --audit, audit the rewards.

    Useful to check a judge (server up, prompt sensible, scores spread) before a long run. The audit scores each
    sample's target, its source, another sample's target and degraded targets with every reward term and reports per
    category how often each term prefers the target and how it ranks them against the oracle (audit.md, audit.csv,
    audit.png).

    Examples:
      editrl judge --recipe viva_grpo --data data/edited
      editrl judge --recipe quickstart --audit data/synth_eval --out runs/audit
    """
    from rich.console import Console

    from editrl.base import EditrlError
    from editrl.commands import console, run_cli

    def go() -> None:
        if (data is None) == (audit_data is None):
            raise EditrlError("give --data (score a folder of edits) or --audit (audit the rewards), one of them")
        if audit_data is not None:
            from editrl.audit import audit_folder, summary

            reports, paths = audit_folder(recipe, audit_data, overrides, out, batch_size, max_frames, limit,
                                          allow_outside=allow_outside)
            console.print(summary(reports), markup=False, highlight=False)
            console.print(f"[green]wrote[/green] {', '.join(str(p) for p in paths.values())}")
            return
        names, rows = score_folder(recipe, data, overrides, batch_size, max_frames, allow_outside=allow_outside, out=out)
        Console().print(render_table(names, rows))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r) + "\n" for r in rows))
            console.print(f"[green]wrote[/green] {out}")
        failed = unscored(names, rows)
        if failed:
            raise EditrlError(f"{failed}: the scores above are not usable")

    run_cli(go)


def register(app: typer.Typer) -> None:
    app.command()(judge)
