"""The GRPO loop end to end on the toy policy: learning, exact resume, encode sharing, failures."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from editrl.checkpoint import find_checkpoint, load_checkpoint
from editrl.preflight import load_recipe
from editrl.monitor import read_metrics
from editrl.trainer import Trainer, TrainingError, train

ROOT = Path(__file__).resolve().parents[1]


def half_invalid(instructions, edited, **kw):
    """A reward that cannot score every other sample (like a judge whose replies do not parse)."""
    return [None if i % 2 else float(e.mean()) for i, e in enumerate(edited)]


def constant(instructions, **kw):
    return [1.0] * len(instructions)


def _scores(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]


def test_reward_rises(toy_overrides):
    run = train(load_recipe("toy", toy_overrides + ["train.steps=30", "train.save_every=30"]))
    rewards = [r["reward/total/mean"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.05, (first, last)


def test_encode_runs_once_per_request(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides))
    seen = []
    encode = trainer.policy.encode
    trainer.policy.encode = lambda samples: seen.append(len(samples)) or encode(samples)
    trainer.train_step()
    assert sum(seen) == trainer.layout.groups_per_step == 2  # 8 samples, 2 requests


def test_async_and_sync_rewards_agree(toy_overrides, tmp_path):
    a = train(load_recipe("toy", toy_overrides + ["train.steps=2", "grpo.async_rewards=true"]))
    b = train(load_recipe("toy", toy_overrides[1:] + [f"run.output_dir={tmp_path / 'sync'}", "train.steps=2", "grpo.async_rewards=false"]))
    assert _scores(read_metrics(a / "metrics.jsonl")) == _scores(read_metrics(b / "metrics.jsonl"))


def test_invalid_scores_are_skipped_or_stop_the_run(toy_overrides):
    terms = 'rewards.terms=[{name: "test_trainer:half_invalid"}]'
    toy_overrides = [*toy_overrides, "run.plugins=[test_trainer]"]
    trainer = Trainer(load_recipe("toy", toy_overrides + [terms]))
    metrics = trainer.train_step()
    assert metrics["reward/test_trainer:half_invalid/invalid"] == 4.0
    assert metrics["samples/trained"] == 4.0
    trainer = Trainer(load_recipe("toy", toy_overrides + [terms, "rewards.on_failure=fail"]), overwrite=True)
    with pytest.raises(TrainingError, match="4 of 8 samples have no valid score.*on_failure=fail"):
        trainer.train_step()


def test_tied_groups_are_skipped(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ['rewards.terms=[{name: "test_trainer:constant"}]', "run.plugins=[test_trainer]"]))
    before = [p.clone() for p in trainer.policy.trainable_parameters()]
    metrics = trainer.train_step()
    assert metrics["groups/zero_std_frac"] == 1.0 and metrics["train/skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))


def test_sde_window_and_trained_subset(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["sampling.window.size=3", "grpo.trained_steps=2"]))
    metrics = trainer.train_step()
    trained = sorted(k for k in metrics if k.startswith("ratio/") and k.endswith("/mean"))
    assert metrics["sde/trained_steps"] == 2 and len(trained) == 2


def test_kl_is_zero_before_the_first_update_then_positive(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.beta=0.1"]))
    first = trainer.train_step()
    second = trainer.train_step()
    assert first["train/kl"] == 0.0  # LoRA B starts at zero: policy == reference
    assert second["train/kl"] > 0.0


def test_minibatches_move_the_ratio_off_one(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.minibatches=2", "optim.lr=0.05"]))
    metrics = trainer.train_step()
    stds = [v for k, v in metrics.items() if k.startswith("ratio/") and k.endswith("/std")]
    assert max(stds) > 0  # the second update sees a policy the first one changed


def test_checkpoint_contents_and_reload(toy_overrides):
    run = train(load_recipe("toy", toy_overrides + ["train.steps=2", "train.save_every=1", "train.keep_checkpoints=1"]))
    ckpt = find_checkpoint(run)
    assert ckpt.name == "step_000002" and not (run / "checkpoints" / "step_000001").exists()
    assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "recipe.yaml").is_file()
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert set(state) >= {"backend", "torch_rng"}
    assert json.loads((ckpt / "state.json").read_text())["cursor"] == 4
    assert (run / "recipe.yaml").is_file() and any((run / "tensorboard").iterdir())
    policy, _ = load_checkpoint(run)
    trainer = Trainer(load_recipe("toy", toy_overrides + ["train.steps=2"]), resume=True)
    x = torch.randn(2, 3, 2, 8, 8)
    cond = policy.encode([trainer.train_data[0], trainer.train_data[1]])
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        assert torch.equal(policy.velocity(x, sigma, cond), trainer.policy.velocity(x, sigma, cond))


def test_fresh_run_refuses_to_overwrite_checkpoints(toy_overrides):
    train(load_recipe("toy", toy_overrides + ["train.steps=1"]))
    with pytest.raises(TrainingError, match="--resume"):
        Trainer(load_recipe("toy", toy_overrides + ["train.steps=1"]))
    assert Trainer(load_recipe("toy", toy_overrides + ["train.steps=1"]), overwrite=True).step == 0


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "editrl", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = ["train", "toy", "train.steps=10", "train.save_every=2", "run.threads=1"]
    ref = _cli(*common, f"run.output_dir={tmp_path / 'ref'}")
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    killed_dir = tmp_path / "killed"
    proc = _cli(*common, f"run.output_dir={killed_dir}")
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_000004":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = len(read_metrics(killed_dir / "metrics.jsonl"))
    assert interrupted_at < 10

    resumed = _cli(*common, f"run.output_dir={killed_dir}", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    assert _scores(read_metrics(killed_dir / "metrics.jsonl")) == _scores(read_metrics(tmp_path / "ref" / "metrics.jsonl"))


def test_bad_recipe_is_one_line_not_a_traceback():
    proc = _cli("train", "toy", "optim.lerning_rate=3")
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2
    assert "Traceback" not in out
    assert out.strip() == "error: optim.lerning_rate: unknown key (did you mean 'learning_rate'?)"


def test_listing_commands():
    out = _cli("rewards").communicate(timeout=120)[0]
    assert "brightness" in out and "target_color" in out
    out = _cli("recipes").communicate(timeout=120)[0]
    assert "quickstart" in out


def test_ema_tracks_the_weights_and_serves_evaluation(toy_overrides):
    recipe = load_recipe("toy", toy_overrides + ["optim.ema.enabled=true", "optim.ema.decay=0.5", "train.steps=2",
                                                 "data.eval={kind: prompts, options: {prompts: [a red ball]}}"])
    trainer = Trainer(recipe)
    trainer.train_step()
    trainer.train_step()
    live = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    shadow = trainer.ema.shadow_params
    assert any(not torch.equal(a, b) for a, b in zip(live, shadow))  # the average lags the weights
    trainer.evaluate()
    assert all(torch.equal(a, b) for a, b in zip(live, trainer.policy.trainable_parameters()))  # restored after eval
    trainer.save()
    resumed = Trainer(recipe, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(shadow, resumed.ema.shadow_params))


def test_weighted_reward_is_in_the_terms_units_when_the_total_is_centred(toy_overrides):
    """Under normalize_then_sum the aggregated total is ~0 in every group; reward/weighted/mean still shows progress."""
    terms = 'rewards.terms=[{name: brightness, weight: 2.0}, {name: "test_trainer:constant", label: one, weight: 0.5}]'
    run = train(load_recipe("toy", toy_overrides + [terms, "run.plugins=[test_trainer]", "rewards.aggregation=normalize_then_sum",
                                                   "train.steps=2"]))
    for row in read_metrics(run / "metrics.jsonl"):
        assert abs(row["reward/total/mean"]) < 1e-5
        assert row["reward/weighted/mean"] == pytest.approx(2.0 * row["reward/brightness/mean"] + 0.5 * 1.0)
