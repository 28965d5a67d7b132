"""The engine's own commands: train, recipes, rewards."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)
DEFAULT_RECIPE = "quickstart"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for a user: printed as one line, never as a traceback."""
    from editrl.config import RecipeError
    from editrl.data.video import MediaError
    from editrl.registry import RegistryError
    from editrl.trainer import TrainingError

    return (RecipeError, RegistryError, TrainingError, MediaError, FileNotFoundError)


def run_cli(fn: Callable[[], Any]) -> Any:
    """Call `fn`; known user errors become one red line and exit code 2."""
    try:
        return fn()
    except user_errors() as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: continue later with --resume")
        raise typer.Exit(130) from None


def train(
    recipe: str = typer.Argument(DEFAULT_RECIPE, help="recipe file, or the name of a bundled recipe (`editrl recipes`)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides, e.g. train.steps=5"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run directory's latest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="start over in a run directory that has checkpoints"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and resolve the recipe, build nothing"),
) -> None:
    """Train a policy with Edit-GRPO as the recipe says."""
    from editrl.config import derive_layout, load_recipe

    def go() -> None:
        rec = load_recipe(recipe, overrides or [], check_paths=not dry_run)  # a dry run lists missing paths below
        if dry_run:
            layout = derive_layout(rec)
            console.print(f"[green]recipe ok[/green]: {rec.run.name} -> {rec.output_dir}")
            console.print(layout.model_dump())
            from editrl.preflight import preflight

            problems = preflight(rec)
            for problem in problems:
                console.print(f"[red]missing:[/red] {problem}", highlight=False)
            if problems:
                console.print(f"[red]not ready[/red]: {len(problems)} weights/servers the recipe needs are missing here")
                raise typer.Exit(2)
            console.print("[green]ready[/green]: every weight and server the recipe names is here")
            return
        from editrl.trainer import train as run_training

        run_dir = run_training(rec, resume=resume, overwrite=overwrite)
        console.print(f"[green]done[/green]: {run_dir}")

    run_cli(go)


def sweep(
    spec: Path = typer.Argument(..., help="sweep spec YAML (base recipe x variants x seeds)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides for every run"),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-j", help="runs at a time (default: the spec's)"),
) -> None:
    """Run a sweep resumably and write its results table and plots."""
    from editrl.sweep import run_sweep

    def go() -> None:
        out = run_sweep(spec, parallel, overrides or [])
        console.print(f"[green]results[/green]: {out / 'results.md'}")
        console.print((out / "results.md").read_text())

    run_cli(go)


def recipes() -> None:
    """List the bundled recipes."""
    from editrl.config import bundled_recipes

    table = Table("name", "path", "description")
    for name, path in bundled_recipes().items():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, str(path), first)
    Console().print(table)


def rewards() -> None:
    """List registered rewards and their options."""
    from editrl.registry import REWARDS

    table = Table("name", "needs", "options", "about")
    for name in REWARDS.names():
        try:
            obj = REWARDS.get(name)
        except Exception as e:  # a plugin whose optional dependency is missing still gets listed
            table.add_row(name, "", "", f"[red]unavailable: {e}[/red]")
            continue
        opts = getattr(obj, "Options", None)
        options = ", ".join(f"{k}={f.default!r}" for k, f in opts.model_fields.items()) if opts else _fn_options(obj)
        needs = ", ".join(sorted(getattr(obj, "needs", ()))) or "all"
        table.add_row(name, needs, options, (inspect.getdoc(obj) or "").split("\n")[0])
    Console().print(table)


def _fn_options(obj: Any) -> str:
    if not callable(obj) or inspect.isclass(obj):
        return ""
    skip = {"instructions", "sources", "edited", "references", "kwargs"}
    return ", ".join(p for p in inspect.signature(obj).parameters if p not in skip)


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command()(sweep)
    app.command()(recipes)
    app.command()(rewards)
