"""What a person watches: the job's phases with live progress bars, periodic lines with the few numbers that matter,
metrics.jsonl, TensorBoard, sample videos, and `libraries.log`, where third-party libraries' chatter goes instead of
the console.

Only rich and the standard library are imported here (the command line loads this module for every command).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from editrl.base import RecipeError, TrainingError

if TYPE_CHECKING:
    import torch

    from editrl.types import EditSample

console = Console(stderr=True, log_path=False)

# ------------------------------------------------------------------ phases of the main job

# Every phase `editrl train` can go through, in the order a run meets them.
PHASES = {
    "preset": "tiny preset",
    "data": "synthetic data",
    "sft": "SFT warm start",
    "grpo": "Edit-GRPO",
    "eval": "held-out evaluation",
}


class _Job:
    def __init__(self, keys: list[str], shown: bool) -> None:
        self.keys, self.shown = keys, shown
        self.seen: set[str] = set()


_job: _Job | None = None


@contextmanager
def job(keys: list[str], shown: bool = True) -> Iterator[None]:
    """The main job: the phases announced inside are numbered "[i/n]" in the order of `keys`, each once.

    `shown=False` (the other ranks of a multi-process run) keeps the job's headers off that process's console.
    """
    global _job
    previous, _job = _job, _Job(keys, shown)
    try:
        yield
    finally:
        _job = previous


def _title(key: str) -> str:
    title = PHASES[key]
    if _job is not None and key in _job.keys:
        title = f"[{_job.keys.index(key) + 1}/{len(_job.keys)}] {title}"
    return escape(title)


def announce(key: str, detail: str) -> None:
    """A phase's header line; inside a job only the first announcement of a phase prints."""
    if _job is not None:
        if key in _job.seen or not _job.shown:
            return
        _job.seen.add(key)
    console.print(f"[bold cyan]{_title(key)}[/]: {escape(detail)}", highlight=False)


def skipped(key: str, detail: str) -> None:
    """One line for a phase of the job whose result is already there (outside a job nobody asked for the phase)."""
    if _job is None or key not in _job.keys or key in _job.seen or not _job.shown:
        return
    _job.seen.add(key)
    console.print(f"[bold cyan]{_title(key)}[/]: [dim]skipped,[/] {escape(detail)}", highlight=False)


class Bar:
    """One row of a live progress display (label, bar, count, live numbers, elapsed time, ETA)."""

    def __init__(self, progress: Progress, label: str, total: int | None, completed: int = 0) -> None:
        self.progress = progress
        self.task = progress.add_task(label, total=total, completed=completed, note="")

    def update(self, completed: int | None = None, note: str | None = None, advance: int | None = None) -> None:
        fields: dict[str, Any] = {} if note is None else {"note": note}
        self.progress.update(self.task, completed=completed, advance=advance, **fields)

    def add(self, label: str, total: int | None, completed: int = 0) -> Bar:
        """Another row in the same display, for a phase that runs interleaved with this one."""
        return Bar(self.progress, label, total, completed)


