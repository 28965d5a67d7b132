"""Every extension point works as docs/architecture.md says: losses, objectives and SDE kinds named by a recipe (a
built-in, `module:attr`, an entry point), checked before any model is built; the runnable examples; the same held-out
edits in training and in `editrl eval`."""

from __future__ import annotations

import json
import csv
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from typer.testing import CliRunner

from editrl import grpo
from editrl.base import RecipeError, StrictModel
from editrl.monitor import read_metrics
from editrl.objectives import LOSSES
from editrl.preflight import load_recipe
from editrl.sde import SDE_KINDS
from editrl.trainer import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = {
    "custom_loss": ["grpo.loss=my_loss:my_loss"],
    "custom_sde": ["sampling.sde=my_sde:my_sde"],
    "minimal_policy": ["policy.name=minimal_policy:MinimalPolicy", "policy.options={}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_the_examples_run_from_the_command_line(example, tmp_path):
    """README's commands, as a user types them: the example's folder on PYTHONPATH, one training step, exit 0."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples" / example)}
    cmd = [str(Path(sys.executable).with_name("editrl")), "train", "toy", *EXAMPLES[example], "train.steps=1",
           f"run.output_dir={tmp_path / 'run'}", "train.progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert row["samples/trained"] > 0 and math.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- objectives


class SignOnly:
    """An objective of a test's own: the clipped surrogate of sign(A), and an option of its own."""

    class Options(StrictModel):
        scale: float = 1.0

    keeps_latents, keeps_means = True, False
    seen: ClassVar[list[str]] = []

    def __init__(self, options: Options, g: Any, s: Any) -> None:
        from editrl.objectives import Likelihood

        self.inner = Likelihood(grpo.clipped_surrogate, options, g, s)
        self.options = options

    def after_rollout(self, policy: Any, cond: Any, traj: Any, generator: Any) -> dict[str, torch.Tensor]:
        SignOnly.seen.append("after_rollout")
        return {}

    def loss(self, step: Any) -> grpo.LossOutput:
        SignOnly.seen.append("loss")
        step.advantages = self.options.scale * torch.sign(step.advantages)
        return self.inner.loss(step)


def not_a_loss(log_prob: Any, old_log_prob: Any, advantages: Any, clip_range: Any) -> float:
    return 0.0


NOT_CALLABLE = 3


def zero_noise(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    return x, torch.zeros_like(t) - 1  # a negative std: no transition


def test_an_objective_class_is_called_by_the_trainer_with_its_own_options(toy_overrides):
    SignOnly.seen.clear()
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.loss=test_extensions:SignOnly", "grpo.loss_options.scale=2"]))
    metrics = trainer.train_step()
    assert SignOnly.seen[0] == "after_rollout" and SignOnly.seen.count("loss") == 7 * 2  # steps x micro-batches
    assert metrics["samples/trained"] > 0 and any(k.startswith("ratio/") for k in metrics)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["grpo.loss=test_extensions:SignOnly", "grpo.loss_options.scal=2"],
         "grpo.loss_options.scal: unknown key (did you mean 'scale'?)"),
        (["grpo.loss_options.beta=2"], "grpo.loss_options.beta: unknown key"),  # ppo_clip has no options
        (["grpo.nft.beta=2"], "grpo: nft moved: an objective's options are grpo.loss_options"),
        (["sampling.guidance_scale=3"], "sampling: guidance_scale: classifier-free guidance is the policy's"),
        (["grpo.loss=nft", "grpo.ratio_norm=true"], "grpo.ratio_norm normalises a likelihood ratio"),
        (["grpo.loss=test_extensions:not_a_loss"], "grpo.loss: test_extensions:not_a_loss must return an editrl.grpo.LossOutput"),
        (["grpo.loss=test_extensions:NOT_CALLABLE"], "grpo.loss: test_extensions:NOT_CALLABLE is a int, not a loss function"),
        (["grpo.loss=nosuchmodule:x"], "grpo.loss: cannot import module 'nosuchmodule'"),
        (["sampling.sde=test_extensions:zero_noise"], "sampling.sde: test_extensions:zero_noise failed on a test step"),
        (["sampling.sde=test_extensions:NOT_CALLABLE"], "sampling.sde: test_extensions:NOT_CALLABLE is not a function"),
    ],
)
def test_losses_objectives_and_sde_kinds_are_checked_before_any_model(overrides, message):
    with pytest.raises(RecipeError) as e:
        load_recipe("toy", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_nft_takes_its_options_from_loss_options(toy_overrides):
    trainer = Trainer(load_recipe("toy", toy_overrides + ["grpo.loss=nft", "grpo.loss_options.beta=0.5"]))
    assert trainer.objective.options.beta == 0.5
    metrics = trainer.train_step()
    assert metrics["samples/trained"] > 0 and not any(k.startswith("ratio/") for k in metrics)


def test_losses_and_sde_kinds_come_from_entry_points(monkeypatch):
    """A package of the user's declares `editrl.losses` / `editrl.sde_kinds` entry points; a recipe names them."""
    points = {
        "editrl.losses": [metadata.EntryPoint("signed", "test_extensions:SignOnly", "editrl.losses")],
        "editrl.sde_kinds": [metadata.EntryPoint("linear_noise", "test_extensions:linear_noise", "editrl.sde_kinds")],
    }
    monkeypatch.setattr(metadata, "entry_points", lambda group: points.get(group, []))
    for registry in (LOSSES, SDE_KINDS):
        monkeypatch.setattr(registry, "_entry_points_loaded", False)
        monkeypatch.setattr(registry, "_items", dict(registry._items))
    recipe = load_recipe("toy", ["grpo.loss=signed", "sampling.sde=linear_noise"])
    assert recipe.grpo.loss == "signed" and LOSSES.get("signed") is SignOnly and "linear_noise" in SDE_KINDS.names()


def linear_noise(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
    dt = t_next - t
    return x + v * dt, a * t * torch.sqrt(-dt)


# ---------------------------------------------------------------------------------------------- held-out seeds


def test_training_and_editrl_eval_make_the_same_held_out_edits(toy_overrides, tmp_path, monkeypatch):
    """The same checkpoint benchmarked by its training run and by `editrl eval` (its defaults: the run's seed and
    micro-batch) gives the same number for every sample."""
    import typer

    import editrl.evaluate as ev
    from editrl.data.cli import register
    from editrl.data.synth import synthesize

    data = tmp_path / "heldout"
    synthesize(data, 6, seed=3, frames=5, size=(32, 32), split="test", progress=False)
    reports: list[Any] = []
    evaluate = ev.evaluate
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: reports.append(evaluate(*a, **k)) or reports[-1])
    run = train(load_recipe("toy", toy_overrides + [
        "policy.options={frames: 5, height: 32, width: 32}", "train.steps=1", "train.eval_every=1", "run.seed=5",
        f"data.eval={{kind: manifest, options: {{path: {data}}}}}",
    ]))
    trained = {r["id"]: r for r in reports[-1].rows}  # the evaluation after the last step, on the saved weights
    monkeypatch.setattr(ev, "evaluate", evaluate)
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(run), "--data", str(data), "--out", str(tmp_path / "e"),
                                      "--no-rewards"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "e" / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(trained) == 6
    for row in rows:
        for col in ("fidelity_psnr", "preservation_psnr", "temporal"):
            a, b = float(row[col] or "nan"), float(trained[row["id"]][col])  # samples.csv leaves n/a empty
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-5), (row["id"], col, a, b)


