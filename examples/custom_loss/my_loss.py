"""A user's Edit-GRPO loss, plugged in by name: `grpo.loss=my_loss:my_loss` with this folder on PYTHONPATH.

REINFORCE in its score-function form: -A log p. At the rollout's own policy its gradient is the clipped surrogate's
(the ratio is 1 there), but nothing bounds how far later updates of the same batch move (`grpo.minibatches` > 1).

    PYTHONPATH=examples/custom_loss editrl train toy grpo.loss=my_loss:my_loss train.steps=1
"""

import torch
from torch import Tensor

from editrl.grpo import LossOutput


def my_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float) -> LossOutput:
    """log_prob, old_log_prob, advantages: (B,) per sample of a trained step; clip_range is unused here."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio.detach())
    loss = -(advantages * log_prob).mean()
    return LossOutput(loss, ratio=ratio, approx_kl=0.5 * (log_ratio.detach() ** 2).mean())
