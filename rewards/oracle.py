"""Oracle rewards for synthetic data, where the ground-truth edit (target video and mask) is known.

Fidelity: how close the edit is to the target *inside* the mask (where the instruction asked for change).
Preservation: how close it is to the source *outside* the mask (where nothing should change).
Together they are what the VLM judges estimate, measured exactly, so a CPU run can show learning.
A sample without the ground truth it needs has no score (invalid), never 0.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from editrl import metrics
from editrl.policy import StrictModel
from editrl.rewards.pixel import stack_masks
from editrl.types import RewardBatch, RewardOutput


class _Oracle:
    class Options(StrictModel):
        metric: Literal["psnr", "ssim"] = "ssim"

    def __init__(self, options: Options) -> None:
        self.options = options

    def _masks(self, batch: RewardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked masks and which samples have one."""
        assert batch.edited is not None
        has = torch.tensor([m is not None for m in (batch.masks or [None] * len(batch))], dtype=torch.bool)
        return stack_masks(batch.masks, batch.edited, missing=True), has


class OracleFidelity(_Oracle):
    """PSNR (dB) or SSIM of the edit against the target inside the edit mask (the whole frame without one)."""

    needs: ClassVar[set[str]] = {"edited", "target", "mask"}

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None:
            raise ValueError("oracle_fidelity needs the edited videos")
        if batch.targets is None:
            nan = torch.full((len(batch),), float("nan"))
            return RewardOutput(nan, torch.zeros(len(batch), dtype=torch.bool), {"error": ["no target video"] * len(batch)})
        masks, _ = self._masks(batch)
        values = metrics.fidelity(batch.edited.float(), batch.targets.float(), masks)[self.options.metric]
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
        masks, has = self._masks(batch)
        values = metrics.preservation(batch.edited.float(), batch.sources.float(), masks)[self.options.metric]
        errors = [None if ok else "no edit mask" for ok in has.tolist()]
        return RewardOutput(values, values.isfinite() & has, {"error": errors})
