"""Pixel metrics for edited videos: PSNR, SSIM, their masked variants and temporal consistency.

Every function takes batched videos (B, T, C, H, W) in [0, 1] and returns one value per sample (B,),
so the same code serves the benchmark (`editrl eval`) and reward plugins. Masks are edit masks
(B, T, 1, H, W) bool, True where the instruction allows change.

Masked metrics compare one region only: pixels outside the region are copied from the reference
before comparing, so a difference outside the region never leaks into it (SSIM's window would
otherwise spread an edit across the mask boundary). A region with no pixels gives NaN ("not
applicable"), never a number that could be averaged in as a score.

Everything runs where the inputs are (CPU or GPU) without host syncs, so a reward on the policy's
device costs a few kernels. Maths is in the inputs' dtype promoted to at least float32: half
precision cannot hold SSIM's variances, and float64 is slow on GPUs and never needed for [0, 1] data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Metric = Literal["psnr", "ssim"]
METRICS: tuple[Metric, ...] = ("psnr", "ssim")

# An identical pair has infinite PSNR; clamping keeps tables and averages finite. 100 dB is above any
# real 8-bit difference at benchmark sizes (one LSB in one pixel of 9x64x64x3 is ~98.5 dB).
MAX_PSNR_DB = 100.0

# SSIM as Wang et al. (2004) define it: an 11-tap Gaussian window of sigma 1.5. Our own rather than
# pyiqa's or torchmetrics': neither takes a mask, and masked SSIM needs the map itself (copy the
# reference outside the region, then average the map over the cropped region). pyiqa's also departs
# from the standard (it clips the contrast-structure term at 0) and both blur with a full 11x11
# window, 5x the work of two 1-D passes; torchmetrics is not a dependency either.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5

# SSIM works on whole samples, this many input elements at a time where they are small: it holds five
# blurred maps, so this bounds its memory (under 1 GB in float32) however large the batch is.
_SSIM_CHUNK = 2**24


def _check(a: Tensor, b: Tensor, name: str = "videos") -> None:
    if a.dim() != 5:
        raise ValueError(f"{name} must be (B, T, C, H, W), got shape {tuple(a.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name} differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def _dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to compute in: the inputs' own, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _region(mask: Tensor | None, like: Tensor) -> Tensor | None:
    """The mask as a bool (B, T, 1, H, W) tensor on `like`'s device; None (the whole frame) stays None."""
    if mask is None:
        return None
    if mask.dim() == 4:  # (B, T, H, W)
        mask = mask.unsqueeze(2)
    expected = like.shape[:2] + (1,) + like.shape[3:]
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"mask must be (B, T, 1, H, W) = {tuple(expected)}, got {tuple(mask.shape)}")
    return mask.to(device=like.device, dtype=torch.bool)


def _region_mean(values: Tensor, region: Tensor) -> Tensor:
    """Mean of (B, T, C, h, w) values over the region's pixels per sample (an empty region: 0 / 0 = NaN); the
    channels are summed first, so the (B, T, 1, h, w) region is applied without expanding it."""
    total = values.sum(2).mul_(region[:, :, 0]).flatten(1).sum(1)
    return total / (region.flatten(1).sum(1) * values.shape[2])


