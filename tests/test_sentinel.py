"""The reward-hacking sentinel: constructed histories that must and must not raise the alarm, the best checkpoint
following its metric, stopping, and its state surviving --resume (on the toy trainer with scripted evaluations)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from editrl.base import RecipeError, TrainingError
from editrl.checkpoint import load_checkpoint
from editrl.config import SentinelConfig
from editrl.monitor import read_metrics
from editrl.preflight import load_recipe
from editrl.sentinel import Sentinel, trend
from editrl.trainer import Trainer

METRIC = "oracle/fidelity_ssim"


def test_trend_is_the_least_squares_slope():
    assert trend([1.0, 3.0, 5.0]) == pytest.approx(2.0)
    assert trend([2.0, 0.0, 1.0, -1.0]) == pytest.approx(-0.8)  # sum((i-1.5)(v-0.5)) / sum((i-1.5)^2) = -4 / 5
    assert math.isnan(trend([1.0])) and math.isnan(trend([]))


def run_history(cfg: SentinelConfig, history: list[tuple[list[float], float]]) -> list:
    """Feed (training rewards since the previous evaluation, held-out value) per evaluation; the verdicts."""
    sentinel, verdicts = Sentinel(cfg), []
    for step, (rewards, value) in enumerate(history):
        for r in rewards:
            sentinel.record({"reward/weighted/mean": r, "lr": 1.0})
        verdicts.append(sentinel.observe(step, {f"eval/{METRIC}": value, "eval/oracle/temporal": 0.9, "eval/total": 1.0}))
    return verdicts


def alarms(verdicts) -> list[int]:
    return [i for i, v in enumerate(verdicts) if v.alarms]


def test_the_alarm_needs_patience_evaluations_of_reward_up_and_metric_down():
    cfg = SentinelConfig(patience=2)
    hacking = [([], 0.80), ([1.0, 2.0], 0.78), ([2.5, 3.0], 0.75), ([3.5, 4.0], 0.70)]
    verdicts = run_history(cfg, hacking)
    assert alarms(verdicts) == [2, 3]  # not after one evaluation: after two in a row, and while it goes on
    assert [v.metrics[f"sentinel/streak/{METRIC}"] for v in verdicts] == [0, 1, 2, 3]
    assert [v.metrics["sentinel/alarm"] for v in verdicts] == [0, 0, 1, 1]
    assert "oracle/fidelity_ssim fell for 2 evaluations in a row (0.7800 -> 0.7500)" in verdicts[2].alarms[0]
    assert not any(v.stop for v in verdicts)  # stop is off by default
    assert alarms(run_history(SentinelConfig(patience=3), hacking)) == [3]


@pytest.mark.parametrize(
    "history",
    [
        [([], 0.80), ([1.0, 2.0], 0.82), ([2.5, 3.0], 0.85), ([3.5, 4.0], 0.90)],  # both rise: learning
        [([], 0.80), ([4.0, 3.0], 0.78), ([2.5, 2.0], 0.75), ([1.5, 1.0], 0.70)],  # both fall: just getting worse
        [([], 0.80), ([1.0, 2.0], 0.78), ([2.5, 3.0], 0.79), ([3.5, 4.0], 0.75)],  # interrupted: the streak restarts
        [([], 0.80), ([1.0, 2.0], 0.78), ([2.1, 1.0], 0.75), ([3.5, 4.0], 0.70)],  # the reward's trend turned down once
        [([], 0.80), ([1.0, 2.0], 0.78), ([2.5, 3.0], 0.78), ([3.5, 4.0], 0.77)],  # flat is not a fall
    ],
)
def test_no_alarm_without_the_reward_rising_while_the_metric_falls_twice_in_a_row(history):
    assert alarms(run_history(SentinelConfig(patience=2), history)) == []


def test_one_step_intervals_compare_with_the_last_reward_before_them():
    verdicts = run_history(SentinelConfig(patience=2), [([], 0.8), ([1.0], 0.7), ([2.0], 0.6), ([3.0], 0.5)])
    assert alarms(verdicts) == [3]  # the first interval has one value and no trend; then 1 -> 2, 2 -> 3


def test_only_named_metrics_and_by_default_every_oracle_metric_are_watched():
    default = Sentinel(SentinelConfig())
    held_out = {"eval/oracle/a": 1.0, "eval/oracle/b": 1.0, "eval/fidelity": 1.0, "eval/copy/a": 1.0, "eval/total": 1.0}
    assert default.watched(held_out) == ["oracle/a", "oracle/b"]
    assert Sentinel(SentinelConfig(watch=["fidelity"])).watched(held_out) == ["fidelity"]
    with pytest.raises(TrainingError, match="'oracle/c' is not a held-out metric.*oracle/a, oracle/b, fidelity"):
        Sentinel(SentinelConfig(watch=["oracle/c"])).watched(held_out)
    with pytest.raises(TrainingError, match="'nope' is not a held-out metric"):
        Sentinel(SentinelConfig(best="nope")).watched(held_out)
    with pytest.raises(TrainingError, match="no oracle/. metrics"):
        default.watched({"eval/brightness": 1.0})


def test_best_follows_the_chosen_metric_and_stop_follows_the_alarm():
    sentinel = Sentinel(SentinelConfig(best="total", stop=True, patience=1))
    news = []
    for step, (total, ssim) in enumerate([(0.1, 0.9), (0.5, 0.8), (0.3, 0.95), (0.7, 0.7), (math.nan, 0.8), (0.6, 0.6)]):
        sentinel.record({"reward/weighted/mean": float(step)})
        v = sentinel.observe(step, {"eval/total": total, f"eval/{METRIC}": ssim})
        news.append(v.new_best)
        assert v.stop == bool(v.alarms)
    assert news == [True, True, False, True, False, False]
    assert sentinel.state["best"] == {"step": 3, "value": 0.7}


# ------------------------------------------------------------------ in the loop (toy trainer, scripted numbers)


class Scripted(Trainer):
    """The toy trainer with a rising training reward and a scripted held-out metric per step."""

    held_out: dict[int, float] = {}

    def train_step(self):
        out = super().train_step()
        out["reward/weighted/mean"] = float(self.step)
        return out

    def evaluate(self):
        return {f"eval/{METRIC}": self.held_out[self.step], "eval/total": 0.0}


def recipe(toy_overrides, *extra):
    base = ["data.eval={kind: prompts, options: {prompts: [a red ball]}}", "train.eval_every=1", "train.save_every=1",
            "train.keep_checkpoints=10", "train.log_every=100"]
    return load_recipe("toy", toy_overrides + base + list(extra))


def test_best_checkpoint_holds_the_weights_of_the_best_evaluation(toy_overrides, monkeypatch):
    monkeypatch.setattr(Scripted, "held_out", {0: 0.5, 1: 0.6, 2: 0.4, 3: 0.9, 4: 0.8})
    run = Scripted(recipe(toy_overrides, "train.steps=4", f"train.sentinel.best={METRIC}", "train.sentinel.patience=9")).fit().run_dir
    best = run / "checkpoints" / "best"
    assert json.loads((best / "state.json").read_text()) == {"step": 3, "metric": METRIC, "value": 0.9}
    weights = sorted(p.name for p in best.glob("*.safetensors"))
    assert weights
    for name in weights:
        ours, step3, step4 = (load_file(d / name) for d in (best, run / "checkpoints/step_000003", run / "checkpoints/step_000004"))
        assert all(torch.equal(ours[k], step3[k]) for k in ours)
        assert any(not torch.equal(ours[k], step4[k]) for k in ours)  # the weights did move after the best step
    assert not (run / "sentinel.log").exists()
    policy, _ = load_checkpoint(best)  # usable wherever a checkpoint is (checksums verified)
    assert sum(p.numel() for p in policy.trainable_parameters()) > 0


def test_stop_ends_the_run_at_the_alarm_with_a_checkpoint(toy_overrides, monkeypatch, capsys):
    monkeypatch.setattr(Scripted, "held_out", {s: 0.9 - 0.1 * s for s in range(11)})
    r = recipe(toy_overrides, "train.steps=10", "train.sentinel={patience: 2, stop: true}", "train.save_every=100")
    run = Scripted(r).fit().run_dir
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2, 3]  # evaluation 1 has one reward and no trend: streaks 1, 2
    assert [row["sentinel/alarm"] for row in rows] == [0, 0, 0, 1]
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"
    log = (run / "sentinel.log").read_text()
    assert "reward-hacking alarm at step 3" in log and "ending the run at step 3" in log
    assert "sentinel: reward-hacking alarm at step 3" in capsys.readouterr().err


def test_the_sentinel_resumes_where_it_was(toy_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(Scripted, "held_out", {s: 0.9 - 0.1 * s for s in range(7)})
    whole = Scripted(recipe(toy_overrides, "train.steps=6", "train.sentinel.patience=3")).fit().run_dir
    cut = [o for o in toy_overrides if not o.startswith("run.output_dir")] + [f"run.output_dir={tmp_path / 'cut'}"]
    Scripted(recipe(cut, "train.steps=3", "train.sentinel.patience=3")).fit().run_dir
    resumed = Scripted(recipe(cut, "train.steps=6", "train.sentinel.patience=3"), resume=True).fit().run_dir

    def sentinel_rows(run):
        return [{k: v for k, v in row.items() if k.startswith("sentinel/")} for row in read_metrics(run / "metrics.jsonl")]

    assert [row["sentinel/alarm"] for row in sentinel_rows(whole)] == [0, 0, 0, 0, 1, 1, 1]
    assert sentinel_rows(resumed) == sentinel_rows(whole)


def test_the_sentinel_needs_held_out_evaluations(toy_overrides):
    with pytest.raises(RecipeError, match="train.sentinel watches held-out evaluations"):
        Trainer(load_recipe("toy", toy_overrides + ["train.sentinel={}"]))
