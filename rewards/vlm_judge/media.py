"""Turning videos into the images a judge sees: a few evenly spaced frames, or one grid of them."""

from __future__ import annotations

import base64
import hashlib
import io
import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor



def _uint8(frames: np.ndarray) -> np.ndarray:
    """(n, C, H, W) float in [0, 1] -> (n, H, W, C) uint8, rounding like `editrl.data.video.to_uint8`."""
    return np.rint(np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _numpy(x: Tensor) -> np.ndarray:
    """Zero-copy for float32 CPU tensors. The media path works in numpy: a few small frames per request,
    where torch's thread pool costs more than the work (badly so on a busy machine)."""
    return x.detach().to("cpu", torch.float32).numpy()


def sample_frames(video: Tensor, n: int) -> np.ndarray:
    """`n` evenly spaced frames of a (T, C, H, W) video, first and last included, as (n, H, W, C) uint8."""
    if video.dim() != 4:
        raise ValueError(f"a video must be (T, C, H, W), got shape {tuple(video.shape)}")
    t = video.shape[0]
    idx = np.linspace(0, t - 1, min(n, t)).round().astype(np.int64)
    return _uint8(_numpy(video)[idx])


def image_array(image: Tensor) -> np.ndarray:
    """A (C, H, W) image as (1, H, W, C) uint8, so images and frames share one code path."""
    return _uint8(_numpy(image)[None])


def tile(frames: np.ndarray) -> np.ndarray:
    """(n, H, W, C) frames as one near-square grid image (unused cells stay black)."""
    n, h, w, c = frames.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, q = divmod(i, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = frame
    return grid


def digest(arrays: list[np.ndarray]) -> str:
    """A hash of pixel data (shape included), the media half of a cache key."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def data_url(pixels: np.ndarray, longest_side: int) -> str:
    """(H, W, C) uint8 as a base64 PNG data URL, shrunk so its longest side is at most `longest_side`."""
    img = Image.fromarray(pixels)
    scale = longest_side / max(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless; level 1 encodes several times faster
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
