"""Supervised fine-tuning with the flow-matching loss on paired data (source, instruction, [reference], target).

Works for any policy that, besides the policy protocol, implements `encode_target(samples) -> Tensor` (the x0
latents of the targets). With x_sigma = (1 - sigma) x0 + sigma eps the model is trained to predict
v = eps - x0 (DESIGN.md §4); sigmas are drawn uniform or logit-normal (SD3), then shifted by `sampling.shift`
as at sampling time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from editrl.base import DataError, RecipeError
from editrl.config import SftConfig, SftRecipe
from editrl.policy import train_mode
from editrl.harness import Harness, derive_seed
from editrl.types import EditSample

# The numbers an SFT run's periodic lines show: {metric: format}.
SFT_HEADLINE = {"train/loss": "loss {:.4f}", "eval/fm_loss": "held-out loss {:.4f}", "time/step": "{:.2f} s/step"}


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
    """Mean squared error between the predicted and the true velocity eps - x0 at random noise levels; `forward(fn,
    *args)` runs the trained call (the backend's, so DeepSpeed's engine hooks see it)."""
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
        raise DataError(f"SFT needs paired data: sample {bad[0]!r} has no target video")


class SftTrainer(Harness):
    """The supervised warm start: the flow-matching loss on paired edits."""

    label, phase, headline = "SFT", "sft", SFT_HEADLINE
    recipe: SftRecipe

    def seed(self) -> int:
        return derive_seed(self.recipe.run.seed)

    def check_policy(self) -> None:
        if not callable(getattr(self.policy, "encode_target", None)):
            raise RecipeError(f"policy.name: {self.recipe.policy.name!r} has no encode_target(), which SFT needs")

    def eval_loss(self) -> float:
        """Flow-matching loss on the first eval pairs with fixed noise: comparable across steps and runs."""
        assert self.eval_data is not None
        r = self.recipe
        samples = [self.eval_data[i] for i in range(min(len(self.eval_data), r.sft.eval_samples))]
        _requires_targets(samples)
        gen = torch.Generator().manual_seed(derive_seed(r.run.seed, 10**6))
        with torch.no_grad():
            return float(flow_matching_loss(self.policy, samples, r.sft, r.sampling.shift, gen))

    def evaluate(self) -> dict[str, float]:
        return {"eval/fm_loss": self.eval_loss()}

    def train_step(self) -> dict[str, float]:
        r = self.recipe
        t0 = time.perf_counter()
        samples = self.loader.get(self.cursor.take(r.sft.batch_size))
        self.loader.prefetch(self.cursor.peek(r.sft.batch_size))
        _requires_targets(samples)
        train_mode(self.policy, True)
        gen = torch.Generator().manual_seed(derive_seed(r.run.seed, self.step))
        loss = flow_matching_loss(self.policy, samples, r.sft, r.sampling.shift, gen, forward=self.backend.forward)
        self.backend.backward(loss)
        grad_norm = self.backend.step()
        self.backend.schedule_step()
        train_mode(self.policy, False)
        self.step += 1
        return {"train/loss": float(loss.detach()), "train/grad_norm": grad_norm, "lr": self.backend.lr, "time/step": time.perf_counter() - t0}

    def progress_note(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['train/loss']:.4f}"
