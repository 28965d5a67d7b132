"""`editrl data synth | check` and `editrl eval`.

Only typer is imported at module level (this module is loaded for every `editrl` command).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import typer

OnError = Literal["skip", "fail"]
data_app = typer.Typer(no_args_is_help=True, help="Paired edit data: synthesise it, check a folder of your own.")


def _split_ops(ops: list[str] | None) -> list[str] | None:
    """`--ops add,remove` and `--ops add --ops remove` both work."""
    if not ops:
        return None
    return [o.strip() for item in ops for o in item.split(",") if o.strip()]


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="folder to write (videos/ or images/, masks/, manifest.jsonl)"),
    n: int = typer.Option(..., "--n", min=1, help="number of samples (ops are taken in turn)"),
    seed: int = typer.Option(0, "--seed", help="the same seed gives byte-identical data"),
    ops: Optional[list[str]] = typer.Option(None, "--ops", help="operations, comma-separated (default: all)"),
    frames: int = typer.Option(9, "--frames", help="frames per video, 4k+1 (1: image pairs, written as PNG)"),
    size: tuple[int, int] = typer.Option((64, 64), "--size", help="height and width"),
    split: str = typer.Option("train", "--split", help="a name that seeds its own stream (train, test, ...)"),
    generator: str = typer.Option("procedural", "--generator", help="a registered pair generator"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="processes (default: automatic)"),
) -> None:
    """Synthesise paired edit data: source and target videos, instructions, masks, reference images.

    Example:
      editrl data synth --out data/synth --n 1000 --seed 0
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        from editrl.data.synth import synthesize
        from editrl.files import check_output

        check_output(out, [], "--out", folder=True)
        path = synthesize(out, n, seed, _split_ops(ops), frames, size, split, generator, workers)
        console.print(f"[green]wrote[/green] {n} samples to {path}")

    run_cli(go)


ALLOW_OUTSIDE = typer.Option(
    False, "--allow-outside", help="accept media paths outside the data folder (only for a manifest you trust)"
)


@data_app.command("check")
def check(
    data: Path = typer.Argument(..., help="a data folder, or its manifest.jsonl"),
    on_error: OnError = typer.Option("skip", "--on-error", help="skip: list every bad row; fail: stop at the first"),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Check a manifest: every row's keys, instruction and media files (every frame decoded), and that the clips
    can share a batch; problems are reported with line numbers and exit code 1.

    Example:
      editrl data check data/my_edits
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        import logging

        from editrl.base import DataError
        from editrl.data.manifest import batch_problem, load_manifest, manifest_path

        problems: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                problems.append(record.getMessage().removeprefix("skipping row: "))

        handler = Collect()
        log = logging.getLogger("editrl.data.manifest")
        log.addHandler(handler)
        try:
            entries = load_manifest(data, on_error=on_error, decode=True, allow_outside=allow_outside)
        finally:  # also before a "no usable rows" error: the list says what is wrong with each
            log.removeHandler(handler)
            for p in problems:
                console.print(f"[red]bad row:[/red] {p}", highlight=False)
        mixed = batch_problem(entries)
        if mixed and on_error == "fail":
            raise DataError(f"{manifest_path(data)}: {mixed}")
        if mixed:
            console.print(f"[red]mixed sizes:[/red] {mixed}", highlight=False)
        cats: dict[str, int] = {}
        for e in entries:
            cats[e.row.category or "uncategorised"] = cats.get(e.row.category or "uncategorised", 0) + 1
        summary = ", ".join(f"{k}: {v}" for k, v in sorted(cats.items()))
        console.print(f"[green]{len(entries)} usable rows[/green] in {manifest_path(data)} ({summary})", highlight=False)
        if problems or mixed:
            raise typer.Exit(1)

    run_cli(go)


def evaluate_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="a checkpoint directory, or a run directory (its latest)"),
    data: Path = typer.Option(..., "--data", help="a data folder (manifest.jsonl) with targets and masks"),
    out: Optional[Path] = typer.Option(None, "--out", help="where to write the tables and grid.png (default: CHECKPOINT/eval)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="ODE steps (default: the recipe's eval steps)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="noise seed (default: the run's run.seed)"),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", min=1, help="clips per batch (default: the run's micro-batch; with the run's seed too, the "
        "edits of its held-out evaluations)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="evaluate only the first N samples"),
    rewards: bool = typer.Option(True, "--rewards/--no-rewards", help="also score with the recipe's rewards"),
    on_error: OnError = typer.Option("fail", "--on-error", help="bad manifest rows: fail, or skip them"),
    device: str = typer.Option("cpu", "--device"),
    allow_outside: bool = ALLOW_OUTSIDE,
) -> None:
    """Benchmark a checkpoint on held-out data: oracle fidelity/preservation/temporal per category, beside what
    returning the source scores (copy) and what the policy's VAE makes of the target (ceiling).

    Writes results.md, results.csv, samples.csv and a frame grid (grid.png) to --out. The end of `editrl train`
    prints this command for the run's held-out split.

    Example:
      editrl eval --checkpoint runs/quickstart/grpo --data data/synth_test
    """
    from editrl.commands import console, run_cli

    def go() -> None:
        from editrl.data.manifest import manifest_inputs
        from editrl.evaluate import EVAL_FILES, checkpoint_editor, recipe_rewards
        from editrl.files import check_output
        from editrl.preflight import check_device

        check_device(device, "--device")
        folder = out or checkpoint / "eval"
        check_output(folder, manifest_inputs(data), "--out", folder=True, writes=EVAL_FILES)
        edit_fn, recipe, policy, batch = checkpoint_editor(checkpoint, steps, seed, device, batch_size)
        run_benchmark(edit_fn, data, folder, recipe_rewards(recipe) if rewards else None,
                      batch, limit, on_error, console, policy, allow_outside)

    run_cli(go)


def run_benchmark(edit_fn: Any, data: Path, out: Path, rewards: Any, batch_size: int, limit: int | None,
                  on_error: OnError, console: Any, policy: Any = None, allow_outside: bool = False) -> None:
    """Everything `editrl eval` does after the policy is loaded (tests drive it with trivial editors)."""
    from editrl.data.manifest import ManifestDataset
    from editrl.evaluate import evaluate, yardsticks

    dataset = ManifestDataset(ManifestDataset.Options(path=str(data), on_error=on_error, allow_outside=allow_outside))
    marks = yardsticks(dataset, policy, batch_size, limit)
    report = evaluate(edit_fn, dataset, rewards=rewards, batch_size=batch_size, limit=limit, out_dir=out, yardsticks=marks)
    console.print(report.to_markdown(), highlight=False, markup=False)
    console.print(f"[green]wrote[/green] {out}/results.md, results.csv, samples.csv, grid.png")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.command("eval")(evaluate_command)
