"""Sampling trajectories from a policy without gradients: SDE inside a window of steps, ODE elsewhere."""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from editrl import sde
from editrl.config import SdeWindow
from editrl.policy import Policy
from editrl.types import Condition, EditSample, Trajectory


def plan_steps(
    num_steps: int,
    window: SdeWindow,
    trained_steps: int | None,
    iteration: int,
    generator: torch.Generator,
) -> tuple[list[int], list[int]]:
    """(SDE steps, trained steps) for one training iteration; trained steps are a random subset of the SDE steps.

    Candidates are steps 0..num_steps-2: the last step lands on sigma=0, where several kinds have no noise.
    """
    candidates = num_steps - 1
    size = window.size if window.size is not None else candidates
    slots = candidates - size + 1
    if window.size is None:
        start = 0
    elif window.position == "random":
        start = int(torch.randint(slots, (1,), generator=generator))
    elif window.position == "sliding":
        start = (window.start + iteration * window.stride) % slots
    else:
        start = window.start
    sde_steps = list(range(start, start + size))
    k = trained_steps if trained_steps is not None else size
    pick = torch.randperm(size, generator=generator)[:k].sort().values
    return sde_steps, [sde_steps[int(i)] for i in pick]


@torch.no_grad()
def rollout(
    policy: Policy,
    cond: Condition,
    sigmas: Tensor,
    *,
    sde_steps: list[int],
    trained_steps: list[int],
    kind: str,
    noise_level: float,
    generator: torch.Generator,
    cps_logprob: Literal["exact", "flow_grpo"] = "exact",
    keep_means: bool = False,
    keep_latents: bool = True,
) -> Trajectory:
    """Sample a batch of trajectories and keep (x, x_next, log p) at the trained steps only.

    `keep_means` also keeps each trained step's transition mean (`extras["mean"]`), which GRPO-Guard compares with.
    `keep_latents=False` keeps no (x, x_next) pairs (empty (B, 0) tensors): a likelihood-free objective trains on its own
    noised copies of the final sample, and at video scale the pairs are the rollout's largest tensors.

    Everything stays on the policy's device and the loop reads nothing back from it (sigmas are host floats,
    noise comes from `generator`, best placed on the policy's device), so the device never waits for the host.
    """
    x = policy.init_noise(cond, generator)
    batch = x.shape[0]
    sde_set, keep = set(sde_steps), set(trained_steps)
    schedule = sigmas.tolist()
    latents, nexts, logps, means = [], [], [], []
    for i in range(len(schedule) - 1):
        sigma, sigma_next = schedule[i], schedule[i + 1]
        v = policy.velocity(x, torch.full((batch,), sigma, device=x.device), cond)
        out = sde.step(
            kind if i in sde_set else "ode", x, v, sigma, sigma_next,
            noise_level=noise_level, generator=generator, cps_logprob=cps_logprob,
        )
        if i in keep:
            if keep_latents:
                latents.append(x.float())
                nexts.append(out.prev_sample)
            logps.append(out.log_prob)
            if keep_means:
                means.append(out.mean)
        x = out.prev_sample.to(x.dtype)
    idx = torch.tensor(trained_steps, dtype=torch.long)
    empty = x.new_zeros(batch, 0)
    return Trajectory(
        steps=list(trained_steps),
        sigmas=sigmas[idx].clone(),
        sigmas_next=sigmas[idx + 1].clone(),
        latents=torch.stack(latents, 1) if keep_latents else empty,
        next_latents=torch.stack(nexts, 1) if keep_latents else empty,
        log_probs=torch.stack(logps, 1),
        final=x,
        extras={"mean": torch.stack(means, 1)} if keep_means else {},
    )


@torch.no_grad()
def sample_ode(
    policy: Policy, cond: Condition, steps: int, shift: float, generator: torch.Generator,
    tick: Callable[[], None] = lambda: None,
) -> Tensor:
    """Deterministic sampling (evaluation, inference): x0 latents, by the SDE module's `ode` step; `tick()` after each
    step (a progress bar)."""
    schedule = sde.sigma_schedule(steps, shift).tolist()
    x = policy.init_noise(cond, generator)
    for sigma, sigma_next in zip(schedule[:-1], schedule[1:]):
        v = policy.velocity(x, torch.full((x.shape[0],), sigma, device=x.device), cond)
        tick()
        x = sde.step("ode", x, v, sigma, sigma_next, noise_level=0.0).prev_sample.to(x.dtype)
    return x


@torch.no_grad()
def edit_videos(policy: Policy, samples: list[EditSample], steps: int, shift: float, seed: int) -> Tensor:
    """Encode, sample and decode a batch of requests: (B, T, C, H, W) pixels in [0, 1]."""
    cond = policy.encode(samples)
    generator = torch.Generator().manual_seed(seed)
    return policy.decode(sample_ode(policy, cond, steps, shift, generator))