def test_a_name_typed_on_the_command_line_is_trusted_one_in_a_recipe_file_must_be_listed(tmp_path):
    """Typing `grpo.loss=my_loss:my_loss` is the user's decision: its module joins run.plugins (so the run's recipe.yaml
    records it); a recipe file, or a checkpoint's, naming code its run.plugins does not list is refused."""
    import sys

    import yaml

    sys.path.insert(0, str(ROOT / "examples" / "custom_loss"))
    try:
        typed = load_recipe("toy", ["grpo.loss=my_loss:my_loss"])
        assert typed.run.plugins == ["my_loss"]
        tree = typed.model_dump(mode="json")
        tree["run"]["plugins"] = []
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(tree))
        with pytest.raises(RecipeError, match="'my_loss:my_loss' is code from 'my_loss', which run.plugins does not list"):
            load_recipe(tmp_path / "r.yaml")
        with pytest.raises(RecipeError, match="is Python's standard library"):
            load_recipe("toy", ["grpo.loss=subprocess:Popen"])  # typed or not
    finally:
        sys.path.remove(str(ROOT / "examples" / "custom_loss"))


# ---------------------------------------------------------------------------------------------- the pipeline


def test_the_job_is_data_then_the_warm_start_then_grpo_with_one_policy_in_memory(tmp_path, monkeypatch):
    """`editrl train` with a warm start: the phases in the order the stages run, no trainer building another, the SFT
    policy gone before the Edit-GRPO one is built, and a result that carries what the summary needs."""
    import gc
    import weakref

    import editrl.checkpoint as ckpt
    from editrl import job
    from editrl.summary import nothing_trained

    warm = ["train.steps=1", "train.eval_every=null", "train.save_every=1", "data.train.options.n=4"]
    recipe = load_recipe("viva_tiny", [
        f"run.output_dir={tmp_path / 'grpo'}", "run.threads=null", "train.progress=false", "train.steps=1",
        "data.train.options.n=4", f"policy.init_from={tmp_path / 'sft'}", "policy.warm_start=viva_sft_tiny",
        f"policy.warm_start_overrides={json.dumps(warm)}"])
    assert job.phases(recipe, resume=False) == ["data", "preset", "sft", "grpo"]
    assert job.phases(recipe, resume=True) == ["data", "preset", "grpo"]  # a resumed run made its warm start already
    built, build = [], ckpt.policy_from_recipe

    def counted(*a: Any, **k: Any) -> Any:
        gc.collect()
        alive = sum(ref() is not None for ref in built)
        policy = build(*a, **k)
        built.append(weakref.ref(policy))
        counted.alive.append(alive)
        return policy

    counted.alive = []
    monkeypatch.setattr(ckpt, "policy_from_recipe", counted)
    import editrl.harness
    monkeypatch.setattr(editrl.harness, "policy_from_recipe", counted)
    result = job.run(recipe)
    assert len(built) == 2 and counted.alive == [0, 0]  # SFT's, then Edit-GRPO's, never both
    assert result.run_dir == tmp_path / "grpo" and result.step == 1 and result.totals["samples/trained"] > 0
    assert nothing_trained(result) is None
    assert job.phases(recipe, resume=False) == ["data", "sft", "preset", "grpo"]  # the finished warm start is skipped
    again = job.run(recipe, overwrite=True)  # ... and not trained again
    assert len(built) == 3 and again.step == 1


def test_run_totals_survive_a_resume(toy_overrides):
    from editrl.trainer import Trainer as T

    first = T(load_recipe("toy", toy_overrides + ["train.steps=1", "train.save_every=1"])).fit()
    resumed = T(load_recipe("toy", toy_overrides + ["train.steps=2"]), resume=True).fit()
    assert first.totals["samples/trained"] > 0
    assert resumed.totals["samples/trained"] > first.totals["samples/trained"]  # both steps, not the second alone
