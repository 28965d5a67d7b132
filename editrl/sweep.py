"""Sweeps: a base recipe x variants (a list or a grid of overrides) x seeds, run resumably, then tabulated.

A sweep spec (YAML):

    name: reward_ablation
    base: quickstart                 # recipe path (relative to this file) or bundled name
    output_dir: runs/sweeps/reward_ablation
    seeds: [0, 1, 2]
    parallel: 1                      # runs at a time (each a separate `editrl train` process)
    overrides: [train.steps=40]      # applied to every run
    variants:                        # named override lists ...
      full: []
      no_fidelity: [rewards.terms.0.weight=0]
    grid:                            # ... and/or a grid, one variant per combination
      grpo.beta: [0.0, 0.01]
    metrics: [eval/oracle_fidelity]  # what the table reports (default: every eval/* and reward/weighted/mean)
    curves: [reward/fidelity/mean]   # per-step metrics plotted in reward_curves.png (default: reward/weighted/mean)

Each run lives in `<output_dir>/<variant>/seed_<k>/`; a finished run has `done.json` and is never re-run,
an interrupted one resumes from its checkpoint. The results are `results.md`, `results.csv`,
`reward_curves.png` and `final_metrics.png` in the sweep's output directory.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from editrl.base import RecipeError, StrictModel
from editrl.config import resolve_recipe_path, validate_model
from editrl.preflight import load_recipe
from editrl.monitor import console, read_metrics

# Two-sided 95% Student-t critical values by degrees of freedom (small seed counts are the norm).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       15: 2.131, 20: 2.086, 30: 2.042}


class SweepSpec(StrictModel):
    name: str
    base: str
    output_dir: str | None = None
    seeds: list[int] = Field(default_factory=lambda: [0])
    parallel: int = Field(1, ge=1)
    overrides: list[str] = Field(default_factory=list)
    variants: dict[str, list[str]] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    metrics: list[str] | None = None
    curves: list[str] = Field(default_factory=lambda: ["reward/weighted/mean"], min_length=1)
    smooth: int = Field(10, ge=1)  # moving-average window (steps) of the curves: batches differ more than steps do

    @model_validator(mode="after")
    def _has_runs(self) -> "SweepSpec":
        if not self.variants and not self.grid:
            self.variants = {"base": []}
        return self


@dataclass
class Run:
    variant: str
    seed: int
    overrides: list[str]
    run_dir: Path

    @property
    def done(self) -> bool:
        return (self.run_dir / "done.json").is_file()


def load_spec(path: str | Path, overrides: list[str] = ()) -> tuple[SweepSpec, Path]:
    """The spec, and its base recipe resolved relative to the spec file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"sweep spec {path} not found")
    spec = validate_model(SweepSpec, yaml.safe_load(path.read_text()) or {})
    spec.overrides = [*spec.overrides, *overrides]
    local = path.parent / spec.base
    base = local if local.is_file() else resolve_recipe_path(spec.base)
    return spec, base


def expand(spec: SweepSpec, base: Path) -> list[Run]:
    """Every (variant, seed) run, each recipe validated now so a typo fails before the first run starts."""
    variants = dict(spec.variants)
    keys = list(spec.grid)
    for combo in itertools.product(*(spec.grid[k] for k in keys)) if keys else ():
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo))
        variants[label] = [f"{k}={json.dumps(v)}" for k, v in zip(keys, combo)]
    out = Path(spec.output_dir or f"runs/sweeps/{spec.name}")
    runs = []
    for name, extra in variants.items():
        for seed in spec.seeds:
            run_dir = out / name / f"seed_{seed}"
            # Runs of one sweep share a W&B group (when the recipe logs there), unless the spec names another.
            overrides = [f"run.wandb.group={spec.name}", *spec.overrides, *extra, f"run.seed={seed}",
                         f"run.name={spec.name}-{name}-{seed}", f"run.output_dir={run_dir}"]
            try:
                load_recipe(base, overrides)
            except RecipeError as e:
                raise RecipeError(f"sweep variant {name!r}: {e}") from None
            runs.append(Run(name, seed, overrides, run_dir))
    return runs


