"""Oracle rewards for synthetic data, where the ground-truth edit (target video and mask) is known.

Fidelity: how close the edit is to the target *inside* the mask (where the instruction asked for change).
Preservation: how close it is to the source *outside* the mask (where nothing should change).
Together they are what the VLM judges estimate, measured exactly, so a CPU run can show learning.
A sample without the ground truth it needs has no score (invalid), never 0.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from editrl import metrics
from editrl.metrics import Metric
from editrl.base import StrictModel
from editrl.rewards.pixel import stack_masks
from editrl.types import RewardBatch, RewardOutput


class _Oracle:
    """Scores on the batch's device, computing only the metric asked for."""

    class Options(StrictModel):
        metric: Metric = "ssim"

    def __init__(self, options: Options) -> None:
        self.options = options

    def _masks(self, batch: RewardBatch) -> torch.Tensor:
        """The stacked masks; a sample without one is all True (the whole frame may change)."""
        assert batch.edited is not None
        return stack_masks(batch.masks, batch.edited, missing=True)


class OracleFidelity(_Oracle):
    """PSNR (dB) or SSIM of the edit against the target inside the edit mask (the whole frame without one)."""

    needs: ClassVar[set[str]] = {"edited", "target", "mask"}

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None:
            raise ValueError("oracle_fidelity needs the edited videos")
        if batch.targets is None:
            device = batch.edited.device
            nan = torch.full((len(batch),), float("nan"), device=device)
            invalid = torch.zeros(len(batch), dtype=torch.bool, device=device)
            return RewardOutput(nan, invalid, {"error": ["no target video"] * len(batch)})
        metric = self.options.metric
        values = metrics.fidelity(batch.edited, batch.targets, self._masks(batch), metrics=(metric,))[metric]
        return RewardOutput(values, values.isfinite())


class OraclePreservation(_Oracle):
    """PSNR (dB) or SSIM of the edit against the source outside the ground-truth edit mask.

    Needs the mask: without one the region to preserve is unknown (invalid). A global edit (mask all
    True) has nothing to preserve (invalid as well).
    """

    needs: ClassVar[set[str]] = {"edited", "source", "mask"}

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None or batch.sources is None:
            raise ValueError("oracle_preservation needs the edited and source videos")
        metric = self.options.metric
        values = metrics.preservation(batch.edited, batch.sources, self._masks(batch), metrics=(metric,))[metric]
        # A missing mask is stacked all True: nothing lies outside it, so its value is NaN and invalid.
        errors = [None if m is not None else "no edit mask" for m in (batch.masks or [None] * len(batch))]
        return RewardOutput(values, values.isfinite(), {"error": errors})
