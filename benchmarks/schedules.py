"""Time-to-target: editrl's fast schedule against a Flow-GRPO-default schedule, same engine, same seeds.

fast:    SDE inside a window of a few steps, a subset of them trained, one encode per group, rewards
         scored while the next chunk samples (Flow-GRPO-Fast / MixGRPO levers).
default: SDE on every step, every step trained, encode per sample, rewards scored after sampling.

Both train the same recipe; the default schedule for `--steps`, the fast one for up to `--fast-steps` (its
steps are cheaper, so it gets more of them); the held-out reward (eval split, ODE sampling) is measured
every `--eval-every` steps. The target is the held-out reward the default schedule reaches at
its end; the report is each schedule's training wall time (evaluation excluded) to first reach it. A default run that
ends no better than it started sets no target, and the report says so rather than print a ratio.

    .venv/bin/python benchmarks/schedules.py [--recipe quickstart] [--steps 30] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from editrl.preflight import load_recipe
from editrl.monitor import read_metrics
from editrl.trainer import train

SCHEDULES = {
    "fast": ["sampling.window.size=2", "sampling.window.position=random", "grpo.trained_steps=1",
             "grpo.share_encode=true", "grpo.async_rewards=true"],
    "default": ["sampling.window.size=null", "grpo.trained_steps=null", "grpo.share_encode=false",
                "grpo.async_rewards=false"],
}


def curve(run_dir: Path, metric: str) -> list[tuple[float, float]]:
    """(cumulative training seconds, held-out value) at each evaluation, step 0 included."""
    out, elapsed = [], 0.0
    for row in read_metrics(run_dir / "metrics.jsonl"):
        elapsed += row.get("time/step") or 0.0
        if row.get(metric) is not None:
            out.append((elapsed, row[metric]))
    return out


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((t for t, v in points if v >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fast-steps", type=int, default=None, help="default: 3x --steps")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--metric", default=None,
                        help="held-out metric (default: eval/total, the recipe's weighted reward, else the first eval/*)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    table = Table("seed", "schedule", "target", "train s to target", "train s total", "held-out start -> end")
    ratios: list[float] = []
    unimproved: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            curves = {}
            for name, sched in SCHEDULES.items():
                steps = args.steps if name == "default" else args.fast_steps or 3 * args.steps
                recipe = load_recipe(args.recipe, [*args.overrides, *sched, f"run.seed={seed}", f"train.steps={steps}",
                                                   f"train.eval_every={args.eval_every}", f"train.save_every={steps}",
                                                   f"run.output_dir={tmp}/{name}-{seed}", "train.progress=false"])
                run = train(recipe, overwrite=True)
                rows = read_metrics(run / "metrics.jsonl")
                metric = args.metric or ("eval/total" if "eval/total" in rows[0] else next(k for k in rows[0] if k.startswith("eval/")))
                curves[name] = curve(run, metric)
            start, target = curves["default"][0][1], curves["default"][-1][1]
            times = {n: time_to(c, target) for n, c in curves.items()}
            for name, c in curves.items():
                t = times[name]
                table.add_row(str(seed), name, f"{target:.4f}", "not reached" if t is None else f"{t:.1f}",
                              f"{c[-1][0]:.1f}", f"{c[0][1]:.4f} -> {c[-1][1]:.4f}")
            if target <= start:  # the default schedule made nothing better: there is no target to race to
                unimproved.append(seed)
            elif times["fast"] and times["default"]:
                ratios.append(times["default"] / times["fast"])
    console = Console(width=140)
    console.print(table)
    if unimproved:
        console.print(f"seeds {unimproved}: the default schedule ended no better than it started, so no time-to-target")
    if ratios:
        console.print(f"time-to-target speed-up of fast over default: {', '.join(f'{r:.2f}x' for r in ratios)}")
    elif len(unimproved) < len(args.seeds):
        console.print("the fast schedule did not reach the default schedule's final held-out reward")


if __name__ == "__main__":
    main()
