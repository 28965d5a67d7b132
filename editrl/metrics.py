"""Pixel metrics for edited videos: PSNR, SSIM, their masked variants and temporal consistency.

Every function takes batched videos (B, T, C, H, W) in [0, 1] and returns one value per sample (B,),
so the same code serves the benchmark (`editrl eval`) and reward plugins. Masks are edit masks
(B, T, 1, H, W) bool, True where the instruction allows change.

Masked metrics compare one region only: pixels outside the region are copied from the reference
before comparing, so a difference outside the region never leaks into it (SSIM's window would
otherwise spread an edit across the mask boundary). A region with no pixels gives NaN ("not
applicable"), never a number that could be averaged in as a score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# An identical pair has infinite PSNR; clamping keeps tables and averages finite. 100 dB is above any
# real 8-bit difference at benchmark sizes (one LSB in one pixel of 9x64x64x3 is ~98.5 dB).
MAX_PSNR_DB = 100.0


def _check(a: Tensor, b: Tensor, name: str = "videos") -> None:
    if a.dim() != 5:
        raise ValueError(f"{name} must be (B, T, C, H, W), got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name} differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def _region(mask: Tensor | None, like: Tensor) -> Tensor:
    """The mask as a float (B, T, 1, H, W) weight, all ones when there is none."""
    if mask is None:
        return torch.ones(like.shape[:2] + (1,) + like.shape[3:], dtype=like.dtype, device=like.device)
    if mask.dim() == 4:  # (B, T, H, W)
        mask = mask.unsqueeze(2)
    expected = like.shape[:2] + (1,) + like.shape[3:]
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"mask must be (B, T, 1, H, W) = {tuple(expected)}, got {tuple(mask.shape)}")
    return mask.to(like.dtype)


def _masked_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Mean of (B, ...) values over the weighted elements of each sample; NaN where the weight is empty."""
    weight = weight.expand_as(values)
    total = (values * weight).flatten(1).sum(1)
    count = weight.flatten(1).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


def mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per sample, over the masked pixels (all channels) when a mask is given."""
    _check(a, b)
    a, b = a.double(), b.double()
    return _masked_mean((a - b) ** 2, _region(mask, a)).float()


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 1.0, max_db: float = MAX_PSNR_DB) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, clamped at `max_db` (identical videos give `max_db`)."""
    err = mse(a, b, mask).double()
    floor = data_range**2 * 10 ** (-max_db / 10)
    value = 10 * torch.log10(data_range**2 / err.clamp_min(floor))
    return value.float()  # NaN (empty mask) stays NaN


def _gaussian(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: Tensor, b: Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM (B, T, C, H, W) with a Gaussian window (Wang et al. 2004 constants).

    The map keeps the input size (reflect padding) so that it lines up with an edit mask; frames
    smaller than the window use the largest odd window that fits.
    """
    _check(a, b)
    B, T, C, H, W = a.shape
    window = min(window, H if H % 2 else H - 1, W if W % 2 else W - 1)
    x = a.double().reshape(B * T * C, 1, H, W)
    y = b.double().reshape(B * T * C, 1, H, W)
    g = _gaussian(window, sigma, x.dtype, x.device)
    pad = window // 2

    def blur(z: Tensor) -> Tensor:
        if pad:
            z = F.pad(z, (pad, pad, pad, pad), mode="reflect")
        z = F.conv2d(z, g.view(1, 1, -1, 1))
        return F.conv2d(z, g.view(1, 1, 1, -1))

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (num / den).reshape(B, T, C, H, W).float()


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per sample; with a mask, SSIM of the masked region alone (see the module note)."""
    _check(a, b)
    if mask is not None:
        region = _region(mask, a).bool()
        a = torch.where(region, a, b)
        return _masked_mean(ssim_map(a, b, data_range).double(), region.double()).float()
    return ssim_map(a, b, data_range).flatten(1).mean(1)


def fidelity(edited: Tensor, target: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Oracle fidelity: how well the edit matches the ground-truth target inside the edit mask."""
    _check(edited, target)
    region = _region(mask, edited).bool()
    return {"psnr": psnr(edited, target, region), "ssim": ssim(edited, target, region)}


def preservation(edited: Tensor, source: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Oracle preservation: how well the edit keeps the source outside the edit mask (NaN for global edits)."""
    _check(edited, source)
    outside = ~_region(mask, edited).bool()
    return {"psnr": psnr(edited, source, outside), "ssim": ssim(edited, source, outside)}


def temporal_consistency(video: Tensor, reference: Tensor | None = None) -> Tensor:
    """1 - mean absolute frame-to-frame change, per sample; 1 is perfectly steady.

    Without a reference this penalises flicker and motion alike (a reward for steadiness). With a
    reference (the ground-truth target) it compares the frame-to-frame changes themselves, so a video
    that moves exactly like the reference scores 1 and flicker or wrong motion lowers it.
    """
    if video.dim() != 5:
        raise ValueError(f"video must be (B, T, C, H, W), got shape {tuple(video.shape)}")
    if video.shape[1] < 2:
        return torch.full((video.shape[0],), math.nan)
    change = video.double().diff(dim=1)
    if reference is not None:
        _check(video, reference)
        change = change - reference.double().diff(dim=1)
    return (1 - change.abs().flatten(1).mean(1)).float()
