"""The engine's own commands: train, recipes, rewards."""

from __future__ import annotations

import inspect
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True, soft_wrap=True)
DEFAULT_RECIPE = "quickstart"


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for a user: printed as one line, never as a traceback."""
    from editrl.base import EditrlError

    return (EditrlError, FileNotFoundError)


def run_cli(fn: Callable[[], Any]) -> Any:
    """Call `fn`; known user errors become one red line and exit code 2. SIGTERM stops it as Ctrl-C does (one line,
    exit 128 + the signal), and a plugin that calls sys.exit is an error, never a silent success."""
    stopped = {"by": signal.SIGINT}

    def terminate(signum: int, frame: Any) -> None:
        stopped["by"] = signal.Signals(signum)
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        return fn()
    except user_errors() as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: continue later with --resume")
        raise typer.Exit(128 + stopped["by"]) from None
    except SystemExit as e:  # typer's own exits are not SystemExit; this one comes from a plugin or a library
        console.print(f"[red]error:[/red] something editrl ran called sys.exit({e.code!r}) instead of raising an "
                      "error: the command did not finish", highlight=False)
        raise typer.Exit(2) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def train(
    recipe: str = typer.Argument(DEFAULT_RECIPE, help="recipe file, or the name of a bundled recipe (`editrl recipes`)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides, e.g. train.steps=5"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run directory's latest checkpoint"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="start over in a run directory that has checkpoints (they go once the new run is built)"
    ),
    accept_changes: bool = typer.Option(
        False, "--accept-changes", help="with --resume: continue with a recipe that differs from the checkpoint's"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and resolve the recipe, list what is missing, build nothing"),
) -> None:
    """Train a policy with Edit-GRPO as the recipe says (default: the CPU quickstart).

    The job announces its phases: the synthetic data, the tiny preset, the SFT warm start (policy.warm_start),
    Edit-GRPO and its held-out evaluations; a phase whose result is cached says so and is skipped. The console
    shows progress and a few numbers; every metric goes to RUN/metrics.jsonl and TensorBoard, third-party
    messages to RUN/libraries.log. The run ends with where everything is and the commands to try next.

    Examples:
      editrl train
      editrl train train.steps=20 run.output_dir=runs/short    (the quickstart, shorter)
      editrl train quickstart --resume
      editrl train quickstart --resume train.steps=300            (a longer run: noted, not refused)
      editrl train viva_grpo --dry-run
    """
    def go() -> None:
        from editrl.base import TrainingError
        from editrl.config import parse_recipe
        from editrl.files import check_flags, refuse_if_in_use

        started = time.perf_counter()
        check_flags(resume, overwrite, accept_changes)
        name, changes = recipe, overrides or []
        if "=" in name and not Path(name).exists():  # `editrl train train.steps=5`: overrides of the default recipe
            name, changes = DEFAULT_RECIPE, [name, *changes]
        rec = parse_recipe(name, changes)
        if not dry_run:  # said before torch and the plugins load (the run's own lock decides, in start_process)
            refuse_if_in_use(rec.output_dir)

        from editrl.harness import resume_point
        from editrl.preflight import check_reward_inputs, checked

        checked(rec, changes, check_paths=not dry_run)  # a dry run lists missing paths below
        check_reward_inputs(rec)
        if dry_run:
            console.print(f"[green]recipe ok[/green]: {rec.run.name} -> {rec.output_dir}")
            console.print(rec.layout.model_dump())
            if resume:
                resume_point(rec, accept_changes)
            from editrl.preflight import preflight

            problems = preflight(rec)
            for problem in problems:
                console.print(f"[red]missing:[/red] {problem}", highlight=False)
            if problems:
                console.print(f"[red]not ready[/red]: {len(problems)} weights/servers the recipe needs are missing here")
                raise typer.Exit(2)
            console.print("[green]ready[/green]: every weight and server the recipe names is here")
            return
        from editrl import job, monitor
        from editrl.base import launch_env
        from editrl.summary import nothing_trained, print_run_summary

        rank = launch_env()[0]
        log = rec.output_dir / (monitor.LIBRARY_LOG if rank == 0 else f"libraries.rank{rank}.log")
        with monitor.library_log(log), monitor.job(job.phases(rec, resume), shown=rank == 0):
            result = job.run(rec, resume=resume, overwrite=overwrite, accept_changes=accept_changes)
        if rank == 0:
            failed = nothing_trained(result)
            if failed:
                raise TrainingError(failed)
            print_run_summary(result, rec, time.perf_counter() - started, monitor.console)

    run_cli(go)


def sweep(
    spec: Path = typer.Argument(..., help="sweep spec YAML (base recipe x variants x seeds)"),
    overrides: Optional[list[str]] = typer.Argument(None, help="section.field=value overrides for every run"),
    parallel: Optional[int] = typer.Option(None, "--parallel", "-j", help="runs at a time (default: the spec's)"),
) -> None:
    """Run a sweep (a base recipe x variants x seeds) resumably, then write its results table and plots.

    Each run is an `editrl train` process in OUTPUT_DIR/VARIANT/seed_K, its console in train.log there; running
    the sweep again skips finished runs and resumes interrupted ones.

    Example:
      editrl sweep recipes/sweeps/reward_ablation.yaml -j 2
    """
    from editrl.sweep import run_sweep

    def go() -> None:
        out = run_sweep(spec, parallel, overrides or [])
        console.print(f"[green]results[/green]: {out / 'results.md'}")
        console.print((out / "results.md").read_text())

    run_cli(go)


def recipes() -> None:
    """List the bundled recipes (a name works wherever a recipe file does)."""
    from editrl.config import bundled_recipes

    table = Table("name", "path", "description")
    for name, path in bundled_recipes().items():
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        table.add_row(name, str(path), first)
    Console().print(table)


def rewards() -> None:
    """List the registered rewards: what each reads, its options, what it scores."""
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