def run_one(run: Run, base: Path) -> tuple[Run, int]:
    """One `editrl train` process (resuming where a checkpoint exists); output goes to the run's train.log."""
    if run.done:
        return run, 0
    run.run_dir.mkdir(parents=True, exist_ok=True)
    resume = any((run.run_dir / "checkpoints").glob("step_*"))
    cmd = [sys.executable, "-m", "editrl", "train", str(base), *run.overrides,
           "--resume" if resume else "--overwrite"]
    with (run.run_dir / "train.log").open("a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if code == 0:
        (run.run_dir / "done.json").write_text(json.dumps({"finished": time.time()}))
    return run, code


def run_sweep(spec_path: str | Path, parallel: int | None = None, overrides: list[str] = ()) -> Path:
    spec, base = load_spec(spec_path, list(overrides))
    runs = expand(spec, base)
    out = Path(spec.output_dir or f"runs/sweeps/{spec.name}")
    todo = [r for r in runs if not r.done]
    console.log(f"sweep {spec.name}: {len(runs)} runs, {len(runs) - len(todo)} already finished")
    failed = []
    with ThreadPoolExecutor(max_workers=parallel or spec.parallel) as pool:
        for run, code in pool.map(lambda r: run_one(r, base), todo):
            status = "[green]done[/green]" if code == 0 else f"[red]failed ({code})[/red]"
            console.log(f"{run.variant} seed {run.seed}: {status}  ({run.run_dir / 'train.log'})")
            if code:
                failed.append(run)
    write_results(runs, out, spec)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed; see their train.log; re-run the sweep to retry them")
    return out


# ---------------------------------------------------------------- results


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    dof = n - 1
    t = T95.get(dof) or T95[max(k for k in T95 if k <= dof)]
    return mean, t * sd / math.sqrt(n)


def final_metrics(log: list[dict[str, Any]]) -> dict[str, float]:
    """The last logged value of every metric of a run (eval metrics come from the last row that has them)."""
    out: dict[str, float] = {}
    for row in log:
        out.update({k: v for k, v in row.items() if isinstance(v, (int, float)) and v is not None})
    return out


def first_eval(log: list[dict[str, Any]]) -> dict[str, float]:
    """The eval metrics of a run's first evaluation (step 0: the starting checkpoint), {} if it has none."""
    for row in log:
        evals = {k: v for k, v in row.items() if k.startswith("eval/") and isinstance(v, (int, float))}
        if evals:
            return evals
    return {}


def write_results(runs: list[Run], out: Path, spec: SweepSpec) -> None:
    finished = [r for r in runs if r.done]
    if not finished:
        return
    variants = list(dict.fromkeys(r.variant for r in runs))
    logs = {v: [read_metrics(r.run_dir / "metrics.jsonl") for r in finished if r.variant == v] for v in variants}
    finals = {v: [final_metrics(log) for log in logs[v]] for v in variants}
    firsts = {v: [first_eval(log) for log in logs[v]] for v in variants}
    metrics = spec.metrics
    if metrics is None:
        keys = sorted({k for fs in finals.values() for f in fs for k in f if k.startswith("eval/")})
        metrics = keys + ["reward/weighted/mean"]
    rows = []
    for v in variants:
        row: dict[str, Any] = {"variant": v, "seeds": len(finals[v])}
        for m in metrics:
            values = [f[m] for f in finals[v] if m in f]
            row[m] = mean_ci(values) if values else None
            # Per run, the final value minus its own step-0 evaluation: what training changed.
            deltas = [f[m] - first[m] for f, first in zip(finals[v], firsts[v]) if m in f and m in first]
            row[f"{m} change"] = mean_ci(deltas) if deltas else None
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        columns = [*metrics, *(f"{m} change" for m in metrics)]
        w.writerow(["variant", "seeds", *[c for m in columns for c in (f"{m} mean", f"{m} ci95")]])
        for row in rows:
            w.writerow([row["variant"], row["seeds"],
                        *[x for m in columns for x in (row[m] if row[m] else ("", ""))]])
    text = ""
    for suffix, title in (("", "final value"), (" change", "change from the run's first evaluation (step 0)")):
        lines = [f"**{title}**", "", "| variant | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for row in rows:
            cells = [_cell(row[m + suffix], signed=bool(suffix)) for m in metrics]
            lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + " |")
        text += "\n".join(lines) + "\n\n"
    (out / "results.md").write_text(text + "mean ± 95% CI over seeds (Student t).\n")
    _plot(logs, rows, metrics, out, spec)


def _cell(value: tuple[float, float] | None, signed: bool) -> str:
    return "–" if value is None else f"{value[0]:{'+' if signed else ''}.4f} ± {value[1]:.4f}"


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _plot(logs: dict[str, list[list[dict[str, Any]]]], rows: list[dict[str, Any]], metrics: list[str], out: Path,
          spec: SweepSpec) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(spec.curves), figsize=(5.5 * len(spec.curves), 4), squeeze=False)
    for ax, key in zip(axes[0], spec.curves):
        for v, runs in logs.items():
            curves = [moving_average([r[key] for r in log if r.get(key) is not None], spec.smooth) for log in runs]
            curves = [c for c in curves if c]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            lo = [min(c[i] for c in curves) for i in range(n)]
            hi = [max(c[i] for c in curves) for i in range(n)]
            steps = list(range(1, n + 1))
            ax.plot(steps, mean, label=v)
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.set_xlabel("step")
        ax.set_title(f"{key} ({spec.smooth}-step mean)", fontsize=9)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("training reward: mean over seeds, band min-max")
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=120)
    plt.close(fig)

    # Top: the final held-out values (points: bars from zero would hide differences of a few percent).
    # Bottom: what training changed, each run against its own step-0 evaluation.
    shown = [m for m in metrics if any(row[m] for row in rows)]
    cols = max(1, len(shown))
    fig, axes = plt.subplots(2, cols, figsize=(2.8 * cols, 6), squeeze=False)
    x = list(range(len(rows)))
    colors = [f"C{i}" for i in x]
    labels = [row["variant"] for row in rows]
    for j, m in enumerate(shown):
        for i, row in enumerate(rows):
            if row[m]:
                axes[0][j].errorbar(i, row[m][0], yerr=row[m][1], fmt="o", color=colors[i], capsize=3)
        axes[0][j].set_title(m, fontsize=8)
        change = [row[f"{m} change"] or (0.0, 0.0) for row in rows]
        axes[1][j].bar(x, [c[0] for c in change], yerr=[c[1] for c in change], capsize=3, color=colors)
        axes[1][j].axhline(0, color="black", linewidth=0.8)
        axes[1][j].set_title("change from step 0", fontsize=8)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "final_metrics.png", dpi=120)
    plt.close(fig)
