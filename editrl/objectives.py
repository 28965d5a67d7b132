"""What an Edit-GRPO update optimises: the objective's contract, the built-in objectives, and the loss registry.

The trainer rolls out, scores and computes advantages the same way for every objective and calls it without knowing
which one it is. `grpo.loss` names either a likelihood loss function, which `Likelihood` runs on the rollout's SDE
steps, or an `Objective` class, built as `cls(options, grpo_config, sampling_config)` (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol

import torch
from pydantic import Field
from torch import Tensor

from editrl import grpo, sde
from editrl.base import RecipeError, StrictModel
from editrl.config import GrpoConfig, Recipe, SamplingConfig, validate_model
from editrl.registry import Registry, RegistryError
from editrl.types import Condition, Trajectory

LOSSES: Registry[Any] = Registry(
    "loss",
    "editrl.losses",
    {
        "ppo_clip": "editrl.grpo:clipped_surrogate",
        "reinforce": "editrl.grpo:reinforce",
        "nft": "editrl.objectives:DiffusionNFT",
    },
)


LikelihoodLoss = Callable[[Tensor, Tensor, Tensor, float], grpo.LossOutput]  # (log_prob, old, advantages, clip_range)


class NoOptions(StrictModel):
    """An objective without options of its own."""


@dataclass
class TrainedStep:
    """One trained denoising step `k` of a micro-batch: what the rollout kept, and the policy to call there."""

    k: int
    traj: Trajectory  # the micro-batch's trajectories
    cond: Condition
    advantages: Tensor  # (B,)
    velocity: Callable[[Tensor], Tensor]  # the policy's v(x) at this step's sigma, gradients on (through the backend)
    reference: Callable[[Tensor], Tensor]  # the reference's (adapter disabled) v(x) there, without gradients

    @property
    def sigma(self) -> float:
        return float(self.traj.sigmas[self.k])

    @property
    def sigma_next(self) -> float:
        return float(self.traj.sigmas_next[self.k])


class Objective(Protocol):
    Options: ClassVar[type[StrictModel]]
    keeps_latents: bool  # the rollout keeps each trained step's (x, x_next) pair
    keeps_means: bool  # ... and its transition mean (`traj.extras["mean"]`)

    def after_rollout(self, policy: Any, cond: Condition, traj: Trajectory, generator: torch.Generator) -> dict[str, Tensor]:
        """(B, S, ...) tensors the loss will need from the sampling policy, stored in `traj.extras`."""

    def loss(self, step: TrainedStep) -> grpo.LossOutput:
        """The step's loss, the KL term (`grpo.beta`) included; `ratio` set only where a likelihood ratio exists."""


class Likelihood:
    """GRPO's family: the rollout's SDE step scored under the policy, its ratio to the rollout's probability turned into
    the loss by `loss_fn` (ppo_clip: Flow-GRPO's clipped surrogate; reinforce; a user's). With `grpo.ratio_norm` the
    log-ratio is GRPO-Guard's normalised one. The KL term is between the policy's and the reference's transitions."""

    Options = NoOptions
    keeps_latents = True

    def __init__(self, loss_fn: LikelihoodLoss, options: StrictModel, g: GrpoConfig, s: SamplingConfig) -> None:
        self.loss_fn, self.g, self.s = loss_fn, g, s
        self.keeps_means = g.ratio_norm

    def after_rollout(self, policy: Any, cond: Condition, traj: Trajectory, generator: torch.Generator) -> dict[str, Tensor]:
        return {}

    def loss(self, step: TrainedStep) -> grpo.LossOutput:
        g, s, k = self.g, self.s, step.k
        x = step.traj.latents[:, k]
        kw = {"noise_level": s.noise_level, "cps_logprob": s.cps_logprob}
        out = sde.step(s.sde, x, step.velocity(x), step.sigma, step.sigma_next, prev_sample=step.traj.next_latents[:, k], **kw)
        raw = None
        if g.ratio_norm:
            guard = grpo.guard_log_ratio(out.prev_sample, out.mean, step.traj.extras["mean"][:, k], out.std)
            raw = torch.exp(out.log_prob - step.traj.log_probs[:, k]).detach()
            pg = self.loss_fn(guard, torch.zeros_like(guard), step.advantages, g.clip_range)
        else:
            pg = self.loss_fn(out.log_prob, step.traj.log_probs[:, k], step.advantages, g.clip_range)
        kl = None
        if g.beta > 0:
            ref = sde.step(s.sde, x, step.reference(x), step.sigma, step.sigma_next, prev_sample=out.prev_sample, **kw)
            kl = grpo.kl_to_reference(out.mean, ref.mean, out.std).mean()
        return _with_kl(pg, kl, g.beta, raw_ratio=raw)


