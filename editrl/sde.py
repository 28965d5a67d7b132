"""One denoising step of a flow-matching sampler, and the Gaussian log-probability of its sample.

Convention (DESIGN.md §4): x_sigma = (1 - sigma) x0 + sigma eps and the model predicts v = eps - x0; sampling
runs sigma from 1 to 0, so dt = sigma_next - sigma < 0. Every kind is a pure function of
(x, v, sigma, sigma_next) returning the Gaussian transition N(mean, std^2); `step` draws from it (rollout) or
scores a given sample (training). Maths runs in float32 whatever dtype the model used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

from editrl.registry import Registry

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SdeStep:
    prev_sample: Tensor  # x at sigma_next
    mean: Tensor  # mean of the transition
    std: Tensor  # (B, 1, ..., 1) std of the transition (0 for deterministic kinds)
    log_prob: Tensor  # (B,) mean over non-batch dims of the per-element Gaussian log-density (0 for ode)


Transition = Callable[[Tensor, Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
SDE_KINDS: Registry[Transition] = Registry("sde kind", "editrl.sde_kinds")


def _expand(s: float | Tensor, like: Tensor) -> Tensor:
    """A float or (B,) sigma as float32 (B, 1, ..., 1) on `like`'s device; a float is filled there (no host-to-device
    copy, so no stall of a rollout loop)."""
    if isinstance(s, Tensor):
        t = s.to(device=like.device, dtype=torch.float32)
        t = t.expand(like.shape[0]) if t.ndim == 0 else t
    else:
        t = torch.full((like.shape[0],), float(s), dtype=torch.float32, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _on_host(s: float | Tensor) -> Tensor:
    """Sigmas as a 1-D float32 CPU tensor for the step's checks (a device tensor costs a sync: loops pass floats)."""
    return torch.as_tensor(s, dtype=torch.float32).detach().reshape(-1).cpu()


@SDE_KINDS.register("flow_sde")
def flow_sde(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """Flow-GRPO's ODE->SDE conversion, marginal-preserving; std_t = a sqrt(t / (1 - t)), t=1 uses t_next."""
    dt = t_next - t
    denom = 1 - torch.where(t >= 1, t_next, t)
    std_t = a * torch.sqrt(t / denom)
    mean = x + (v + std_t**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, std_t * torch.sqrt(-dt)


@SDE_KINDS.register("cps")
def cps(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """Coefficients-preserving sampling: re-mixes the predicted x0 and x1 so the noise level stays exact."""
    std = t_next * math.sin(a * math.pi / 2)
    x0_hat = x - t * v
    x1_hat = x + (1 - t) * v
    mean = (1 - t_next) * x0_hat + torch.sqrt((t_next**2 - std**2).clamp_min(0)) * x1_hat
    return mean, std


@SDE_KINDS.register("dance")
def dance(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """DanceGRPO's step: Euler plus a score correction, noise std a sqrt(-dt)."""
    dt = t_next - t
    x0_hat = x - t * v
    score = -(x - x0_hat * (1 - t)) / t**2
    mean = x + dt * v - 0.5 * a**2 * score * dt
    return mean, a * torch.sqrt(-dt)


@SDE_KINDS.register("ode")
def ode(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """Deterministic Euler step."""
    return x + (t_next - t) * v, torch.zeros_like(t)


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """(B,) mean over non-batch dims of log N(sample; mean, std^2), std broadcastable."""
    lp = -((sample - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def step(
    kind: str,
    x: Tensor,
    v: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    *,
    noise_level: float,
    generator: torch.Generator | None = None,
    prev_sample: Tensor | None = None,
    cps_logprob: Literal["exact", "flow_grpo"] = "exact",
) -> SdeStep:
    """Draw x at sigma_next (rollout), or score `prev_sample` (training), under the kind's transition.

    `cps_logprob="flow_grpo"` scores a `cps` step as flow_grpo's sd3_sde_with_logprob does (`sampling.cps_logprob`);
    other kinds are always scored exactly.

    The checks (sigmas decreasing, noise where the kind needs it) run on host copies of the sigmas, so a step with
    float sigmas reads nothing back from the device. Noise is drawn by `generator` on its own device: the trainer
    seeds one on the policy's device, so CPU and CUDA runs draw different (each reproducible) noise.
    """
    transition = SDE_KINDS.get(kind)
    t_host, t_next_host = _on_host(sigma), _on_host(sigma_next)
    if bool((t_next_host >= t_host).any()):
        raise ValueError("sigma_next must be smaller than sigma (sampling runs from sigma=1 to 0)")
    _, std_host = transition(torch.zeros_like(t_host), torch.zeros_like(t_host), t_host, t_next_host, noise_level)
    std_host = torch.as_tensor(std_host, dtype=torch.float32)
    deterministic = bool((std_host == 0).all())
    if not deterministic and bool((std_host <= 0).any()):
        raise ValueError(f"{kind} has zero noise at sigma_next={t_next_host.tolist()}; use 'ode' for that step")
    xf, vf = x.float(), v.float()
    t, t_next = _expand(sigma, xf), _expand(sigma_next, xf)
    mean, std = transition(xf, vf, t, t_next, noise_level)
    std = std.expand_as(t)
    if prev_sample is None:
        if deterministic:
            prev_sample = mean
        else:
            gen_device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
            prev_sample = mean + std * noise
    else:
        prev_sample = prev_sample.float()
    if deterministic:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    elif kind == "cps" and cps_logprob == "flow_grpo":
        sq = (prev_sample.detach() - mean) ** 2
        log_prob = -sq.mean(dim=tuple(range(1, sq.ndim)))
    else:
        log_prob = gaussian_log_prob(prev_sample.detach(), mean, std)
    return SdeStep(prev_sample=prev_sample, mean=mean, std=std, log_prob=log_prob)


def sigma_schedule(steps: int, shift: float) -> Tensor:
    """(steps + 1,) float32 sigmas from 1 down to 0, shifted as diffusers' flow-matching Euler scheduler does."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.float().clone()