@contextmanager
def progress(label: str, total: int | None, completed: int = 0, enabled: bool = True) -> Iterator[Bar]:
    """A live progress bar on the console (lines printed meanwhile scroll above it); `enabled=False` shows nothing."""
    columns = (
        TextColumn("  [bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not enabled) as bar:
        yield Bar(bar, label, total, completed)


def duration(seconds: float) -> str:
    """`1h 02m`, `8m 52s` or `41s`."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


# ------------------------------------------------------------------ third-party output

LIBRARY_LOG = "libraries.log"
# The libraries editrl drives whose notices are meant for their own developers: bitsandbytes (imported by peft)
# reports an optional CPU kernel it cannot load, DeepSpeed (imported by accelerate inside transformers'
# save_pretrained when it is installed) reports the accelerator it picked, transformers logs a load report.
LIBRARIES = ("transformers", "diffusers", "huggingface_hub", "peft", "bitsandbytes", "kernels", "accelerate", "DeepSpeed")
# Those that speak when they are imported, wherever that happens (a plugin imported while a recipe is read, before any
# run's log is open): bitsandbytes (imported by peft, pyiqa, diffusers) and `kernels`, failing to fetch a CPU kernel.
IMPORT_TIME_LIBRARIES = ("bitsandbytes", "kernels")


class _LibrarySink(logging.Handler):
    """Third-party records inside `quiet_libraries`: into the open libraries.log; errors also on the console."""

    def __init__(self) -> None:
        super().__init__()
        self.file: logging.Handler | None = None
        self.depth = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.handle(record)
        if record.levelno >= logging.ERROR:
            console.print(f"{record.name}: {record.getMessage()}", style="red", markup=False, highlight=False)


class _ToSink(logging.Filter):
    """On a library's logger: its own records go to the sink only, whatever handler it adds meanwhile (DeepSpeed
    adds a console handler when it is imported, then warns through it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        _SINK.handle(record)
        return False


_SINK, _TO_SINK = _LibrarySink(), _ToSink()


def quiet_imports() -> None:
    """From now on in this process, IMPORT_TIME_LIBRARIES log only to libraries.log (while one is open; their errors
    still reach the console). The command line calls it first, before anything imports them."""
    for name in IMPORT_TIME_LIBRARIES:
        log = logging.getLogger(name)
        log.handlers, log.propagate = [_SINK], False


@contextmanager
def library_log(path: Path) -> Iterator[Path]:
    """While open, what `quiet_libraries` keeps off the console is appended to `path` (else it is dropped).

    It is the first file a run writes, so an output folder that cannot be written is refused here, before any work."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"run.output_dir: cannot write to {path.parent} ({e.strerror}): choose a writable folder") from None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous, _SINK.file = _SINK.file, handler
    try:
        yield path
    finally:
        _SINK.file = previous
        handler.close()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside, the logging of LIBRARIES and transformers'/diffusers' progress bars go to libraries.log, not the console.

    Used where editrl builds, loads and saves models. Only those loggers are rerouted and only here: editrl's own
    warnings, Python warnings and every library error still reach the console; download bars stay.
    """
    if _SINK.depth:
        yield
        return
    import diffusers.utils.logging as diffusers_logging  # importing them sets up their loggers now, not midway
    import huggingface_hub.utils as hub
    import transformers.utils.logging as transformers_logging

    bar_switches = [m for m in (transformers_logging, diffusers_logging) if m.is_progress_bar_enabled()]
    downloads = not hub.are_progress_bars_disabled()
    saved = []
    for name in LIBRARIES:
        log = logging.getLogger(name)
        saved.append((log, log.handlers[:], log.propagate))
        log.handlers, log.propagate = [_SINK], False
        log.addFilter(_TO_SINK)
    for m in bar_switches:
        m.disable_progress_bar()
    if downloads:
        hub.enable_progress_bars()  # transformers' switch turns the hub's off too
    _SINK.depth += 1
    try:
        yield
    finally:
        _SINK.depth -= 1
        for m in bar_switches:
            m.enable_progress_bar()
        if not downloads:
            hub.disable_progress_bars()
        for log, handlers, propagate in saved:
            log.removeFilter(_TO_SINK)
            log.handlers = handlers + [h for h in log.handlers if h is not _SINK and h not in handlers]
            log.propagate = propagate


# ------------------------------------------------------------------ run outputs


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (one JSON object per optimisation step)."""
    return metric_rows(path)[0]


def metric_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows of a metrics.jsonl, whether its last line was a partial row and was left out).

    A crash while a row is written leaves the last line cut short: that row is dropped (its step is re-run on
    resume). Any other line that is not a row with a step is damage, a TrainingError naming the line."""
    if not path.is_file():
        return [], False
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path} cannot be read ({e}): move it away to start its metrics afresh") from None
    rows, partial = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError as e:
            if number == len(lines):  # no newline after it: cut short while it was written
                partial = True
                continue
            raise TrainingError(f"{path}:{number}: damaged metrics row ({e}): delete that line, or move the file away") from None
        rows.append(row)
    return rows, partial


# The numbers an Edit-GRPO run's periodic lines show: {metric: format}.
GRPO_HEADLINE = {"reward/weighted/mean": "reward {:.3f}", "eval/total": "held-out total {:.3f}", "time/step": "{:.2f} s/step"}


WANDB_ID = "wandb-run-id"  # in the run directory: a resumed run continues its W&B run


class RunLogger:
    """metrics.jsonl and the recipe's other `loggers` (TensorBoard, Weights & Biases) get every metric; the console gets
    one line per `log_every` steps (and per evaluation) naming the phase and showing only the `headline` metrics.

    `recipe` (the resolved recipe as plain data) names the loggers (`run.loggers`, `run.wandb`) and is W&B's config."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        start_step: int = 0,
        log_every: int = 1,
        label: str = "Edit-GRPO",
        total: int | None = None,
        headline: dict[str, str] | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.log_every = log_every
        self.label, self.total = label, total
        self.headline = GRPO_HEADLINE if headline is None else headline
        self.metrics_path = run_dir / "metrics.jsonl"
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # On resume, drop rows past the checkpoint so the file matches an uninterrupted run.
        rows, partial = metric_rows(self.metrics_path)
        if partial:
            console.print(f"[yellow]note[/]: {escape(str(self.metrics_path))} ended in a row cut short (the run stopped "
                          "while writing it): dropped it", highlight=False)
        rows = [r for r in rows if r["step"] <= start_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = self.metrics_path.open("a")
        run = (recipe or {}).get("run", {})
        loggers = run.get("loggers", ["tensorboard"])
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if "wandb" in loggers:
            self._wandb = _start_wandb(run_dir, run.get("wandb", {}), recipe or {}, resume=start_step > 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            # Every key metrics.jsonl has; a resumed run re-logs the steps past its checkpoint with the same values,
            # which W&B keeps once.
            self._wandb.log(dict(metrics), step=step)
        if step % self.log_every == 0 or any(k.startswith("eval/") for k in metrics):
            console.print(self.line(step, metrics), highlight=False)

    def line(self, step: int, metrics: dict[str, float]) -> str:
        """`Edit-GRPO step 50/100  reward 25.310  held-out total 24.512  2.13 s/step`."""
        of = f"/{self.total}" if self.total is not None else ""
        shown = [fmt.format(metrics[k]) for k, fmt in self.headline.items() if k in metrics]
        return f"  {self.label} step {step}{of}  " + "  ".join(shown)

    def save_samples(self, step: int, samples: list[EditSample], edited: torch.Tensor, limit: int = 4) -> None:
        """source | edited side by side (edited alone without a source) under samples/: mp4s, or PNGs for images."""
        if not self.enabled:
            return
        import torch

        from editrl.data.video import write_media

        out = self.run_dir / "samples" / f"step_{step:06d}"
        for i, (sample, video) in enumerate(zip(samples[:limit], edited[:limit])):
            frames = video
            if sample.source is not None and sample.source.shape == video.shape:
                frames = torch.cat([sample.source, video], dim=-1)
            write_media(out / f"{i}_{_slug(sample.instruction)}", frames)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                import wandb

                self._wandb.finish()
                wandb.teardown()  # waits until W&B's service has written (or uploaded) all of the run


def _start_wandb(run_dir: Path, options: dict[str, Any], recipe: dict[str, Any], resume: bool) -> Any:
    """A W&B run (under RUN/wandb) with the recipe as its config; on resume, the run this directory started. Its own
    console output is off: the run's console stays editrl's."""
    import wandb

    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(
        project=options.get("project"), entity=options.get("entity"), group=options.get("group"),
        mode=options.get("mode", "online"), name=recipe.get("run", {}).get("name"), id=run_id, resume="allow",
        config=recipe, dir=str(run_dir), settings=wandb.Settings(silent=True, console="off"),
    )


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _slug(text: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:n].strip("_") or "sample"
