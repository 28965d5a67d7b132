"""Video and image I/O with PyAV (bundles ffmpeg) and PIL; tensors are (T, C, H, W) float in [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from editrl.base import DataError


class MediaError(DataError):
    """A media file that is missing, unreadable or empty; the message names the file."""


def _unreadable(path: Path, decoded: int, error: Exception) -> MediaError:
    where = f" after {decoded} frames (cut short or damaged? re-export it)" if decoded else ""
    return MediaError(f"cannot read video {path}{where}: {error}")


def probe_video(path: str | Path, decode: bool = False) -> tuple[int, int, int]:
    """(frames, height, width) of a video. Headers only (frames 0 when the header does not say), or with `decode`
    every frame decoded without conversion: a clip cut short or with frames of changing size fails here, not mid-run."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            declared, size = stream.frames, (stream.codec_context.height, stream.codec_context.width)
            if not decode:
                return declared, *size
            for frame in container.decode(stream):
                if not decoded:
                    size = (frame.height, frame.width)
                elif (frame.height, frame.width) != size:
                    raise MediaError(f"{path}: frame {decoded} is {frame.height}x{frame.width}, the first {size[0]}x{size[1]}")
                decoded += 1
    except MediaError:
        raise
    except Exception as e:
        raise _unreadable(path, decoded, e) from e
    if not decoded:
        raise MediaError(f"{path} contains no frames")
    if decoded < declared:
        raise MediaError(f"{path} decodes {decoded} of its {declared} frames (cut short? re-export it)")
    return decoded, *size


def read_video(path: str | Path, max_frames: int | None = None, size: tuple[int, int] | None = None) -> Tensor:
    """All frames (or the first `max_frames`) of a video as (T, C, H, W) float32 in [0, 1].

    `size` (height, width) scales each frame as it is decoded (area averaging), so a long full-HD clip that is to be
    edited small never sits in memory at full size."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"video not found: {path}")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            for frame in container.decode(video=0):
                if size is None:
                    frames.append(frame.to_ndarray(format="rgb24"))
                else:
                    frames.append(frame.to_ndarray(format="rgb24", height=size[0], width=size[1], interpolation="AREA"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except MediaError:
        raise
    except Exception as e:  # PyAV raises a family of FFmpeg errors; the user needs the file name
        raise _unreadable(path, len(frames), e) from e
    if not frames:
        raise MediaError(f"{path} contains no frames")
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(frames: Tensor) -> np.ndarray:
    """(T, C, H, W) float in [0, 1] -> (T, H, W, C) uint8, rounding (not truncating)."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_video(path: str | Path, frames: Tensor, fps: int = 8, lossless: bool = False) -> Path:
    """Write (T, C, H, W) in [0, 1] as H.264 mp4. `lossless` keeps exact RGB (libx264rgb, crf 0)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = to_uint8(frames)
    t, h, w, _ = data.shape
    if not lossless and (h % 2 or w % 2):
        raise MediaError(f"H.264 in yuv420p needs even sizes, got {h}x{w} for {path}")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.width, stream.height = w, h
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": "0"} if lossless else {"crf": "18"}
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def read_image(path: str | Path) -> Tensor:
    """An image file as (C, H, W) float32 in [0, 1] (RGB)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise MediaError(f"cannot read image {path}: {e}") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def write_image(path: str | Path, image: Tensor) -> Path:
    """(C, H, W) in [0, 1] as PNG (lossless)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image[None])[0]).save(path)
    return path
