"""The reward-hacking sentinel (`train.sentinel`): a policy can learn to please its rewards without editing better,
and the held-out evaluation shows it in metrics the training reward does not contain (`eval/oracle/*`).

At every held-out evaluation the sentinel compares the training reward's trend since the previous evaluation (the
least-squares slope of its per-step values, the last value before the interval included, so that one noisy step does
not decide) with the change of each watched held-out metric since the previous evaluation. An evaluation where the
reward rose while a metric fell extends that metric's streak, any other resets it; a streak of `patience` raises the
alarm and, with `stop`, ends the run. Independently it keeps `checkpoints/best`, the weights that scored highest on
the `best` held-out metric. Every metric counts higher as better. Its state is plain numbers that every checkpoint
saves, so `--resume` continues it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editrl.base import TrainingError
from editrl.checkpoint import checkpoint_root, write_checkpoint
from editrl.config import Recipe, SentinelConfig

BEST = "best"


@dataclass
class Verdict:
    """What one held-out evaluation made the sentinel decide."""

    metrics: dict[str, float]  # sentinel/* for metrics.jsonl
    alarms: list[str] = field(default_factory=list)  # one line per metric whose streak reached `patience`
    new_best: bool = False
    stop: bool = False


def trend(values: list[float]) -> float:
    """The least-squares slope of `values` against their index; NaN for fewer than two."""
    n = len(values)
    if n < 2:
        return math.nan
    mx, my = (n - 1) / 2, sum(values) / n
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


class Sentinel:
    """Fed every training step's metrics (`record`) and every held-out evaluation (`observe`)."""

    def __init__(self, cfg: SentinelConfig, state: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        # rewards: the training reward since the previous evaluation; last: each metric then; best: {step, value}
        self.state: dict[str, Any] = state or {"rewards": [], "last": {}, "streak": {}, "best": None}

    def record(self, metrics: dict[str, float]) -> None:
        value = metrics.get(self.cfg.reward)
        if value is not None and math.isfinite(value):
            self.state["rewards"].append(float(value))

    def watched(self, held_out: dict[str, float]) -> list[str]:
        """The metrics to watch (without `eval/`); a named one the evaluation lacks is an error."""
        cfg = self.cfg
        names = cfg.watch if cfg.watch is not None else [k[5:] for k in held_out if k.startswith("eval/oracle/")]
        missing = [n for n in [*names, *([cfg.best] if cfg.best else [])] if f"eval/{n}" not in held_out]
        if missing or not names:
            have = ", ".join(k[5:] for k in held_out if k.startswith("eval/"))
            what = f"{missing[0]!r} is not a held-out metric" if missing else "the held-out split has no oracle/* metrics"
            raise TrainingError(f"train.sentinel: {what}; name some of these in train.sentinel.watch / best: {have}")
        return names

    def observe(self, step: int, held_out: dict[str, float]) -> Verdict:
        s, cfg = self.state, self.cfg
        rose = trend(s["rewards"]) > 0
        verdict = Verdict({})
        for name in self.watched(held_out):
            now, before = held_out[f"eval/{name}"], s["last"].get(name)
            streak = s["streak"].get(name, 0) + 1 if rose and before is not None and now < before else 0
            s["streak"][name] = streak
            verdict.metrics[f"sentinel/streak/{name}"] = float(streak)
            if streak >= cfg.patience:
                verdict.alarms.append(
                    f"reward-hacking alarm at step {step}: the training reward ({cfg.reward}) rose while held-out {name} "
                    f"fell for {streak} evaluation{'s' * (streak > 1)} in a row ({before:.4f} -> {now:.4f})"
                )
            if math.isfinite(now):
                s["last"][name] = now
        s["rewards"] = s["rewards"][-1:]
        verdict.metrics["sentinel/alarm"] = float(bool(verdict.alarms))
        if cfg.best:
            value = held_out[f"eval/{cfg.best}"]
            if math.isfinite(value) and (s["best"] is None or value > s["best"]["value"]):
                s["best"] = {"step": step, "value": value}
                verdict.new_best = True
        verdict.stop = cfg.stop and bool(verdict.alarms)
        return verdict


def save_best(run_dir: Path, step: int, recipe: Recipe, policy: Any, info: dict[str, Any]) -> Path:
    """`checkpoints/best`: the policy's trainable weights, the recipe and `state.json` (step, metric, value); loadable
    wherever a checkpoint is (`editrl eval/edit --checkpoint RUN/checkpoints/best`), not resumable (no `state.pt`)."""
    return write_checkpoint(checkpoint_root(run_dir) / BEST, step, recipe, policy, info)
