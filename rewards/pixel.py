"""Pixel rewards that need no judge and no ground truth: preservation against the source, steadiness.

They give the CPU quickstart a meaningful signal, and a cheap preservation term beside a VLM judge.
The maths lives in `editrl.metrics`; these classes only adapt it to the reward contract.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import Tensor

from editrl import metrics
from editrl.metrics import Metric
from editrl.base import StrictModel
from editrl.types import RewardBatch, RewardOutput


def stack_masks(masks: list[Tensor | None] | None, like: Tensor, missing: bool) -> Tensor:
    """Per-sample (T, 1, H, W) masks as one (B, T, 1, H, W) bool tensor on `like`'s device; a missing
    mask is all `missing`. The masks may live on the host or on that device already."""
    b, t, _, h, w = like.shape
    out = torch.full((b, t, 1, h, w), missing, dtype=torch.bool, device=like.device)
    for i, m in enumerate(masks or []):
        if m is None:
            continue
        if m.dim() == 3:  # (T, H, W) is accepted too
            m = m.unsqueeze(1)
        if tuple(m.shape) != (t, 1, h, w):
            raise ValueError(f"mask {i} has shape {tuple(m.shape)}, the videos need ({t}, 1, {h}, {w})")
        out[i] = m.to(like.device).bool()
    return out


def score(metric: Metric, a: Tensor, b: Tensor, region: Tensor | None) -> Tensor:
    """The one metric asked for, on the videos' device (SSIM costs many times PSNR: never both)."""
    return (metrics.psnr if metric == "psnr" else metrics.ssim)(a, b, region)


class Preservation:
    """PSNR (dB) or SSIM of the edited video against the source, optionally only outside the edit mask.

    With `outside_mask`, a sample without a mask is compared everywhere, and a global edit (mask all
    True: nothing to preserve) has no score (invalid, never 0).
    """

    needs: ClassVar[set[str]] = {"source", "edited", "mask"}

    class Options(StrictModel):
        metric: Metric = "ssim"
        outside_mask: bool = True

    def __init__(self, options: Options) -> None:
        self.options = options
        self.needs = {"source", "edited", "mask"} if options.outside_mask else {"source", "edited"}

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None or batch.sources is None:
            raise ValueError("pixel_preservation needs the edited and source videos")
        region = ~stack_masks(batch.masks, batch.edited, missing=False) if self.options.outside_mask else None
        values = score(self.options.metric, batch.edited, batch.sources, region)
        return RewardOutput(values, values.isfinite())


class TemporalConsistency:
    """1 - mean absolute frame-to-frame change of the edited video (1 = steady).

    `reference: source` compares the edit's frame-to-frame changes with the source's, so motion that the
    source has is not penalised, only flicker and motion the edit added or lost.
    """

    needs: ClassVar[set[str]] = {"edited"}

    class Options(StrictModel):
        reference: Literal["none", "source"] = "none"

    def __init__(self, options: Options) -> None:
        self.options = options
        self.needs = {"edited", "source"} if options.reference == "source" else {"edited"}

    def __call__(self, batch: RewardBatch) -> RewardOutput:
        if batch.edited is None:
            raise ValueError("temporal_consistency needs the edited videos")
        ref = None
        if self.options.reference == "source":
            if batch.sources is None:
                raise ValueError("temporal_consistency with reference: source needs the source videos")
            ref = batch.sources
        values = metrics.temporal_consistency(batch.edited, ref)
        return RewardOutput(values, values.isfinite())
