"""SFT: the flow-matching loss falls on synthetic pairs, checkpoints resume and start GRPO, bad data is one line."""

import pytest
import torch
import typer
from typer.testing import CliRunner

from editrl.config import RecipeError
from editrl.preflight import load_recipe
from editrl.data.base import build_dataset
from editrl.data.video import read_video, write_video
from editrl.checkpoint import load_checkpoint
from editrl.inference import register
from editrl.monitor import read_metrics
from editrl.sft import SftTrainer, sample_sigmas
from editrl.config import SftConfig
from editrl.preflight import load_sft_recipe
from editrl.trainer import Trainer


def overrides(run_dir, steps=30):
    return [
        f"run.output_dir={run_dir}", "run.threads=null", "train.progress=false", f"train.steps={steps}",
        f"train.save_every={steps}", "train.eval_every=null", "data.train.options.n=8", "data.eval.options.n=4",
    ]


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_sigmas_follow_the_sampling_shift():
    g = torch.Generator().manual_seed(0)
    plain = sample_sigmas(20000, SftConfig(timesteps="uniform"), 1.0, g)
    shifted = sample_sigmas(20000, SftConfig(timesteps="uniform"), 3.0, torch.Generator().manual_seed(0))
    assert 0 < plain.min() and plain.max() < 1 and abs(float(plain.mean()) - 0.5) < 0.01
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    logit = sample_sigmas(20000, SftConfig(), 1.0, g)
    assert abs(float(logit.median()) - 0.5) < 0.02 and float(((logit - 0.5).abs() < 0.25).float().mean()) > 0.5


def test_sft_lowers_the_flow_matching_loss(tmp_path):
    trainer = SftTrainer(load_sft_recipe("viva_sft_tiny", overrides(tmp_path / "sft")))
    start = trainer.eval_loss()
    trainer.fit()
    end = trainer.eval_loss()
    assert end < 0.9 * start, (start, end)
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert len(rows) == 30 and all(r["train/loss"] > 0 for r in rows)


def test_sft_checkpoint_resumes_starts_grpo_and_loads_for_editing(tmp_path):
    run = tmp_path / "sft"
    result = CliRunner().invoke(cli(), ["sft", "viva_sft_tiny", *overrides(run, steps=2)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli(), ["sft", "viva_sft_tiny", *overrides(run, steps=3), "--resume"])
    assert result.exit_code == 0, result.output
    resumed = read_metrics(run / "metrics.jsonl")
    straight = tmp_path / "straight"
    assert CliRunner().invoke(cli(), ["sft", "viva_sft_tiny", *overrides(straight, steps=3)]).exit_code == 0
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in read_metrics(straight / "metrics.jsonl")]
    assert (run / "checkpoints/step_000003/trainable.safetensors").read_bytes() == (
        straight / "checkpoints/step_000003/trainable.safetensors").read_bytes()  # exact resume

    sft_policy, sft_recipe = load_checkpoint(run)
    assert sft_recipe.sft.batch_size == 4 and sft_policy.dit_in_checkpoint
    video = write_video(tmp_path / "in.mp4", torch.rand(5, 3, 32, 32))
    result = CliRunner().invoke(cli(), ["edit", "--checkpoint", str(run), "--video", str(video), "--instruction", "x",
                                        "--out", str(tmp_path / "out.mp4"), "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert read_video(tmp_path / "out.mp4").shape == (5, 3, 32, 32)
    grpo = Trainer(load_recipe("viva_tiny", [
        f"run.output_dir={tmp_path / 'grpo'}", "run.threads=null", "train.progress=false", "data.train.options.n=8",
        f"policy.init_from={run}",
    ])).policy
    request = build_dataset("synthetic", {"n": 8, "frames": 5, "size": [32, 32]})[0]
    cond = sft_policy.encode([request])
    x = sft_policy.init_noise(cond, torch.Generator().manual_seed(0))
    sigma = torch.full((1,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(grpo.velocity(x, sigma, grpo.encode([request])), sft_policy.velocity(x, sigma, cond))


def test_unpaired_data_and_bad_recipes_are_one_line_errors(tmp_path):
    no_targets = ["data.train.kind=prompts", "data.train.options={prompts: [make it red]}", "data.eval=null"]
    result = CliRunner().invoke(cli(), ["sft", "viva_sft_tiny", *overrides(tmp_path / "a", 2)[:4], *no_targets])
    assert result.exit_code == 2 and "has no target video" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli(), ["sft", "viva_sft_tiny", "sft.batch_sise=2"])
    assert result.exit_code == 2 and "sft.batch_sise: unknown key (did you mean 'batch_size'?)" in result.output
    with pytest.raises(RecipeError, match="trainable.*not both"):
        SftTrainer(load_sft_recipe("viva_sft_tiny", overrides(tmp_path / "b", 2) + ["optim.lora={rank: 4}"]))
