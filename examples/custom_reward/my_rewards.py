"""A user's own rewards, in their own module: editrl needs no change to use them.

Name them in a recipe as `my_rewards:redness` / `my_rewards:Contrast` (this folder on PYTHONPATH), or
install this folder (`pip install -e .`): its pyproject.toml registers them under the entry-point group
`editrl.rewards` as `redness` and `contrast`.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from editrl.types import RewardBatch, RewardOutput


def redness(instructions, sources, edited, references, **kwargs) -> list[float | None]:
    """trl's reward-function convention: per-sample lists in, one float (or None: no score) per sample out.

    Videos are (T, C, H, W) tensors in [0, 1]; inputs the trainer did not send are None. Extra keyword
    arguments (targets, masks, categories and this reward's recipe options) arrive in **kwargs.
    """
    return [None if video is None else float(video[:, 0].mean() - video[:, 1:].mean()) for video in edited]


class Contrast:
    """A reward class: declares what it reads, validates its recipe options, scores a whole batch."""

    needs = {"edited"}  # the trainer decodes and sends only these inputs

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not silently ignored
        per_frame: bool = True  # contrast within each frame, or over the whole video

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        video = batch.edited.float()  # (B, T, C, H, W)
        dims = (2, 3, 4) if self.options.per_frame else (1, 2, 3, 4)
        std = video.std(dim=dims)
        scores = std.mean(dim=1) if self.options.per_frame else std
        return RewardOutput(scores, torch.isfinite(scores))
