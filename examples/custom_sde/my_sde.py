"""A user's SDE kind, plugged in by name: `sampling.sde=my_sde:my_sde` with this folder on PYTHONPATH.

Flow-GRPO's marginal-preserving SDE with another noise schedule. For x_t = (1 - t) x0 + t eps and v = eps - x0, any
diffusion coefficient g(t) keeps the flow's marginals with the drift v + g^2 / (2 t) (x + (1 - t) v) (the score is
-(x + (1 - t) v) / t); Flow-GRPO's g = a sqrt(t / (1 - t)) grows without bound near t = 1, this one, g = a t, is
largest at the start and vanishes with t. The transition over one step dt = t_next - t < 0 is a Gaussian:

    PYTHONPATH=examples/custom_sde editrl train toy sampling.sde=my_sde:my_sde train.steps=1
"""

import torch
from torch import Tensor


def my_sde(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """(mean, std) of x at t_next; t and t_next broadcast against x, a is `sampling.noise_level`."""
    dt = t_next - t
    g = a * t
    mean = x + (v + g**2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, g * torch.sqrt(-dt)
