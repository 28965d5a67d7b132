"""Supervised fine-tuning with the flow-matching loss on paired data (source, instruction, [reference], target).

Works for any policy that, besides the policy protocol, implements `encode_target(samples) -> Tensor` (the x0
latents of the targets). With x_sigma = (1 - sigma) x0 + sigma eps the model is trained to predict
v = eps - x0 (DESIGN.md §4); sigmas are drawn uniform or logit-normal (SD3), then shifted by `sampling.shift`
as at sampling time. Checkpoints use the engine's layout, so a GRPO recipe starts from one with
`policy.init_from: DIR` and `editrl edit --checkpoint DIR` runs one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import yaml
from pydantic import Field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor

from editrl.checkpoint import find_checkpoint, load_training_state, save_checkpoint
from editrl.config import Recipe, RecipeError, dump_recipe, load_recipe
from editrl.data.base import build_dataset
from editrl.distributed import LocalBackend, make_backend
from editrl.monitor import RunLogger, console
from editrl.policy import StrictModel, build_policy
from editrl.trainer import DataCursor, derive_seed
from editrl.types import EditSample


class SftConfig(StrictModel):
    batch_size: int = Field(4, ge=1)  # pairs per optimiser update
    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    eval_samples: int = Field(8, ge=1)  # eval pairs scored with fixed noise every train.eval_every steps


class SftRecipe(Recipe):
    """A recipe with an `sft` section; rewards are optional (nothing is scored)."""

    sft: SftConfig = Field(default_factory=SftConfig)
    needs_rewards = False


def load_sft_recipe(source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = (), check_paths: bool = True) -> SftRecipe:
    return load_recipe(source, overrides, check_paths=check_paths, model=SftRecipe)  # type: ignore[return-value]


def is_sft_checkpoint(ckpt: Path) -> bool:
    tree = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
    return isinstance(tree, dict) and "sft" in tree


def build(recipe: Recipe) -> Any:
    """The recipe's policy with its LoRA (if any); `init_from` weights loaded."""
    policy = build_policy(recipe.policy.name, recipe.policy.options, device=recipe.run.device, dtype=getattr(torch, recipe.run.dtype))
    if recipe.optim.lora is not None:
        policy.add_lora(recipe.optim.lora)
    if recipe.policy.init_from:
        policy.load_trainable(find_checkpoint(recipe.policy.init_from))
    return policy


def load_sft_policy(ckpt: Path, device: str = "cpu") -> tuple[Any, SftRecipe]:
    """An SFT checkpoint's policy, for inference (the GRPO counterpart is `editrl.checkpoint.load_policy`)."""
    recipe = load_sft_recipe(ckpt / "recipe.yaml", check_paths=False)
    recipe.run.device = device
    recipe.policy.init_from = None  # the checkpoint holds everything that was loaded from it
    policy = build(recipe)
    policy.load_trainable(ckpt)
    return policy, recipe


def sample_sigmas(n: int, cfg: SftConfig, shift: float, generator: torch.Generator) -> Tensor:
    """(n,) training noise levels in (0, 1), shifted like the sampling schedule (sigma' = s*sigma / (1 + (s-1)*sigma))."""
    if cfg.timesteps == "uniform":
        sigma = torch.rand(n, generator=generator)
    else:
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    return shift * sigma / (1 + (shift - 1) * sigma)


def flow_matching_loss(
    policy: Any,
    samples: list[EditSample],
    cfg: SftConfig,
    shift: float,
    generator: torch.Generator,
    forward: Callable[..., Tensor] | None = None,
) -> Tensor:
    """Mean squared error between the predicted and the true velocity eps - x0 at random noise levels.

    `forward(fn, *args)` runs the trained call (the backend's, so DeepSpeed's engine hooks see it).
    """
    cond = policy.encode(samples)
    x0 = policy.encode_target(samples).float()
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    sigma = sample_sigmas(x0.shape[0], cfg, shift, generator).to(x0.device)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - s) * x0 + s * eps
    v = forward(policy.velocity, x, sigma, cond) if forward is not None else policy.velocity(x, sigma, cond)
    return torch.nn.functional.mse_loss(v.float(), eps - x0)


