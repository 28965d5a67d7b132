"""Run outputs people look at: a live progress bar, metrics.jsonl, TensorBoard, sample videos."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from editrl.types import EditSample

console = Console(stderr=True)

HEADLINE = ("reward/weighted/mean", "train/clip_frac", "train/approx_kl", "time/step")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl (one JSON object per optimisation step)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, start_step: int = 0, log_every: int = 1) -> None:
        self.enabled = enabled
        self.run_dir = run_dir
        self.log_every = log_every
        self.metrics_path = run_dir / "metrics.jsonl"
        self._tb: Any = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        # On resume, drop rows past the checkpoint so the file matches an uninterrupted run.
        rows = [r for r in read_metrics(self.metrics_path) if r["step"] <= start_step]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = self.metrics_path.open("a")
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for key, value in metrics.items():
            if math.isfinite(value):
                self._tb.add_scalar(key, value, step)
        if step % self.log_every == 0:
            shown = [k for k in metrics if k in HEADLINE or k.startswith("eval/")]
            console.log(f"step {step}: " + "  ".join(f"{k}={metrics[k]:.4g}" for k in shown))

    @contextmanager
    def progress(self, total: int, start: int) -> Iterator[Callable[[int, dict[str, float]], None]]:
        """A rich progress bar (live reward in the description); yields `update(step, metrics)`."""
        if not self.enabled:
            yield lambda step, metrics: None
            return
        columns = (
            TextColumn("[bold]GRPO"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("", total=total, completed=start)

            def update(step: int, metrics: dict[str, float]) -> None:
                reward = metrics.get("reward/weighted/mean", float("nan"))
                bar.update(task, completed=step, description=f"reward {reward:.4f}")

            yield update

    def save_samples(self, step: int, samples: list[EditSample], edited: torch.Tensor, limit: int = 4) -> None:
        """source | edited side by side (edited alone when there is no source) as mp4s under samples/."""
        if not self.enabled:
            return
        from editrl.data.video import write_video

        out = self.run_dir / "samples" / f"step_{step:06d}"
        for i, (sample, video) in enumerate(zip(samples[:limit], edited[:limit])):
            frames = video
            if sample.source is not None and sample.source.shape == video.shape:
                frames = torch.cat([sample.source, video], dim=-1)
            odd = frames.shape[-1] % 2 or frames.shape[-2] % 2
            write_video(out / f"{i}_{_slug(sample.instruction)}.mp4", frames, lossless=bool(odd))

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def _clean(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _slug(text: str, n: int = 40) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower())[:n].strip("_") or "sample"
