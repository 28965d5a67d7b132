"""Group-relative policy optimisation as pure tensor functions (DESIGN.md §4).

Samples of one request form a group (`group_ids`); invalid rewards are excluded from every statistic and
get zero advantage, so a judge that failed never pushes the policy either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

EPS = 1e-4


def _group_stats(values: Tensor, valid: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample (mean, population std, count) of the valid values of its group."""
    n_groups = int(group_ids.max()) + 1
    w = valid.float()
    count = torch.zeros(n_groups).index_add_(0, group_ids, w)
    total = torch.zeros(n_groups).index_add_(0, group_ids, values * w)
    mean = total / count.clamp_min(1)
    sq = torch.zeros(n_groups).index_add_(0, group_ids, (values - mean[group_ids]) ** 2 * w)
    std = torch.sqrt(sq / count.clamp_min(1))
    return mean[group_ids], std[group_ids], count[group_ids]


def group_advantages(
    rewards: Tensor,
    valid: Tensor,
    group_ids: Tensor,
    *,
    scale: Literal["group", "batch", "none"] = "group",
    adv_clip: float | None = None,
    eps: float = EPS,
) -> Tensor:
    """A = (r - mean_group) / (std + eps), std over the group or the whole batch, or unscaled; clipped."""
    rewards = rewards.float()
    mean, std, _ = _group_stats(rewards, valid, group_ids)
    centred = rewards - mean
    if scale == "group":
        adv = centred / (std + eps)
    elif scale == "batch":
        batch_std = rewards[valid].std(unbiased=False) if bool(valid.any()) else torch.tensor(0.0)
        adv = centred / (batch_std + eps)
    elif scale == "none":
        adv = centred
    else:
        raise ValueError(f"unknown advantage scale {scale!r}")
    if adv_clip is not None:
        adv = adv.clamp(-adv_clip, adv_clip)
    return torch.where(valid, adv, torch.zeros_like(adv))


def tied_groups(rewards: Tensor, valid: Tensor, group_ids: Tensor, atol: float = 1e-6) -> Tensor:
    """(B,) True for samples whose group has fewer than two valid rewards or all valid rewards equal."""
    _, std, count = _group_stats(rewards.float(), valid, group_ids)
    return (std <= atol) | (count < 2)


def shuffle_advantages(adv: Tensor, mask: Tensor, generator: torch.Generator) -> Tensor:
    """The advantages of the `mask`ed samples permuted among themselves (seeded), the rest unchanged.

    The control of a reward ablation (`grpo.shuffle_advantages`): updates of the same sizes that carry no reward
    signal, so a reward-driven gain can be told apart from what any LoRA update does.
    """
    idx = torch.nonzero(mask).flatten()
    out = adv.clone()
    out[idx] = adv[idx[torch.randperm(idx.numel(), generator=generator)]]
    return out


def aggregate_rewards(
    scores: dict[str, Tensor],
    valid: dict[str, Tensor],
    weights: dict[str, float],
    group_ids: Tensor,
    mode: Literal["sum_then_normalize", "normalize_then_sum"] = "sum_then_normalize",
) -> tuple[Tensor, Tensor]:
    """Combine reward components into one (B,) reward and its validity.

    sum_then_normalize: weighted sum of raw scores; a sample is valid only if every component is.
    normalize_then_sum: each component is z-scored within its group over its valid samples (invalid ones
    contribute 0, the group mean), then weighted and summed; valid if any component is.
    """
    names = list(scores)
    if not names:
        raise ValueError("no reward components to aggregate")
    if mode == "sum_then_normalize":
        ok = torch.stack([valid[n] for n in names]).all(0)
        total = sum(weights[n] * torch.where(valid[n], scores[n].float(), 0.0) for n in names)
        return torch.as_tensor(total), ok
    if mode == "normalize_then_sum":
        ok = torch.stack([valid[n] for n in names]).any(0)
        total = sum(weights[n] * group_advantages(scores[n], valid[n], group_ids, scale="group") for n in names)
        return torch.as_tensor(total), ok
    raise ValueError(f"unknown aggregation {mode!r}")


@dataclass
class LossOutput:
    """A loss and what the trainer logs of it; the likelihood ratio's statistics only where an objective has one."""

    loss: Tensor  # scalar
    ratio: Tensor | None = None  # (B,) exp(logp - logp_old)
    clipped: Tensor | None = None  # (B,) bool: the clipped branch was taken
    approx_kl: Tensor | None = None  # scalar, E[(logp_old - logp_new)^2 / 2]
    extra: dict[str, Tensor] = field(default_factory=dict)  # further per-call scalars to log (kept on the device)
    raw_ratio: Tensor | None = None  # (B,) the ratio before a normalisation (GRPO-Guard's), logged beside `ratio`


