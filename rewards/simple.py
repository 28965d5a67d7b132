"""Programmatic rewards with a known optimum: engine tests and smoke runs need no judge or ground truth."""

from __future__ import annotations

from typing import ClassVar

from editrl.base import StrictModel
from editrl.types import RewardBatch, RewardOutput


class Brightness:
    """Mean pixel value of the edited video, in [0, 1]."""

    needs: ClassVar[set[str]] = {"edited"}

    class Options(StrictModel):
        pass

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        assert batch.edited is not None
        scores = batch.edited.float().mean(dim=(1, 2, 3, 4))
        return RewardOutput(scores, scores.isfinite())


class TargetColor:
    """1 - mean squared distance of every pixel to an RGB colour: 1 when the whole video is that colour."""

    needs: ClassVar[set[str]] = {"edited"}

    class Options(StrictModel):
        color: tuple[float, float, float] = (1.0, 0.0, 0.0)

    def __init__(self, options: Options) -> None:
        self.options = options

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        assert batch.edited is not None
        color = batch.edited.new_tensor(self.options.color).view(1, 1, 3, 1, 1)
        scores = 1 - ((batch.edited.float() - color) ** 2).mean(dim=(1, 2, 3, 4))
        return RewardOutput(scores, scores.isfinite())