def mse(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error per sample, over all frames and channels of the masked pixels when a mask is given."""
    _check(a, b)
    region = _region(mask, a)
    dtype = _dtype(a, b)
    sq = F.mse_loss(a.to(dtype), b.to(dtype), reduction="none")
    return sq.flatten(1).mean(1) if region is None else _region_mean(sq, region)


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 1.0, max_db: float = MAX_PSNR_DB) -> Tensor:
    """Peak signal-to-noise ratio in dB per sample, clamped at `max_db` (identical videos give `max_db`).

    A clip PSNR: the squared error is pooled over the whole clip (all frames and channels, the masked
    pixels only with a mask) before the log, not averaged over per-frame PSNRs, so one badly broken
    frame costs what its error costs and a single perfect frame cannot give infinity.
    """
    err = mse(a, b, mask)
    return (20 * math.log10(data_range) - 10 * torch.log10(err)).clamp_max(max_db)  # NaN (empty mask) stays NaN


def _ssim_window(height: int, width: int) -> int:
    """11, or for frames smaller than that the largest odd window that fits (SSIM is undefined there)."""
    return min(SSIM_WINDOW, height if height % 2 else height - 1, width if width % 2 else width - 1)


def _gaussian(window: int, sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 1-D Gaussian, made on the device (no host-to-device copy)."""
    x = torch.arange(window, dtype=dtype, device=device) - (window - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _moments(x: Tensor, y: Tensor, shift: float, dtype: torch.dtype) -> Tensor:
    """(N, H, W) planes -> (N, 5, H, W): x, y, x², y², xy of the planes less `shift`, the maps SSIM blurs.

    Variances are shift-invariant, and centring [0, L] data on L / 2 makes the squares 4x smaller, so
    float32 cancellation in E[x²] - E[x]² errs about 5x less (worst pixel vs float64: 3e-4 -> 7e-5).
    """
    out = torch.empty(x.shape[0], 5, *x.shape[1:], dtype=dtype, device=x.device)
    torch.sub(x.to(dtype), shift, out=out[:, 0])
    torch.sub(y.to(dtype), shift, out=out[:, 1])
    torch.mul(out[:, 0], out[:, 0], out=out[:, 2])
    torch.mul(out[:, 1], out[:, 1], out=out[:, 3])
    torch.mul(out[:, 0], out[:, 1], out=out[:, 4])
    return out


def ssim_map(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-pixel SSIM (B, T, C, H - 10, W - 10) as Wang et al. (2004) define it, without padding (the valid
    interior only; frames smaller than the window use `_ssim_window`'s).

    The Gaussian is separable: two 1-D passes, each one depthwise convolution over the five maps of `_moments`. On
    CUDA a float32 depthwise convolution runs PyTorch's own kernel in full float32, not cuDNN, whose TF32 default
    would make E[x²] - E[x]² err by about as much as C2.
    """
    _check(a, b)
    B, T, C, H, W = a.shape
    window = _ssim_window(H, W)
    dtype = _dtype(a, b)
    g = _gaussian(window, SSIM_SIGMA, dtype, a.device).expand(5, window)
    shift = data_range / 2
    blurred = F.conv2d(_moments(a.reshape(-1, H, W), b.reshape(-1, H, W), shift, dtype), g.reshape(5, 1, window, 1), groups=5)
    blurred = F.conv2d(blurred, g.reshape(5, 1, 1, window), groups=5)
    mu_x, mu_y, xx, yy, xy = blurred.unbind(1)
    # In place, over the five blurred maps: the formula would otherwise allocate a dozen of them. The
    # order keeps SSIM(x, x) exactly 1 (numerator and denominator then round identically).
    xx.addcmul_(mu_x, mu_x, value=-1)  # variance of x
    yy.addcmul_(mu_y, mu_y, value=-1)
    xy.addcmul_(mu_x, mu_y, value=-1)  # covariance
    mu_x.add_(shift)  # the local means themselves
    mu_y.add_(shift)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (mu_x * mu_y).mul_(2).add_(c1).mul_(xy.mul_(2).add_(c2))
    den = mu_x.square_().add_(mu_y.square_()).add_(c1).mul_(xx.add_(yy).add_(c2))
    return num.div_(den).reshape(B, T, C, H - window + 1, W - window + 1)


def ssim(a: Tensor, b: Tensor, mask: Tensor | None = None, data_range: float = 1.0) -> Tensor:
    """Mean SSIM per sample over the valid interior (every frame and channel); with a mask, of the masked region
    alone (see the module note), NaN where the mask cropped to that interior is empty."""
    _check(a, b)
    region = _region(mask, a)
    B, H, W = a.shape[0], a.shape[3], a.shape[4]
    pad = _ssim_window(H, W) // 2
    step = max(1, _SSIM_CHUNK // max(1, a[0].numel()))
    out = []
    for s in range(0, B, step):
        x, y = a[s : s + step], b[s : s + step]
        if region is None:
            out.append(ssim_map(x, y, data_range).flatten(1).mean(1))
            continue
        r = region[s : s + step]
        values = ssim_map(torch.where(r, x, y), y, data_range)
        out.append(_region_mean(values, r[..., pad : H - pad, pad : W - pad]))
    return torch.cat(out)


def _compute(names: Sequence[Metric], a: Tensor, b: Tensor, region: Tensor | None) -> dict[str, Tensor]:
    unknown = set(names) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; choose from {list(METRICS)}")
    return {name: (psnr if name == "psnr" else ssim)(a, b, region) for name in names}


def fidelity(edited: Tensor, target: Tensor, mask: Tensor | None, metrics: Sequence[Metric] = METRICS) -> dict[str, Tensor]:
    """Oracle fidelity: how well the edit matches the ground-truth target inside the edit mask (the whole
    frame without one). Only the `metrics` asked for are computed: SSIM costs many times PSNR."""
    _check(edited, target)
    return _compute(metrics, edited, target, _region(mask, edited))


def preservation(edited: Tensor, source: Tensor, mask: Tensor, metrics: Sequence[Metric] = METRICS) -> dict[str, Tensor]:
    """Oracle preservation: how well the edit keeps the source outside the edit mask (NaN for global edits)."""
    _check(edited, source)
    region = _region(mask, edited)
    if region is None:
        raise ValueError("preservation needs the edit mask: without it the region to preserve is unknown")
    return _compute(metrics, edited, source, ~region)


def temporal_consistency(video: Tensor, reference: Tensor | None = None) -> Tensor:
    """1 - mean absolute frame-to-frame change, per sample; 1 is perfectly steady.

    Without a reference this penalises flicker and motion alike (a reward for steadiness). With a
    reference (the ground-truth target) it compares the frame-to-frame changes themselves, so a video
    that moves exactly like the reference scores 1 and flicker or wrong motion lowers it.
    """
    if video.dim() != 5:
        raise ValueError(f"video must be (B, T, C, H, W), got shape {tuple(video.shape)}")
    dtype = _dtype(video) if reference is None else _dtype(video, reference)
    if video.shape[1] < 2:
        return torch.full((video.shape[0],), math.nan, dtype=dtype, device=video.device)
    v = video.to(dtype)
    if reference is not None:
        _check(video, reference)
        v = v - reference.to(dtype)  # the change of the difference is the difference of the changes
    change = v[:, 1:] - v[:, :-1]
    # abs_ + mean rather than an L1 vector_norm: the CPU norm kernel errs by ~1e-6 on a few hundred values
    return 1 - change.abs_().flatten(1).mean(1)