def clipped_surrogate(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> LossOutput:
    """mean(max(-A r, -A clip(r, 1-eps, 1+eps))), r = exp(logp - logp_old) (Flow-GRPO)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    took_clip = (clipped > unclipped).detach()
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach()
    return LossOutput(loss, ratio.detach(), took_clip, approx_kl)


def reinforce(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> LossOutput:
    """-A r without clipping: the plain policy gradient, for ablations."""
    ratio = torch.exp(log_prob - old_log_prob)
    approx_kl = 0.5 * ((log_prob - old_log_prob) ** 2).mean().detach()
    return LossOutput((-advantages * ratio).mean(), ratio.detach(), torch.zeros_like(ratio, dtype=torch.bool), approx_kl)


def guard_log_ratio(sample: Tensor, mean: Tensor, old_mean: Tensor, std: Tensor) -> Tensor:
    """(B,) GRPO-Guard's normalised log-ratio (RatioNorm, arXiv:2510.22319) of a Gaussian step N(mean, std^2).

    Flow-Factory's GRPOGuardTrainer writes it s log r + mse(mean, old_mean) / (2 s), s the transition std and log r
    the exact log-ratio averaged over elements. Expanding log r gives the form computed here,
    mean((x - old_mean) (mean - old_mean)) / s = mean(eps (mean - old_mean)), eps the rollout's unit noise: it needs no
    log-probability (so it is the same under either `cps_logprob`) and cancels nothing numerically.
    Why: under the rollout's noise log r has mean -mse / (2 s^2) < 0 and std sqrt(mse / D) / s (D elements), a bias
    and a spread that grow as s shrinks, so a fixed clip range bites unevenly across timesteps. The normalised
    log-ratio has mean 0 and std sqrt(mse / D) at every step, and its gradient, mean(eps d mean), is s times the
    on-policy gradient of log r: the per-timestep reweighting (low-noise steps weigh less) that comes with it.
    """
    d = (sample.float() - old_mean.float()) * (mean.float() - old_mean.float())
    return d.mean(dim=tuple(range(1, d.ndim))) / std.reshape(-1)


def nft_loss(
    v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, sigma: float, advantages: Tensor, *, beta: float, adv_clip: float
) -> LossOutput:
    """DiffusionNFT's negative-aware loss (arXiv:2509.16117), as NVlabs/DiffusionNFT's train_nft_sd3.py computes it.

    Likelihood-free: no log-probabilities and no SDE. From the rollout it needs the clean sample x0, a fresh noising
    x_t = (1 - t) x0 + t eps and the sampling policy's velocity v_old there (`editrl.objectives.DiffusionNFT`). With the
    optimality probability r = clip(A / c, -1, 1) / 2 + 1/2 (c = adv_clip), the implicit positive and negative
    policies v+ = beta v + (1 - beta) v_old and v- = (1 + beta) v_old - beta v are regressed onto x0 through their x0
    predictions x_t - t v+-, each squared error divided by its detached mean absolute error (adaptive weighting):
    loss = c mean(r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-) / beta.
    """
    dims = tuple(range(1, v.ndim))
    r = ((advantages.float().clamp(-adv_clip, adv_clip) / adv_clip) / 2 + 0.5).clamp(0, 1)
    v_old, x_t, x0 = v_old.float().detach(), x_t.float(), x0.float()

    def weighted_error(velocity: Tensor) -> Tensor:
        err = x_t - sigma * velocity - x0
        weight = err.detach().abs().mean(dim=dims).clamp_min(1e-5)
        return (err**2).mean(dim=dims) / weight

    positive = weighted_error(beta * v.float() + (1 - beta) * v_old)
    negative = weighted_error((1 + beta) * v_old - beta * v.float())
    loss = (adv_clip * (r * positive + (1 - r) * negative) / beta).mean()
    deviation = ((v.detach().float() - v_old) ** 2).mean()
    return LossOutput(loss, extra={"nft_old_deviation": deviation})


def kl_to_reference(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """(B,) KL between N(mean, std^2) and N(ref_mean, std^2), averaged over non-batch dims."""
    kl = (mean - ref_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))