def _requires_targets(samples: list[EditSample]) -> None:
    bad = [s.id for s in samples if s.target is None]
    if bad:
        raise ValueError(f"SFT needs paired data: sample {bad[0]!r} has no target video")


class SftTrainer:
    def __init__(self, recipe: SftRecipe, resume: bool = False, backend: LocalBackend | None = None) -> None:
        self.recipe = recipe
        self.run_dir = recipe.output_dir
        if not resume and any((self.run_dir / "checkpoints").glob("step_*")):
            raise RecipeError(f"{self.run_dir} already holds checkpoints: continue with --resume or choose another run.name")
        if recipe.run.threads:
            torch.set_num_threads(recipe.run.threads)
        torch.manual_seed(derive_seed(recipe.run.seed))
        self.policy = build(recipe)
        if not callable(getattr(self.policy, "encode_target", None)):
            raise RecipeError(f"policy.name: {recipe.policy.name!r} has no encode_target(), which SFT needs")
        self.backend = backend or make_backend(recipe)
        self.backend.prepare(self.policy)
        self.data = build_dataset(recipe.data.train.kind, recipe.data.train.options)
        self.eval = build_dataset(recipe.data.eval.kind, recipe.data.eval.options) if recipe.data.eval else None
        self.cursor = DataCursor(len(self.data), recipe.run.seed, recipe.data.shuffle)
        self.step = 0
        if resume:
            ckpt = find_checkpoint(self.run_dir)
            state, info = load_training_state(ckpt)
            self.policy.load_trainable(ckpt)
            self.backend.load_state_dict(state["backend"])
            torch.set_rng_state(state["torch_rng"])
            self.step, self.cursor.position = int(info["step"]), int(info["cursor"])
        else:
            dump_recipe(recipe, self.run_dir / "recipe.yaml")

    def eval_loss(self) -> float:
        """Flow-matching loss on the first eval pairs with fixed noise: comparable across steps and runs."""
        assert self.eval is not None
        r = self.recipe
        samples = [self.eval[i] for i in range(min(len(self.eval), r.sft.eval_samples))]
        _requires_targets(samples)
        gen = torch.Generator().manual_seed(derive_seed(r.run.seed, 10**6))
        with torch.no_grad():
            return float(flow_matching_loss(self.policy, samples, r.sft, r.sampling.shift, gen))

    def train_step(self) -> dict[str, float]:
        r = self.recipe
        t0 = time.perf_counter()
        samples = [self.data[i] for i in self.cursor.take(r.sft.batch_size)]
        _requires_targets(samples)
        for m in self.policy.modules_for_training():
            m.train()
        gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step))
        loss = flow_matching_loss(self.policy, samples, r.sft, r.sampling.shift, gen, forward=self.backend.forward)
        self.backend.backward(loss)
        grad_norm = self.backend.step()
        self.backend.schedule_step()
        for m in self.policy.modules_for_training():
            m.eval()
        self.step += 1
        return {"train/loss": float(loss.detach()), "train/grad_norm": grad_norm, "lr": self.backend.lr, "time/step": time.perf_counter() - t0}

    def save(self) -> Path:
        self.backend.save_shards(f"step_{self.step:06d}")  # collective, before `latest` can name this step
        state = {"backend": self.backend.state_dict()}
        return save_checkpoint(
            self.run_dir, self.step, self.recipe, self.policy, state, {"cursor": self.cursor.position},
            keep=self.recipe.train.keep_checkpoints,
        )

    def fit(self) -> Path:
        t = self.recipe.train
        logger = RunLogger(self.run_dir, start_step=self.step, log_every=t.log_every)
        columns = (TextColumn("[bold]SFT"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        try:
            with Progress(*columns, console=console, disable=not t.progress) as bar:
                task = bar.add_task("", total=t.steps, completed=self.step)
                while self.step < t.steps:
                    metrics = self.train_step()
                    if self.eval is not None and t.eval_every and self.step % t.eval_every == 0:
                        metrics["eval/fm_loss"] = self.eval_loss()
                    logger.log(self.step, metrics)
                    if self.step % t.save_every == 0 or self.step == t.steps:
                        self.save()
                    bar.update(task, completed=self.step, description=f"loss {metrics['train/loss']:.4f}")
        finally:
            logger.close()
        return self.run_dir