class DiffusionNFT:
    """DiffusionNFT (arXiv:2509.16117): no SDE density; the policy's velocity on fresh noisings of the rollout's final
    sample, against the sampling policy's velocity there (`editrl.grpo.nft_loss`). The KL term is in velocity space."""

    class Options(StrictModel):
        beta: float = Field(1.0, gt=0)  # how far the implicit positive/negative velocities move from the old one

    keeps_latents = False  # at video sizes the (x, x_next) pairs are the rollout's largest tensors: not kept
    keeps_means = False

    def __init__(self, options: Options, g: GrpoConfig, s: SamplingConfig) -> None:
        if g.ratio_norm:
            raise RecipeError("grpo.ratio_norm normalises a likelihood ratio, which grpo.loss=nft does not use; drop one")
        self.options, self.g = options, g

    @torch.no_grad()
    def after_rollout(self, policy: Any, cond: Condition, traj: Trajectory, generator: torch.Generator) -> dict[str, Tensor]:
        """Per trained sigma t: x_t = (1 - t) x0 + t eps with fresh noise, and the sampling policy's velocity there,
        computed before any update so that `v_old` stays the sampling policy's however many updates follow."""
        x0 = traj.final.float()
        noised, old = [], []
        for t in traj.sigmas.tolist():
            eps = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
            x_t = (1 - t) * x0 + t * eps
            noised.append(x_t)
            old.append(policy.velocity(x_t, torch.full((x0.shape[0],), t, device=x0.device), cond).float())
        return {"nft_x_t": torch.stack(noised, 1), "nft_v_old": torch.stack(old, 1)}

    def loss(self, step: TrainedStep) -> grpo.LossOutput:
        g, k, extras = self.g, step.k, step.traj.extras
        x = extras["nft_x_t"][:, k]
        v = step.velocity(x)
        pg = grpo.nft_loss(v, extras["nft_v_old"][:, k], x, step.traj.final, step.sigma, step.advantages,
                           beta=self.options.beta, adv_clip=g.adv_clip)
        kl = ((v.float() - step.reference(x).float()) ** 2).mean() if g.beta > 0 else None
        return _with_kl(pg, kl, g.beta)


def _with_kl(pg: grpo.LossOutput, kl: Tensor | None, beta: float, raw_ratio: Tensor | None = None) -> grpo.LossOutput:
    """The policy-gradient output with the KL term added to its loss, and both parts kept for the logs."""
    extra = {**pg.extra, "pg_loss": pg.loss.detach()}
    loss = pg.loss
    if kl is not None:
        loss = loss + beta * kl
        extra["kl"] = kl.detach()
    return grpo.LossOutput(loss, pg.ratio, pg.clipped, pg.approx_kl, extra, raw_ratio=raw_ratio)


def build_objective(recipe: Recipe) -> Objective:
    """The recipe's objective (`grpo.loss` with `grpo.loss_options`); a RecipeError line for anything unusable. Its
    options are validated (and a loss function tried) once, then kept on the recipe."""
    g, s = recipe.grpo, recipe.sampling
    try:
        found = LOSSES.get(g.loss)
    except RegistryError as e:
        raise RecipeError(f"grpo.loss: {e}") from None
    options = recipe.plugin_options("grpo.loss", None)
    if isinstance(found, type):
        missing = [m for m in ("Options", "keeps_latents", "keeps_means", "after_rollout", "loss") if not hasattr(found, m)]
        if missing:
            raise RecipeError(f"grpo.loss: {g.loss} is a class without the Objective members {', '.join(missing)} "
                              "(editrl.objectives.Objective), nor a loss function")
        options = options or recipe.keep_options("grpo.loss", validate_model(found.Options, g.loss_options, "grpo.loss_options."))
        return found(options, g, s)
    if not callable(found):
        raise RecipeError(f"grpo.loss: {g.loss} is a {type(found).__name__}, not a loss function or an Objective class")
    if options is None:
        options = recipe.keep_options("grpo.loss", validate_model(NoOptions, g.loss_options, "grpo.loss_options."))
        _check_loss_fn(found, g)
    return Likelihood(found, options, g, s)


def _check_loss_fn(fn: Callable[..., Any], g: GrpoConfig) -> None:
    """A likelihood loss answers a two-sample call with a LossOutput holding a scalar loss (one line if not)."""
    zeros = torch.zeros(2)
    try:
        out = fn(zeros, zeros, torch.tensor([1.0, -1.0]), g.clip_range)
    except Exception as e:
        raise RecipeError(f"grpo.loss: {g.loss} failed on a two-sample test call (log_prob, old_log_prob, advantages, "
                          f"clip_range): {type(e).__name__}: {e}") from None
    if not isinstance(out, grpo.LossOutput) or out.loss.ndim != 0:
        raise RecipeError(f"grpo.loss: {g.loss} must return an editrl.grpo.LossOutput with a scalar loss, got "
                          f"{type(out).__name__}")
